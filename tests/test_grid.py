"""Grids over config keys (pipeline/grid.py): points, folders and names; bad keys and values named before anything
runs; one extraction per store fingerprint whatever the grid (and `cache.layers: all`); a point's run byte-identical
to the same config trained alone; the grid's table, summary.csv and grid.png."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps


from pipeline.config import ConfigError, config_from_dict, dump_config, load_config
from pipeline.evaluate import Evaluation
from pipeline.grid import GridError, grid_override, parse_grid_option, points
from pipeline.layout import run_dir
from spaceclip.metrics import METRIC_KEYS


def derive(cfg, *overrides):
    return config_from_dict(dump_config(cfg), overrides=list(overrides))


def small(**grid):
    return config_from_dict({"sweep": "probe", "grid": grid, "train": {"seeds": [1, 2]}})


# ---- points, labels, folders --------------------------------------------------------------------------------------
def test_points_are_the_product_encoder_keys_first_with_their_own_folders(tmp_path):
    cfg = small(**{"train.lr": [0.01, 0.003], "encoder.name": ["tiny-clip", "/models/my-vit/"]})
    got = points(cfg)
    assert [p.label for p in got] == ["encoder.name=tiny-clip,train.lr=0.01", "encoder.name=tiny-clip,train.lr=0.003",
                                      "encoder.name=my-vit,train.lr=0.01", "encoder.name=my-vit,train.lr=0.003"]
    p = got[3]
    assert p.values == {"encoder.name": "/models/my-vit/", "train.lr": 0.003}
    assert p.cfg.encoder.name == "/models/my-vit/" and p.cfg.train.lr == 0.003 and p.cfg.grid == {}
    assert run_dir(p.cfg, "full", 2) == Path("runs/probe/encoder.name=my-vit,train.lr=0.003/full/seed-2")
    # the point's config is the config alone with those values, but for the sweep name (its folder)
    alone = derive(cfg, "grid={}", "encoder.name=/models/my-vit/", "train.lr=0.003")
    assert dump_config(p.cfg) == {**dump_config(alone), "sweep": "probe/encoder.name=my-vit,train.lr=0.003"}
    # no grid: one point, the config itself, today's folders
    plain = config_from_dict({"sweep": "probe"})
    (only,) = points(plain)
    assert only.label == "" and only.cfg is plain and run_dir(plain, "full") == Path("runs/probe/full")
    # list values name their folder with dashes; two paths with one last part are told apart
    layers = points(small(**{"decoder.semantic_layers": [[12, 9, 6, 3], [3, 2, 1, 0]]}))
    assert [q.label for q in layers] == ["decoder.semantic_layers=12-9-6-3", "decoder.semantic_layers=3-2-1-0"]
    same = points(small(**{"encoder.name": ["/a/vit", "/b/vit"]}))
    assert len({q.label for q in same}) == 2 and all(q.label.startswith("encoder.name=vit~") for q in same)


def test_grid_option_and_sweep_file_axes_merge(tmp_path):
    assert parse_grid_option("decoder.semantic_layers=[12,9,6,3],[11,8,5,2]") == (
        "decoder.semantic_layers", [[12, 9, 6, 3], [11, 8, 5, 2]])
    assert parse_grid_option("encoder.name=dinov2-small-imgfocus, dinov2-small-random") == (
        "encoder.name", ["dinov2-small-imgfocus", "dinov2-small-random"])
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"grid": {"train.lr": [0.01, 0.003]}}))
    cfg = load_config("demo", [grid_override("decoder.dropout=0.1,0.0")], sweep=str(sweep))
    assert cfg.grid == {"train.lr": [0.01, 0.003], "decoder.dropout": [0.1, 0.0]}
    # a point is named by its value as the config reads it: 1e-2 (a string to YAML 1.1) is train.lr=0.01
    assert [p.label for p in points(small(**{"train.lr": ["1e-2", 3e-3]}))] == ["train.lr=0.01", "train.lr=0.003"]
    with pytest.raises(GridError, match="two values of an axis are one value"):
        points(small(**{"train.lr": ["1e-2", 0.01]}))
    assert len(points(cfg)) == 4 and {p.cfg.decoder.dropout for p in points(cfg)} == {0.1, 0.0}


def test_the_grid_option_reaches_the_flows_as_an_override(flow_calls):
    from flows.cli import main

    assert main(["train", "--grid", "train.epochs=1,2", "--set", "train.lr=0.1"]) == 0
    assert flow_calls[-1]["overrides"] == ["train.lr=0.1", "grid.train.epochs=[1, 2]"]


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid, words", [
    ({"train.lrr": [1, 2]}, ["unknown key 'train.lrr'", "train has no key 'lrr'"]),
    ({"trian.lr": [1, 2]}, ["unknown key 'trian.lr'", "no key 'trian'"]),
    ({"train.lr.x": [1]}, ["'train.lr.x'", "train.lr is a value"]),
    ({"decoder": [1]}, ["'decoder' is a section"]),
    ({"train.seeds": [[1], [2]]}, ["'train.seeds' cannot be a grid axis", "--seeds"]),
    ({"train.epochs": [1, 0]}, ["grid point train.epochs=0", "train.epochs = 0 fails", "greater than or equal to 1"]),
    ({"decoder.semantic_layers": [[12, 9, 6, 3], [12, 9]], "train.lr": [0.1]},
     ["grid point decoder.semantic_layers=12-9,train.lr=0.1", "decoder.semantic_layers = [12, 9] fails",
      "one semantic layer per decoder stage"]),
    ({"encoder.image_size": [168, "big"]}, ["encoder.image_size=big", "encoder.image_size = 'big'"]),
])
def test_bad_grid_keys_and_values_are_named_in_one_line(grid, words):
    with pytest.raises(GridError) as err:
        points(small(**grid))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_axes_fail_at_load_and_on_the_command_line(capsys, flow_calls):
    with pytest.raises(ConfigError, match="grid axis 'train.lr' lists 0.1 more than once"):
        small(**{"train.lr": [0.1, 0.1]})
    with pytest.raises(ConfigError, match="grid axis 'train.lr' has no values"):
        small(**{"train.lr": []})
    from flows.cli import main

    assert main(["run", "--grid", "train.lrr=1,2"]) == 2
    assert "unknown key 'train.lrr'" in capsys.readouterr().err

    assert main(["train", "--grid", "train.epochs=1,0"]) == 2  # before any server or training starts
    assert "grid point train.epochs=0: train.epochs = 0 fails" in capsys.readouterr().err
    assert flow_calls == []


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_bad_point_or_a_full_disk_stops_the_grid_before_anything_is_written(fast_cfg, tmp_path, monkeypatch):
    from pipeline import diskspace
    from pipeline.grid import contexts, distinct_stores, extract_grid

    root = tmp_path / "cache"
    bad = derive(fast_cfg, f"cache.root={root}", "grid={'train.lr': [0.1], 'encoder.image_size': [64, 65]}")
    with pytest.raises(Exception, match="grid point encoder.image_size=65,train.lr=0.1: .*not a multiple of its "
                                        "patch size 16"):
        extract_grid(bad)  # the first point is fine; the second's encoder refuses: nothing written for either
    assert not root.exists()
    cfg = derive(bad, "grid={'encoder.image_size': [64, 32], 'train.lr': [0.1, 0.2]}")
    ctxs = contexts(points(cfg))
    stores = distinct_stores(ctxs, ["train", "val", "test"])
    assert len(stores) == 6  # two encoder inputs x three splits; train.lr shares them
    need = sum(diskspace.space_needed(ctxs[i], [split])[0].total.low for split, i in stores.values())
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: type("U", (), {"free": need - 1})())
    with pytest.raises(diskspace.DiskSpaceError, match="not enough disk space") as err:
        extract_grid(cfg)
    assert f"{need / 1e6:.2f} MB" in str(err.value) or f"{need / 1e9:.2f} GB" in str(err.value)
    assert not root.exists()


# ---- one extraction per fingerprint -------------------------------------------------------------------------------
@pytest.mark.slow  # extracts six small stores
def test_each_store_is_extracted_once_whatever_the_grid(fast_cfg, tmp_path, monkeypatch):
    from pipeline import extract
    from pipeline.grid import contexts, extract_grid
    from pipeline.store import FeatureStore

    calls: list[tuple[str, int]] = []
    real = extract.extract_chunks

    def counting(cfg, url, chunks, *args, **kwargs):
        calls.extend((url, c) for c in chunks)
        return real(cfg, url, chunks, *args, **kwargs)

    monkeypatch.setattr(extract, "extract_chunks", counting)
    # 2 encoder inputs x 2 layer choices x 2 learning rates = 8 points; with cache.layers: all they read 2 x 3 stores
    cfg = derive(fast_cfg, f"cache.root={tmp_path / 'cache'}", "cache.layers=all", "grid={'encoder.image_size': "
                 "[64, 32], 'decoder.semantic_layers': [[12, 9, 6, 3], [11, 8, 5, 2]], 'train.lr': [0.01, 0.02]}")
    grid_points = points(cfg)
    assert len(grid_points) == 8
    stores = extract_grid(cfg)
    assert len(stores) == 6
    assert len(calls) == len(set(calls))  # no chunk encoded twice
    for url in stores:
        store = FeatureStore.open(url)
        assert store.complete and store.layers == tuple(range(13))  # every hidden state of the 12-block encoder
        assert sorted(c for u, c in calls if u == url) == list(range(store.n_chunks))
    ctxs = contexts(grid_points)
    assert {c.store_url("train") for c in ctxs} == {u for u, s in stores.items() if s == "train"}
    # `all` is the explicit list of every state: the same fingerprint, the same store
    explicit = contexts(points(derive(cfg, "cache.layers=[0,1,2,3,4,5,6,7,8,9,10,11,12]")))
    assert [c.fingerprint("train") for c in explicit] == [c.fingerprint("train") for c in ctxs]
    calls.clear()
    assert extract_grid(derive(cfg, "grid.train.lr=[0.03]")) == stores and calls == []  # reused, never redone


# ---- a point's run is the run of its config alone -----------------------------------------------------------------
@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_grid_points_run_is_bit_identical_to_its_config_trained_alone(fast_cfg, tmp_path):
    from pipeline.train import train_variants

    cfg = derive(fast_cfg, f"train.out_dir={tmp_path / 'runs'}", "train.epochs=1", "sweep=g",
                 "decoder.channels=[16,8,8,8]", "train.num_threads=1", "grid={'train.lr': [0.01, 0.005]}")
    point = points(cfg)[1]
    result = train_variants(point.cfg, ["baseline"])["baseline"]
    assert result.run_dir == tmp_path / "runs" / "g" / "train.lr=0.005" / "baseline"
    alone = derive(cfg, "grid={}", "train.lr=0.005", "sweep=alone")
    train_variants(alone, ["baseline"])
    for ckpt in ("best", "last"):
        assert (result.run_dir / ckpt / "model.safetensors").read_bytes() == (
            tmp_path / "runs" / "alone" / "baseline" / ckpt / "model.safetensors").read_bytes()


# ---- the grid's table and figure ----------------------------------------------------------------------------------
def grid_results(seeds=(1, 2, 3)):
    """Two points (pretrained, random) x two variants x seeds x 6 images: the random encoder worse by 0.1."""
    from tests.test_tables import protocol

    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 0.03, 6)
    cfg = config_from_dict({"sweep": "bb", "grid": {"encoder.name": ["pre", "rand"]}})
    out = []
    for p, effect in zip(points(cfg), (0.0, 0.1)):
        rows = []
        for v, v_effect in (("baseline", 0.0), ("full", -0.02)):
            for s in seeds:
                values = 0.2 + effect + v_effect + rng.normal(0, 0.005) + difficulty + rng.normal(0, 0.002, 6)
                rows += [{"variant": v, "seed": s, "id": f"img{i}", "line": i + 1, "gt_h": 4, "gt_w": 4,
                          "valid_px": 16, **{k: x for k in METRIC_KEYS}, "d1": 1 - x} for i, x in enumerate(values)]
        pr = protocol(seeds=list(seeds), sweep=p.cfg.sweep, encoder=p.values["encoder.name"])
        out.append((p, Evaluation(pd.DataFrame(rows), pr["counts"], pr, {}, [], pd.DataFrame(
            columns=["id", "line", "reason"]))))
    return out


def interval(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95 % interval, written out from pipeline/stats.py's docstring."""
    ma, mb = a.groupby("seed")["abs_rel"].mean(), b.groupby("seed")["abs_rel"].mean()
    d = a.groupby("id")["abs_rel"].mean() - b.groupby("id")["abs_rel"].mean()
    terms = [(ma.var() / len(ma), len(ma) - 1), (mb.var() / len(mb), len(mb) - 1), (d.var() / len(d), len(d) - 1)]
    se = math.sqrt(sum(t for t, _ in terms))
    df = sum(t for t, _ in terms) ** 2 / sum(t * t / k for t, k in terms)
    half = sps.t.ppf(0.975, df) * se
    diff = ma.mean() - mb.mean()
    return diff, diff - half, diff + half


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_grid_table_summary_and_figure(tmp_path):
    from pipeline.grid_figures import write_grid_figure
    from pipeline.tables import grid_stats, write_grid_tables

    results = grid_results()
    paths = write_grid_tables(results, tmp_path)
    frame = pd.read_csv(paths["grid_csv"])
    assert list(frame[["encoder.name", "variant"]].itertuples(index=False, name=None)) == [
        ("pre", "baseline"), ("pre", "full"), ("rand", "baseline"), ("rand", "full")]
    (_, pre), (_, rand) = results
    full_pre = pre.per_image[pre.per_image.variant == "full"]
    full_rand = rand.per_image[rand.per_image.variant == "full"]
    row = frame[(frame["encoder.name"] == "rand") & (frame.variant == "full")].iloc[0]
    m = full_rand.groupby("seed")["abs_rel"].mean()
    assert row["n"] == 3 and row["abs_rel_mean"] == pytest.approx(m.mean()) and row["abs_rel_sd"] == pytest.approx(
        m.std(ddof=1))
    diff, low, high = interval(full_rand, full_pre)  # against the same variant at the reference point
    assert (row["vs_point_diff"], row["vs_point_low"], row["vs_point_high"]) == pytest.approx((diff, low, high))
    assert row["vs_point_significant"] and low > 0.05
    diff, low, high = interval(full_rand, rand.per_image[rand.per_image.variant == "baseline"])
    assert (row["vs_variant_diff"], row["vs_variant_low"], row["vs_variant_high"]) == pytest.approx((diff, low, high))
    md = paths["table_md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| encoder.name"))
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["encoder.name", "Variant", "n"]
    line = next(line for line in md.splitlines() if line.startswith("| rand ") and "| full " in line)
    diff, low, high = interval(full_rand, full_pre)
    assert f"+{diff:.4f} [+{low:.4f}, +{high:.4f}]†" in line and f"{m.mean():.4f} ± {m.std(ddof=1):.4f}" in line
    summary = pd.read_csv(paths["summary"])  # one row per point x variant x seed, a column per key
    assert list(summary.columns[:4]) == ["point", "encoder.name", "variant", "seed"] and len(summary) == 12
    one = summary[(summary["encoder.name"] == "pre") & (summary.variant == "full") & (summary.seed == 2)]
    assert one["abs_rel"].item() == pytest.approx(full_pre[full_pre.seed == 2]["abs_rel"].mean())
    png = write_grid_figure(grid_stats(results), ["encoder.name"], tmp_path)
    assert png.stat().st_size > 10_000
    # two varied keys: a heatmap per variant
    two = [(dataclasses.replace(p, values={**p.values, "train.lr": lr}, label=f"{p.label},train.lr={lr}"), ev)
           for lr in (0.1, 0.2) for p, ev in results]
    (tmp_path / "two").mkdir()
    assert write_grid_figure(grid_stats(two), ["encoder.name", "train.lr"], tmp_path / "two").stat().st_size > 10_000


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_grid_figure_joins_points_only_along_a_numeric_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from pipeline.grid_figures import write_grid_figure
    from pipeline.tables import grid_stats

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    results = grid_results()
    write_grid_figure(grid_stats(results), ["encoder.name"], tmp_path)  # categories: "pre", "rand"
    numeric = [(dataclasses.replace(p, values={"train.lr": lr}, label=f"train.lr={lr}"), ev)
               for lr, (p, ev) in zip((0.01, 0.02), results)]
    write_grid_figure(grid_stats(numeric), ["train.lr"], tmp_path)
    styles = [{c.lines[0].get_linestyle() for c in fig.axes[0].containers} for fig in drawn]  # the data lines
    assert styles[0] == {"None"} and "None" not in styles[1] and styles[1]


@pytest.mark.slow  # builds and hashes a 22 M-parameter ViT twice
def test_random_dinov2_preset_is_the_pretrained_architecture_with_seeded_weights():
    from pipeline import imgfocus
    from spaceclip.encoder import FrozenEncoder

    a, b = FrozenEncoder.from_name("dinov2-small-random", image_size=56), FrozenEncoder.from_name(
        "dinov2-small-random", image_size=56)
    ident = a.identity()
    assert (ident["model_type"], ident["width"], ident["num_layers"], ident["patch_size"], ident["grid"]) == (
        "dinov2", imgfocus.CONFIG["hidden_size"], imgfocus.CONFIG["num_hidden_layers"], 14, 4)
    assert ident["weights_sha256"] == b.identity()["weights_sha256"]  # the same weights every time (seed 0)
    import torch

    feats = a(torch.zeros(1, 3, 56, 56), [0, 12])
    assert feats["tokens"][12].shape == (1, 4, 4, 384) and feats["global"].shape == (1, 384)
