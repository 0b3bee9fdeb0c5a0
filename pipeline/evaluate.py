"""Stage 3: full-image evaluation of trained decoder variants on the test split, read from the test feature cache.

    evaluate_run(ctx, ["baseline", "full"])  ->  Evaluation      (ctx: a `RunContext`, or a config)
        per_image    one row per (variant, seed, image): every metric of `spaceclip.metrics.compute_metrics`
        counts       test lines, evaluated, skipped with GT `None`, unreadable, without a valid GT pixel
        protocol     what every table states (docs/design.md): dataset, split, crop, range, options, checkpoints,
                     provenance
        samples      a few images with their GT and every variant's prediction, for the qualitative figure

The protocol (docs/design.md "Evaluation protocol"), per test frame with ground truth:
  1. the decoder predicts at its native 16g x 16g from the cached full-frame tokens;
  2. with `eval.flip_tta`, it also predicts from the tokens flipped along their width (feature space, as in
     training) or, with `eval.flip_tta_source=pixels`, from the mirrored test image's own features (extracted into
     the test store beside the plain ones), and the flipped-back prediction is averaged in;
  3. the prediction is resized **bilinearly to the native GT resolution** (about 375 x 1242 for KITTI), or with
     `eval.gt_resolution=352x704` (KITTI; the authors' release protocol) the GT is resized nearest-neighbour to
     352 x 704 (as PIL does in their loader) and the prediction bilinearly to that;
  4. `eval.alignment`: `none`, `median` (per-image median scaling; `eval.median_scaling=true` is the same) or
     `lstsq` (per-image least-squares scale and shift in depth space over the valid pixels, the zero-shot protocol
     of relative-depth models);
  5. `compute_metrics` with the crop (`garg` / `eigen` / `none` for KITTI, `nyu` for NYU) and the depth range of
     `data.depth_range`: the one metrics function, as in training validation.
GT `None` lines (45 of the 697 KITTI Eigen test lines) are skipped and counted; so is a frame whose GT has no valid
pixel inside the crop. The mean over images is `mean_metrics` (each image weighs the same).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline import datasets
from pipeline.config import Config, ConfigError
from pipeline.errors import SpaceClipError
from pipeline.layout import RunContext, package_versions, resolve_device
from pipeline.loader import Batch, CachedBatches, flip_features
from pipeline.store import FeatureStore
from spaceclip.decoder import VARIANTS, SpaceClipDecoder, resize
from spaceclip.metrics import METRIC_KEYS, compute_metrics, crop_mask, mean_metrics, valid_mask

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CROPS_FOR_LAYOUT = {"kitti": ("garg", "eigen", "none"), "nyu": ("nyu", "none")}
GT_RESOLUTIONS = {"native": None, "352x704": (352, 704)}  # eval.gt_resolution -> (H, W) the GT is resized to
SELECTION = {
    "best": "best = lowest validation AbsRel (validation carved from train by drive/scene, never test)",
    "last": "last epoch (no selection)",
}
# A predictor maps a test `Batch` (its `features` and the frames' `index`) to depth (B, h, w) in metres, at any
# resolution. A trained decoder is one (it reads `batch.features` only); tests inject others (e.g. one that returns
# 1.1 x the ground truth of the frames at `batch.index`).
Predictor = Callable[[Batch], torch.Tensor]


class EvaluationError(SpaceClipError, RuntimeError):
    """A checkpoint is missing or does not belong to this config, or nothing could be evaluated; the message says
    which and what to run."""


@dataclass
class Checkpoint:
    variant: str
    path: Path
    model: SpaceClipDecoder
    epoch: int | None
    val_abs_rel: float | None
    train_fingerprint: str | None
    imported: dict | None = None  # `spaceclip import` of an authors' checkpoint: not trained from our cache
    seed: int | None = None


@dataclass(frozen=True)
class RunKey:
    """One trained run of a sweep: a variant and its seed. `label` names it in tables, logs and dict keys: the
    variant, or `<variant>/seed-<s>` (its folder below the sweep) when the sweep has several seeds."""

    variant: str
    seed: int
    label: str


def sweep_runs(cfg: Config, variants: Sequence[str] | None = None) -> list[RunKey]:
    """Every (variant, seed) run to evaluate, variant by variant (`train.variants` x `train.seeds`)."""
    from pipeline.train import run_label

    tc = cfg.train
    return [RunKey(v, s, run_label(tc, v, s)) for v in dict.fromkeys(variants or tc.variants) for s in tc.seed_list]


@dataclass
class Example:
    """One qualitative example: the input, its GT and each run's prediction at GT resolution (metres)."""

    id: str
    image_path: str
    gt: np.ndarray  # (H, W) float32, 0 = no measurement
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # run label -> (H, W) float32
    metrics: dict[str, dict] = field(default_factory=dict)  # run label -> metrics of this image


@dataclass
class Evaluation:
    per_image: pd.DataFrame  # one row per (variant, seed, image)
    counts: dict
    protocol: dict
    checkpoints: dict[str, dict]  # run label -> {"variant", "seed", "path", "epoch", "val_abs_rel", ...}
    samples: list[Example]  # the qualitative examples
    skipped: pd.DataFrame  # id, line, reason of every test line that was not evaluated
    # runs of the sweep that were not evaluated (`eval.allow_partial`): label -> why (missing / unfinished)
    missing_runs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if "seed" not in self.per_image:  # made by hand without seeds: one run per variant, the sweep's seed
            self.per_image = self.per_image.copy()
            self.per_image.insert(1, "seed", (self.protocol.get("seeds") or [0])[0])

    def summary(self) -> pd.DataFrame:
        """The mean over images per (variant, seed) run, through the one `mean_metrics`."""
        rows = []
        for (variant, seed), group in self.per_image.groupby(["variant", "seed"], sort=False, dropna=False):
            film, structural = VARIANTS.get(variant, (None, None))
            ckpt = next((c for c in self.checkpoints.values() if (c.get("variant"), c.get("seed")) == (variant, seed)),
                        self.checkpoints.get(variant, {}))
            rows.append({
                "variant": variant, "seed": seed, "film": film, "structural": structural, "n_images": len(group),
                **mean_metrics(group[list(METRIC_KEYS)].to_dict("records")),
                "checkpoint_epoch": ckpt.get("epoch"), "checkpoint_val_abs_rel": ckpt.get("val_abs_rel"),
            })
        return pd.DataFrame(rows)


# ---- what to evaluate -----------------------------------------------------------------------------------------
def resolve_crop(cfg: Config) -> str:
    crop = cfg.eval_crop
    allowed = CROPS_FOR_LAYOUT[cfg.data.layout]
    if crop not in allowed:
        raise ConfigError(f"eval.crop {crop!r} does not apply to {cfg.data.layout} ground truth; use one of "
                          f"{list(allowed)}")
    return crop


def resolve_alignment(cfg: Config) -> str:
    """`eval.alignment`, or `median` / `none` from `eval.median_scaling` when it is not set; a contradiction fails."""
    ev = cfg.eval
    if ev.alignment is None:
        return "median" if ev.median_scaling else "none"
    if ev.median_scaling and ev.alignment != "median":
        raise ConfigError(f"eval.median_scaling=true contradicts eval.alignment={ev.alignment}; set only one of them")
    return ev.alignment


def resolve_gt_resolution(cfg: Config) -> tuple[int, int] | None:
    """(H, W) the GT is resized to, or None for its native resolution."""
    size = GT_RESOLUTIONS[cfg.eval.gt_resolution]
    if size is not None and cfg.data.layout != "kitti":
        raise ConfigError(f"eval.gt_resolution={cfg.eval.gt_resolution} is the authors' KITTI protocol; "
                          f"{cfg.data.layout} ground truth is evaluated at its native resolution")
    return size


def resize_gt_nearest(gt: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) metres -> (h, w) by nearest neighbour, exactly as PIL `Image.resize(..., NEAREST)` on the depth PNG
    (the authors' loader); 0 stays "no measurement"."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(gt, dtype=np.float32), mode="F")
    return np.asarray(img.resize((hw[1], hw[0]), Image.NEAREST), dtype=np.float32)


def lstsq_align(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(s * pred + t, s, t), (s, t) = argmin sum over valid pixels of (s * pred + t - gt)^2 (float64)."""
    p = pred[valid].astype(np.float64)
    design = np.stack([p, np.ones_like(p)], axis=1)  # (n, 2)
    (s, t), *_ = np.linalg.lstsq(design, gt[valid].astype(np.float64), rcond=None)
    return s * pred.astype(np.float64) + t, float(s), float(t)


def unfinished_runs(ctx: RunContext, runs: Sequence[RunKey]) -> dict[str, str]:
    """The runs of a several-seed sweep that cannot be averaged yet: label -> why (no checkpoint, or training not
    finished: its `last/` checkpoint is of an earlier epoch than `train.epochs`)."""
    cfg, out = ctx.cfg, {}
    for run in runs:
        folder = ctx.run_dir(run.variant, run.seed)
        if not (folder / cfg.eval.checkpoint / "model.safetensors").is_file():
            out[run.label] = f"no checkpoint at {folder / cfg.eval.checkpoint}"
            continue
        last = folder / "last" / "config.json"
        epoch = json.loads(last.read_text()).get("epoch") if last.is_file() else None
        if epoch is not None and int(epoch) < cfg.train.epochs:
            out[run.label] = f"trained {epoch} of {cfg.train.epochs} epochs ({folder})"
    return out


def runs_to_evaluate(ctx: RunContext, variants: Sequence[str] | None = None) -> tuple[list[RunKey], dict[str, str]]:
    """(the runs to evaluate, the sweep's runs left out and why). With several seeds, a missing or unfinished run
    fails here, naming each (a mean over fewer seeds than the sweep has is never taken silently), unless
    `eval.allow_partial` is set: then the finished runs are evaluated and each table cell states its n."""
    cfg = ctx.cfg
    runs = sweep_runs(cfg, variants)
    if not cfg.train.multi_seed:
        return runs, {}
    left = unfinished_runs(ctx, runs)
    if left and not cfg.eval.allow_partial:
        raise EvaluationError(
            f"{len(left)} of the {len(runs)} runs of sweep {cfg.sweep!r} (seeds {cfg.train.seed_list}) are not "
            "finished: " + "; ".join(f"{k}: {why}" for k, why in left.items()) + ". Train them first (`spaceclip "
            f"train --config {cfg.name}` resumes them), or evaluate what exists with --allow-partial "
            "(eval.allow_partial=true): each cell then states its number of seeds")
    kept = [r for r in runs if r.label not in left]
    if not kept:
        raise EvaluationError(f"no finished run in sweep {cfg.sweep!r}: " + "; ".join(f"{k}: {why}" for k, why in
                                                                                    left.items()))
    return kept, left


def load_checkpoints(ctx: RunContext, variants: Sequence[str] | Sequence[RunKey]) -> dict[str, Checkpoint]:
    """The `best/` (or `last/`) checkpoint of each run (a variant name: its run with the config's first seed),
    keyed by run label, checked against this config: it must have been trained on features of this encoder, from
    this config's training cache."""
    cfg, encoder = ctx.cfg, ctx.encoder_identity
    weights = encoder["weights_sha256"]
    train_fp = ctx.fingerprint("train")
    out = {}
    for run in variants:
        if isinstance(run, str):
            run = sweep_runs(cfg, [run])[0]
        variant = run.variant
        path = ctx.checkpoint_dir(variant, run.seed)
        if not (path / "model.safetensors").is_file():
            raise EvaluationError(
                f"no {cfg.eval.checkpoint!r} checkpoint for run {run.label!r} at {path}; train it first "
                f"(`spaceclip train --config {cfg.name} --variants {variant}`, or `spaceclip run` for the whole DAG)"
            )
        try:
            model = SpaceClipDecoder.from_pretrained(path)
        except (ValueError, FileNotFoundError) as err:
            raise EvaluationError(f"checkpoint {path} cannot be loaded: {err}") from None
        extra = model.checkpoint_config
        if model.variant != variant:
            raise EvaluationError(f"{path} holds a {model.variant!r} decoder, not {variant!r}")
        found = (extra.get("encoder") or {}).get("weights_sha256")
        if found != weights:
            raise EvaluationError(
                f"{path} was trained on features of encoder {extra.get('encoder', {}).get('name')!r} (weights "
                f"{str(found)[:12]}), but this config's encoder is {encoder['name']!r} (weights {weights[:12]}); "
                "evaluate with the config it was trained with, or retrain"
            )
        if extra.get("imported") is None and extra.get("cache_fingerprint") != train_fp:
            raise EvaluationError(
                f"{path} was trained from training cache {extra.get('cache_fingerprint')}, but this config's "
                f"training cache is {train_fp} (views, layers, split or encoder differ); retrain it "
                f"(`spaceclip train --config {cfg.name} --variants {variant} --no-resume`) or use another --sweep"
            )
        metric = (extra.get("val_metric") or {}).get("value")
        out[run.label] = Checkpoint(variant, path, model.eval(), extra.get("epoch"),
                                    None if metric is None else float(metric), extra.get("cache_fingerprint"),
                                    extra.get("imported"), run.seed)
    return out


def preflight(ctx: RunContext) -> None:
    """Everything `evaluate_run` needs, checked before any work starts: the crop, the alignment, the GT size, the
    test cache and each variant's checkpoint (`train.variants`). Raises `ConfigError` / `StoreError` /
    `EvaluationError`."""
    resolve_protocol(ctx.cfg)
    ctx.open_store("test")
    load_checkpoints(ctx, runs_to_evaluate(ctx)[0])


def resolve_protocol(cfg: Config) -> tuple[str, str, tuple[int, int] | None]:
    """(crop, alignment, GT size) of this config's evaluation, or the `ConfigError` of the first that does not
    apply."""
    return resolve_crop(cfg), resolve_alignment(cfg), resolve_gt_resolution(cfg)


def decoder_predictor(model: SpaceClipDecoder, device: torch.device) -> Predictor:
    model = model.to(device).eval()

    def predict(batch: Batch) -> torch.Tensor:
        return model(batch.features)["depth"][:, 0]  # (B, 16g, 16g): the decoder's native resolution

    predict.layers = model.layers
    return predict


# ---- prediction ---------------------------------------------------------------------------------------------------
def predict_batch(
    predictor: Predictor, batch: Batch, flip_tta: bool, mirrored_batch: Batch | None = None
) -> torch.Tensor:
    """(B, h, w) depth; with `flip_tta` the mean of the prediction and the flipped-back prediction of the mirrored
    input: `mirrored_batch` (the mirrored test images' own features, `eval.flip_tta_source=pixels`) when given,
    else the width-flipped token grids (the global vector unchanged: docs/design.md's feature-space flip)."""
    pred = predictor(batch)  # (B, h, w)
    if flip_tta:
        if mirrored_batch is None:
            flips = torch.ones(pred.shape[0], dtype=torch.bool)
            mirrored_batch = batch._replace(features=flip_features(batch.features, flips), flipped=flips)
        mirrored = predictor(mirrored_batch)  # (B, h, w), of the mirrored scene
        pred = 0.5 * (pred + mirrored.flip(-1))
    return pred


def to_gt_resolution(pred: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) prediction -> (H, W) numpy, bilinear with align_corners=False (as the decoder resizes). Half
    precision is widened first; float32/float64 keep their dtype."""
    x = pred[None, None]  # (1, 1, h, w)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return resize(x, hw)[0, 0].cpu().numpy()  # (H, W)


def load_gt(row: dict, split_file: str, layout: str) -> np.ndarray:
    """(H, W) float32 metres of a test row with ground truth (the file named by its split line)."""
    return datasets.load_depth(datasets.sample_from_row(row, split_file), layout)


def qualitative_positions(candidates: np.ndarray, k: int) -> set[int]:
    """`k` test frames spread evenly over the evaluated ones (deterministic: the same frames in every run)."""
    if k <= 0 or len(candidates) == 0:
        return set()
    picks = np.unique(np.linspace(0, len(candidates) - 1, min(k, len(candidates))).round().astype(int))
    return {int(candidates[i]) for i in picks}


# ---- the evaluation ---------------------------------------------------------------------------------------------
def evaluate_run(
    ctx: RunContext | Config,
    variants: Sequence[str] | None = None,
    *,
    predictors: dict[str | tuple[str, int], Predictor] | None = None,
    progress: bool = False,
    on_variant: Callable[[str, dict], None] | None = None,
) -> Evaluation:
    """Evaluate each run's checkpoint, every variant (default: `train.variants`) with every seed of `train.seeds`
    (or the given `predictors`: variant name, or (variant, seed), -> predictor) on every test frame with ground
    truth. `on_variant(run label, mean_metrics)` is called at the
    end, once per variant."""
    started = time.perf_counter()
    ctx = RunContext.of(ctx)
    cfg = ctx.cfg
    crop, alignment, gt_size = resolve_protocol(cfg)
    lo, hi = cfg.data.depth_range
    ev = cfg.eval
    store = ctx.open_store("test")  # refuses a store whose fingerprint does not match, saying what differs
    device = resolve_device(cfg.train.device)
    if predictors is None:
        runs, missing = runs_to_evaluate(ctx, variants)
        checkpoints = load_checkpoints(ctx, runs)
        predictors = {r.label: decoder_predictor(checkpoints[r.label].model, device) for r in runs}
    else:
        runs = [RunKey(k[0], k[1], f"{k[0]}/seed-{k[1]}") if isinstance(k, tuple) else
                RunKey(k, cfg.train.seed_list[0], k) for k in predictors]
        predictors, checkpoints, missing = {r.label: fn for r, fn in zip(runs, predictors.values())}, {}, {}
    variants = [r.label for r in runs]
    layers = sorted(set().union(*(getattr(p, "layers", store.layers) for p in predictors.values())))
    pixel_flips = cfg.pixel_flip_tta
    if pixel_flips and not store.has_flipped:  # the fingerprint says it has them; a renamed store might not
        raise EvaluationError(f"eval.flip_tta_source=pixels, but {store.url} holds no mirrored-image features; "
                              "extract the test split again with this config")

    index = store.index()
    records = index.to_dict("records")
    has_gt = index["depth_path"].to_numpy() != ""
    unreadable = index["skipped"].to_numpy().astype(bool)
    todo = np.flatnonzero(has_gt & ~unreadable)
    log.info("evaluating %s on %d of %d test frames (%d with GT None%s) from %s: crop %s, range (%g, %g], "
             "alignment %s, GT %s, flip TTA %s", ", ".join(variants), len(todo), store.n, int((~has_gt).sum()),
             f", {int(unreadable.sum())} unreadable" if unreadable.any() else "", store.url, crop, lo, hi,
             alignment, ev.gt_resolution, f"on ({ev.flip_tta_source})" if ev.flip_tta else "off")
    # The test frames with ground truth, in split order, through the training loader (streamed: whole chunks,
    # with the mirrored images' features for pixel flip TTA).
    loader = CachedBatches(store, layers, ev.batch_size, train=False, cache_device="stream", device=device,
                           positions=todo, mirrored=pixel_flips)
    scored = _score(cfg, loader, records, runs, predictors, qualitative_positions(todo, ev.qualitative),
                    progress)
    rows, examples, no_valid, bad_gt = scored

    per_image = pd.DataFrame(rows, columns=["variant", "seed", "id", "line", "gt_h", "gt_w", "valid_px", *METRIC_KEYS])
    planning = store.attrs.get("skipped_at_planning") or []
    skipped = _skipped_table(records, has_gt, unreadable, planning, bad_gt, no_valid)
    counts = {
        "lines": store.n + len(planning), "evaluated": len(todo) - len(no_valid) - len(bad_gt),
        "gt_none": int((~has_gt).sum()),
        "unreadable": int((unreadable & has_gt).sum()) + len(planning) + len(bad_gt),
        "no_valid_pixels": len(no_valid),
    }
    if counts["evaluated"] == 0:
        raise EvaluationError(f"no test frame could be evaluated: {counts} ({store.attrs['split_file']})")
    checkpoint_info = {v: {"variant": c.variant, "seed": c.seed, "path": str(c.path), "epoch": c.epoch, "val_abs_rel": c.val_abs_rel,
                           "train_fingerprint": c.train_fingerprint, "imported": c.imported}
                       for v, c in checkpoints.items()}
    seconds = time.perf_counter() - started
    protocol = protocol_of(cfg, store, ctx.encoder_identity, crop, counts, checkpoint_info, seconds)
    evaluation = Evaluation(per_image, counts, protocol, checkpoint_info, examples, skipped, missing)
    for run, record in zip(runs, evaluation.summary().to_dict("records")):
        log.info("%s: AbsRel %.4f  SqRel %.4f  RMSE %.3f  RMSE log %.4f  d1 %.4f  d2 %.4f  d3 %.4f  (%d images)",
                 run.label, *(record[k] for k in ("abs_rel", "sq_rel", "rmse", "rmse_log", "d1", "d2", "d3")),
                 record["n_images"])
        if on_variant is not None:
            on_variant(run.label, {k: record[k] for k in METRIC_KEYS} | {"n_images": record["n_images"]})
    return evaluation


def _score(cfg: Config, loader: CachedBatches, records: list[dict], runs: list, predictors: dict, shown: set[int],
           progress: bool) -> tuple[list, list, list, list]:
    """Every run's prediction of every batch of `loader`, scored against each frame's ground truth (read ahead
    in a small pool while the batch is predicted). Returns (metric rows, examples, frames without a valid pixel,
    frames whose ground truth could not be read)."""
    crop, alignment, gt_size = resolve_protocol(cfg)
    lo, hi = cfg.data.depth_range
    ev, split_file = cfg.eval, loader.store.attrs["split_file"]
    rows, examples, no_valid, bad_gt = [], [], [], []

    def read_gt(p: int) -> np.ndarray | datasets.DatasetError:
        try:
            return load_gt(records[p], split_file, cfg.data.layout)
        except datasets.DatasetError as err:
            if cfg.data.on_error == "raise":
                raise
            return err

    bar = tqdm(total=loader.n_usable, desc="evaluate", unit="img", disable=not progress)
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=2) as pool:
        for batch in loader.epoch(0):
            gts = pool.map(read_gt, batch.index)  # decoded while the batch is predicted
            mirrored = None
            if batch.mirrored is not None:  # pixel flip TTA: the mirrored images' own features
                mirrored = batch._replace(features=batch.mirrored, flipped=~batch.flipped, mirrored=None)
            preds = {v: predict_batch(fn, batch, ev.flip_tta, mirrored) for v, fn in predictors.items()}  # (B, h, w)
            for j, (p, gt) in enumerate(zip(batch.index, gts)):  # gt: (H, W) metres
                row = records[p]
                if isinstance(gt, datasets.DatasetError):
                    bad_gt.append({"id": row["id"], "line": int(row["line"]), "reason": str(gt)})
                    log.warning("skipping %s: %s", row["id"], gt)
                    continue
                if gt_size is not None:
                    gt = resize_gt_nearest(gt, gt_size)  # (352, 704): the authors' release protocol
                valid = valid_mask(gt, lo, hi) & crop_mask(gt.shape, crop)
                if not valid.any():
                    reason = f"no valid ground-truth pixel in ({lo:g}, {hi:g}) inside crop {crop}"
                    no_valid.append({"id": row["id"], "line": int(row["line"]), "reason": reason})
                    log.warning("skipping %s: %s", row["id"], reason)
                    continue
                example = Example(row["id"], row["image_path"], gt) if int(p) in shown else None
                for run in runs:
                    full = to_gt_resolution(preds[run.label][j], gt.shape)  # (H, W)
                    if alignment == "lstsq":
                        full = lstsq_align(full, gt, valid)[0]
                    m = compute_metrics(full, gt, crop=crop, min_depth=lo, max_depth=hi,
                                        median_scaling=alignment == "median")
                    rows.append({"variant": run.variant, "seed": run.seed, "id": row["id"], "line": int(row["line"]),
                                 "gt_h": gt.shape[0], "gt_w": gt.shape[1], "valid_px": int(valid.sum()), **m})
                    if example is not None:
                        example.predictions[run.label], example.metrics[run.label] = full.astype(np.float32), m
                if example is not None:
                    examples.append(example)
            bar.update(len(batch.index))
    bar.close()
    return rows, examples, no_valid, bad_gt


def _skipped_table(records: list[dict], has_gt: np.ndarray, unreadable: np.ndarray, planning: list[dict],
                   bad_gt: list[dict], no_valid: list[dict]) -> pd.DataFrame:
    """The test lines left out of the scores, with the reason, in split order."""
    return pd.DataFrame(
        [{"id": r["id"], "line": int(r["line"]), "reason": "GT None in the split file"}
         for r, g in zip(records, has_gt) if not g]
        + [{"id": r["id"], "line": int(r["line"]), "reason": f"unreadable: {r['skip_reason']}"}
           for r, u, g in zip(records, unreadable, has_gt) if u and g]
        + [{"id": r["id"], "line": int(r["line"]), "reason": f"unreadable: {r['reason']}"} for r in planning]
        + [{**r, "reason": f"unreadable: {r['reason']}"} for r in bad_gt] + no_valid,
        columns=["id", "line", "reason"]).sort_values("line", kind="stable", ignore_index=True)


# ---- chosen frames again --------------------------------------------------------------------------------------------
def predict_examples(
    ctx: RunContext | Config, predictors: dict[str, Predictor], frames: dict[str, Sequence[str]]
) -> dict[str, list[Example]]:
    """The test frames `frames[label]` (ids) predicted again by `predictors[label]`, through the same protocol steps
    as `evaluate_run` (prediction with flip TTA, resize to the GT, alignment, `compute_metrics`): run label ->
    one `Example` per frame with that run's prediction and metrics, e.g. a variant's best and worst frames, chosen
    from an evaluation's per_image.csv (each example's metrics equal that table's row)."""
    ctx = RunContext.of(ctx)
    cfg = ctx.cfg
    crop, alignment, gt_size = resolve_protocol(cfg)
    lo, hi = cfg.data.depth_range
    store = ctx.open_store("test")
    records = store.index().to_dict("records")
    position = {r["id"]: p for p, r in enumerate(records)}
    unknown = sorted({i for ids in frames.values() for i in ids} - set(position))
    if unknown:
        raise EvaluationError(f"frames {unknown[:3]} are not in the test store {store.url}")
    device = resolve_device(cfg.train.device)
    out: dict[str, list[Example]] = {}
    with torch.inference_mode():
        for label, ids in frames.items():
            fn = predictors[label]
            layers = getattr(fn, "layers", store.layers)
            pos = np.asarray(sorted({position[i] for i in ids}), dtype=np.int64)
            data = store.read(pos, layers, depth=False, flipped=cfg.pixel_flip_tta)
            unflipped = torch.zeros(len(pos), dtype=torch.bool)
            batch = Batch({"tokens": data["tokens"], "global": data["global"]}, None, pos, unflipped).to(device)
            mirrored = (Batch({"tokens": data["flipped_tokens"], "global": data["flipped_global"]}, None, pos,
                              ~unflipped).to(device) if cfg.pixel_flip_tta else None)
            preds = predict_batch(fn, batch, cfg.eval.flip_tta, mirrored)  # (B, h, w)
            by_pos = {}
            for j, p in enumerate(pos):
                row = records[p]
                gt = load_gt(row, store.attrs["split_file"], cfg.data.layout)
                if gt_size is not None:
                    gt = resize_gt_nearest(gt, gt_size)
                full = to_gt_resolution(preds[j], gt.shape)
                if alignment == "lstsq":
                    full = lstsq_align(full, gt, valid_mask(gt, lo, hi) & crop_mask(gt.shape, crop))[0]
                m = compute_metrics(full, gt, crop=crop, min_depth=lo, max_depth=hi,
                                    median_scaling=alignment == "median")
                # The picture shows what the metrics scored: median-scaled as `compute_metrics` scales, clipped.
                valid = valid_mask(gt, lo, hi) & crop_mask(gt.shape, crop)
                if alignment == "median" and np.median(full[valid]) > 0:
                    full = full * (np.median(gt[valid]) / np.median(full[valid]))
                full = np.clip(full, lo, hi)
                by_pos[row["id"]] = Example(row["id"], row["image_path"], gt, {label: full.astype(np.float32)},
                                            {label: m})
            out[label] = [by_pos[i] for i in ids]
    return out


# ---- provenance ---------------------------------------------------------------------------------------------------
def git_commit(root: Path = PROJECT_ROOT) -> str:
    """`<short sha>` of the code that ran, `+dirty` when it has uncommitted changes, `unknown` outside a checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def training_summary(cfg: Config) -> str:
    """The recipe's numbers and the decoder's shape, for the protocol line (what a demo changes is visible)."""
    tc, dc = cfg.train, cfg.decoder
    schedule = (f"StepLR x{tc.step_gamma:g} every {tc.step_every} epochs" if tc.schedule == "step"
                else "cosine with linear warm-up")
    ema = f", EMA {tc.ema:g}" if tc.ema else ""
    return (f"{tc.epochs} epochs, batch {tc.batch_size}, AdamW lr {tc.lr:g} wd {tc.weight_decay:g}, {schedule}{ema}, "
            f"flips p {tc.flip_p:g} ({cfg.views.flip} space), views {cfg.views.mode} x{cfg.views.views_per_image}; "
            f"decoder channels {list(dc.channels)}, head init {dc.init_depth}")


def protocol_of(cfg: Config, store: FeatureStore, encoder: dict, crop: str, counts: dict, checkpoints: dict,
                seconds: float) -> dict:
    """`encoder`: the encoder's identity (`FrozenEncoder.identity`)."""
    versions = package_versions(extra=("pandas", "prefect"))
    lo, hi = cfg.data.depth_range
    train_fps = sorted({c["train_fingerprint"] for c in checkpoints.values() if c.get("train_fingerprint")})
    return {
        "config": cfg.name, "sweep": cfg.sweep, "dataset": cfg.data.layout, "synthetic": cfg.data.synth is not None,
        "split_file": str(cfg.data.test_split), "counts": counts, "crop": crop, "depth_range": [lo, hi],
        "median_scaling": resolve_alignment(cfg) == "median", "flip_tta": cfg.eval.flip_tta,
        "flip_tta_source": cfg.eval.flip_tta_source if cfg.eval.flip_tta else None, "recipe": cfg.recipe,
        "alignment": resolve_alignment(cfg), "gt_resolution": cfg.eval.gt_resolution,
        "resize": ("bilinear, to the native ground-truth resolution" if cfg.eval.gt_resolution == "native" else
                   f"GT nearest-neighbour to {cfg.eval.gt_resolution}, prediction bilinear to it"),
        "checkpoint": cfg.eval.checkpoint, "selection": SELECTION[cfg.eval.checkpoint] + (
            f", among epochs {cfg.train.validate_from}-{cfg.train.epochs} (train.validate_from)"
            if cfg.eval.checkpoint == "best" and 1 < cfg.train.validate_from < cfg.train.epochs else ""),
        "encoder": encoder["name"],
        "encoder_input": f"{encoder['image_size']} px, {encoder['grid']}x{encoder['grid']} grid",
        "training": training_summary(cfg), "test_cache": store.url, "test_fingerprint": store.fingerprint,
        "train_fingerprints": train_fps, "versions": versions, "git": git_commit(),
        "imported": {v: c["imported"]["source"] for v, c in checkpoints.items() if c.get("imported")},
        "seeds": cfg.train.seed_list, "reference": cfg.eval.reference, "seconds": round(seconds, 2),
    }
