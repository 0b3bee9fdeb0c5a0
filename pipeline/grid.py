"""Grids: a sweep over any config keys, as the product of its axes x `train.variants` x `train.seeds`.

    grid:                                   # in a sweep file (configs/sweeps/backbones.yaml), or on the command
      encoder.name: [dinov2-small-imgfocus, dinov2-small-random]      # line: --grid encoder.name=a,b
      train.lr: [1.0e-2, 3.0e-3]

    points(cfg)  ->  [GridPoint(values={"encoder.name": ..., "train.lr": ...}, label="encoder.name=...,train.lr=0.01",
                                cfg=<the point's own config>), ...]

A point's config is the sweep's config with the point's values set and `sweep` = `<sweep>/<label>`, so that its runs
go to runs/<sweep>/<label>/<variant>[/seed-<s>]/ and its results to results/<sweep>/<label>/ through the one
`pipeline.layout.run_dir`; everything else about a run is that of the same config trained alone, byte for byte (the
sweep name is in no weight). Without `grid:` there is one point, the config itself, and the layout is today's.

Every point is built and validated before anything runs: an unknown key, or a value that fails the config's
validation, is one `GridError` line naming the key, the value and the point. Points whose stores have the same
fingerprint share them (`distinct_stores`): a store is extracted once however many points read it, and with
`cache.layers: all` a grid over the decoder's layers reads one cache.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import Config, ConfigError, dump_config

ENCODER_PREFIX = "encoder."
# Keys a grid cannot vary: the sweep's own name and axes, and the two axes every sweep already has.
RESERVED = {"grid": "a grid cannot vary its own axes", "sweep": "every point's folder is named below the sweep",
            "train.variants": "variants are an axis of every sweep already (train.variants, --variants)",
            "train.seeds": "seeds are an axis of every sweep already (train.seeds, --seeds)",
            "train.seed": "seeds are an axis of every sweep already (train.seeds, --seeds)"}


class GridError(ConfigError):
    """A grid axis names no config key, or one of its points is not a valid config; the message says which."""


@dataclass(frozen=True)
class GridPoint:
    values: dict[str, Any]  # axis key -> this point's value, axes in table order (encoder keys first)
    label: str  # "encoder.name=tiny-clip,train.lr=0.01": the point's folder below the sweep; "" without a grid
    cfg: Config


# ---- axes ---------------------------------------------------------------------------------------------------------
def _model_of(annotation) -> type[BaseModel] | None:
    """The config section class inside a field's annotation (`SynthConfig | None` -> SynthConfig), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_key(key: str, where: str = "grid") -> None:
    """A `GridError` unless `key` is a dotted key of `Config` that a grid may vary."""
    if key in RESERVED:
        raise GridError(f"{where}: {key!r} cannot be a grid axis: {RESERVED[key]}")
    model: type[BaseModel] | None = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        section = ".".join(parts[:i]) or "the config"
        if model is None:
            raise GridError(f"{where}: unknown key {key!r}: {'.'.join(parts[:i])} is a value, not a section")
        if part not in model.model_fields:
            raise GridError(f"{where}: unknown key {key!r}: {section} has no key {part!r} (its keys: "
                            f"{', '.join(model.model_fields)})")
        model = _model_of(model.model_fields[part].annotation)
    if model is not None and model is not Config:
        raise GridError(f"{where}: {key!r} is a section; name one of its keys ({', '.join(model.model_fields)})")


def axes(cfg: Config) -> list[tuple[str, list]]:
    """(key, values) of each axis: the encoder's keys first (a backbone is the first thing a reader compares),
    then the others in the order given."""
    items = list(cfg.grid.items())
    return [a for a in items if a[0].startswith(ENCODER_PREFIX)] + [a for a in items
                                                                     if not a[0].startswith(ENCODER_PREFIX)]


def parse_grid_option(text: str) -> tuple[str, list]:
    """`--grid KEY=V1,V2` -> (KEY, [V1, V2]); the values are read as one YAML flow list, so a list value is
    bracketed: `--grid decoder.semantic_layers=[12,9,6,3],[11,8,5,2]`, `--grid train.lr=1e-2,3e-3`."""
    if "=" not in text:
        raise GridError(f"--grid {text!r} is not of the form KEY=V1,V2 (e.g. --grid train.lr=1e-2,3e-3)")
    key, raw = (part.strip() for part in text.split("=", 1))
    check_key(key, f"--grid {text}")
    try:
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list) or not values or any(v is None for v in values):
        raise GridError(f"--grid {text!r}: the values {raw!r} are not a comma-separated list (bracket list values: "
                        "--grid decoder.semantic_layers=[12,9,6,3],[11,8,5,2])")
    # YAML 1.1 reads 1e-2 as a string; the config's own override parser does the same, and pydantic converts it.
    return key, values


def grid_override(text: str) -> str:
    """`--grid KEY=V1,V2` as the `--set`-style override the flows take (`grid.KEY=[V1, V2]`, merged into the
    sweep file's grid by `pipeline.config.apply_overrides`)."""
    key, values = parse_grid_option(text)
    return f"grid.{key}={json.dumps(values)}"


# ---- points -------------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_text(v) for v in value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str) and "/" in value:  # a path: its last part names it in a folder
        return Path(value.rstrip("/")).name
    return str(value)


def point_label(values: dict[str, Any]) -> str:
    """"key=value,key=value": a folder name (characters outside [A-Za-z0-9._+=,-] become _)."""
    return re.sub(r"[^A-Za-z0-9._+=,\-]", "_", ",".join(f"{k}={_text(v)}" for k, v in values.items()))


def _set(data: dict, key: str, value: Any) -> None:
    node = data
    for part in key.split(".")[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key.split(".")[-1]] = copy.deepcopy(value)


def _get(data: dict, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _point_error(err: ValidationError, values: dict[str, Any], label: str) -> GridError:
    """The first failure, named by the grid key that caused it (`decoder` fails for decoder.semantic_layers)."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    key = next((k for k in values if f"{loc}.".startswith(f"{k}.") or f"{k}.".startswith(f"{loc}.")), None)
    what = f"{key} = {values[key]!r}" if key else f"{loc}"
    return GridError(f"grid point {label}: {what} fails the config's validation ({loc}: {e['msg']}); change that "
                     "value in the sweep's grid (or --grid)")


def points(cfg: Config) -> list[GridPoint]:
    """Every point of the config's grid, in product order (the first axis slowest), each validated; one point, the
    config itself, without a grid."""
    if not cfg.grid:
        return [GridPoint({}, "", cfg)]
    grid_axes = axes(cfg)
    for key, _ in grid_axes:
        check_key(key)
    base = dump_config(cfg)
    base["grid"] = {}
    combos = [dict(zip([k for k, _ in grid_axes], combo)) for combo in itertools.product(*[v for _, v in grid_axes])]
    validated = []
    for values in combos:
        data = copy.deepcopy(base)
        for key, value in values.items():
            _set(data, key, value)
        try:
            validated.append(Config.model_validate(data))
        except ValidationError as err:
            raise _point_error(err, values, point_label(values)) from None
    # Each point named by its values as the config holds them: --grid train.lr=1e-2 and 0.01 are one folder.
    combos = [{k: _get(dump_config(c), k) for k in values} for c, values in zip(validated, combos)]
    seen = [json.dumps(values, sort_keys=True) for values in combos]
    if len(set(seen)) < len(seen):
        twice = next(v for v in seen if seen.count(v) > 1)
        raise GridError(f"grid: two values of an axis are one value to the config (point {twice}): list it once")
    labels = [point_label(values) for values in combos]
    shared = {label for label in labels if labels.count(label) > 1}
    labels = [  # two paths with one folder name: told apart by a hash of the values
        f"{label}~{hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:6]}" if label in shared
        else label for label, values in zip(labels, combos)]
    return [GridPoint(values, label, c.model_copy(update={"sweep": f"{cfg.sweep}/{label}"}))
            for values, label, c in zip(combos, labels, validated)]


def describe(grid_points: list[GridPoint]) -> str:
    """"a grid of 4 points (encoder.name x 2, train.lr x 2)" for logs."""
    first = grid_points[0]
    if not first.label:
        return "no grid (one point)"
    counts = {k: len({json.dumps(p.values[k], sort_keys=True) for p in grid_points}) for k in first.values}
    return f"a grid of {len(grid_points)} points (" + ", ".join(f"{k} x {n}" for k, n in counts.items()) + ")"


def run_key(point: GridPoint, label: str) -> str:
    """How the flows name a run of a point: `<point>/<run label>` (the run's folder below the sweep)."""
    return f"{point.label}/{label}" if point.label else label


# ---- shared stores ------------------------------------------------------------------------------------------------
def contexts(grid_points: list[GridPoint], settle=None) -> list:
    """Each point's `RunContext` (its encoder loaded and fingerprints computable), built for every point before
    anything runs, so that an encoder that cannot load fails first, naming its point. `settle`: a function applied
    to each point's config first (the extract flow's `with_encoder_settings`)."""
    from pipeline.layout import RunContext
    from spaceclip.encoder import EncoderLoadError

    out = []
    for p in grid_points:
        try:
            out.append(RunContext.of(settle(p.cfg) if settle else p.cfg))
        except (EncoderLoadError, ConfigError) as err:
            if not p.label:
                raise
            raise type(err)(f"grid point {p.label}: {err}") from None
    return out


def distinct_stores(ctxs: list, splits) -> dict[str, tuple[str, int]]:
    """store URL -> (split, index of the first point that reads it): what a grid's extraction writes, each store
    once however many points share its fingerprint."""
    out: dict[str, tuple[str, int]] = {}
    for i, ctx in enumerate(ctxs):
        for split in splits:
            out.setdefault(ctx.store_url(split), (split, i))
    return out


def check_grid_space(ctxs: list, splits) -> list[str]:
    """The disk estimate of every store the grid still has to write (`pipeline.diskspace.space_needed`, each
    distinct store once), checked against the free space of each cache root (`check_space`) before anything is
    extracted. Returns the estimate's lines."""
    from pipeline.diskspace import SizeEstimate, SpaceNeeded, check_space, space_needed

    stores = distinct_stores(ctxs, splits)
    by_root: dict[str, SpaceNeeded] = {}
    lines = []
    for url, (split, i) in stores.items():
        need, _ = space_needed(ctxs[i], [split])
        est, what = need.splits[split]
        root = by_root.setdefault(need.root, SpaceNeeded(need.root, need.where, need.free, {}, SizeEstimate()))
        root.splits[f"{split} {Path(url).name}"] = (est, what)
        root.total += est
    for root, need in by_root.items():
        lines += need.lines()
        check_space(need, next(c.cfg for c in ctxs if c.cfg.cache.root == root))
    return lines


def extract_grid(cfg: Config, splits=("train", "val", "test")) -> dict[str, str]:
    """Extract every distinct store of the config's grid in this process (no Prefect, no Dask; what tests use, as
    `pipeline.extract.extract_splits`): all points validated and the disk checked first. Returns {url: split}."""
    from pipeline import synth
    from pipeline.extract import finish_store, prepare_store
    from pipeline.layout import finalize_store

    ctxs = contexts(points(cfg))
    for data in {json.dumps(c.cfg.data.model_dump(mode="json"), sort_keys=True): c.cfg.data for c in ctxs}.values():
        synth.ensure(data)
    check_grid_space(ctxs, splits)
    out = {}
    for url, (split, i) in distinct_stores(ctxs, splits).items():
        store, _ = prepare_store(ctxs[i], split)
        finish_store(ctxs[i].cfg, store.url)
        finalize_store(store.url, chunks=set(range(store.n_chunks)) - store.verified)
        out[url] = split
    return out
