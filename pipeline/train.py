"""Stage 2: train one decoder variant from the feature cache (or, as the reference, from images).

    train_variant(ctx, "full")  ->  <train.out_dir>/<sweep>/full/   (ctx: a `RunContext`, or a config)
        last/  best/        model.safetensors + config.json (variant, decoder kwargs, encoder identity,
                            cache fingerprint, epoch, validation metrics): `SpaceClipDecoder.from_pretrained(dir)`
        history.csv         one row per epoch: train loss, validation metrics, lr, time, images/s, skipped batches
        train_state.pt      raw weights, optimizer, EMA and RNG state for resuming (tensors and plain values only,
                            loaded with `torch.load(weights_only=True)`: nothing is unpickled)

Loss, optimiser and schedules are docs/design.md's: 0.5 SILog + 0.5 SSIM (+ aux SILog), AdamW, `step` (torch's
StepLR: x0.5 every 2 epochs) or `cosine_warmup` (torch's LinearLR warm-up then CosineAnnealingLR to min_lr, per
step), grad-norm clip, non-finite or empty batches skipped and counted, optional EMA (torch's AveragedModel).
`best/` is chosen on validation AbsRel (a split carved from train by drive), never on test. A run whose `epochs` are
reached is skipped; a killed run resumes from its last epoch.

`train_variants(ctx, variants)` trains several variants in one pass over the data (`train.shared_pass`): every
batch is read once and each variant steps on it with its own random stream, bit-identical to training it alone
wherever runs are deterministic (`determinism`: a CPU, or a GPU with `train.deterministic`).

Seeds (`train.seeds`) are a sweep axis: `train_variants(ctx, variants, seed=s)` trains the runs of seed s, each in
runs/<sweep>/<variant>/seed-<s>/ when the config lists several seeds (`pipeline.layout.run_dir`). A seed's run is
the run of a one-seed config with `train.seed = s`, byte for byte: the seed is the only thing that differs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR, StepLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline.config import Config, TrainConfig, dump_config
from pipeline.devices import encoder_settings, reuse_freed_memory, usable_cores, visible_gpus
from pipeline.extract import plan_split
from pipeline.image_batches import ImageBatches
from pipeline.layout import RunContext, RunError, locked_run_dirs, replaced_atomically, resolve_device
from pipeline.loader import Batch, Batches, CachedBatches
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.losses import depth_loss
from spaceclip.metrics import METRIC_KEYS, compute_metrics, mean_metrics

log = logging.getLogger(__name__)

HISTORY_NAME = "history.csv"
STATE_NAME = "train_state.pt"
PROGRESS_EVERY = 50  # steps between the progress bar's loss readings (each a host read of device values)
# history.csv columns, in order: the headline metrics first, then the rest of the one metrics function's keys.
VAL_KEYS = ("abs_rel", "rmse", "d1") + tuple(k for k in METRIC_KEYS if k not in ("abs_rel", "rmse", "d1"))
HISTORY_COLUMNS = (("epoch", "train_loss") + tuple(f"val_{k}" for k in VAL_KEYS)
                   + ("lr", "seconds", "val_seconds", "images_per_s", "skipped_batches"))


@dataclass
class TrainResult:
    variant: str
    run_dir: Path
    epochs_done: int
    best_epoch: int
    best_abs_rel: float
    already_done: bool = False  # the run had reached its epochs before this call; nothing was trained
    history: list[dict] = field(default_factory=list)
    seed: int | None = None  # the run's `train.seed`


# ---- schedule and EMA ---------------------------------------------------------------------------------------
def lr_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int) -> LRScheduler:
    """torch's scheduler of the recipe, stepped once per optimiser step (skipped batches included, so the rate
    follows the step count). `step`: StepLR, x `step_gamma` every `step_every` epochs (the paper).
    `cosine_warmup`: LinearLR from lr / warmup up to lr over the first `warmup_fraction` of the steps, then
    CosineAnnealingLR down to `min_lr` at the last step (the release)."""
    steps = max(steps_per_epoch, 1)
    if tc.schedule == "step":
        return StepLR(optimizer, step_size=tc.step_every * steps, gamma=tc.step_gamma)
    total = max(tc.epochs * steps_per_epoch, 1)
    warmup = max(1, round(tc.warmup_fraction * total))
    return SequentialLR(optimizer, [
        LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1),
        CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=tc.min_lr),
    ], milestones=[warmup])


def learning_rates(tc: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every optimiser step of a run (0-based, over all its epochs), read off the scheduler."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=tc.lr)
    scheduler = lr_scheduler(optimizer, tc, steps_per_epoch)
    out = []
    for _ in range(tc.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # a no-op (no gradients), in the order torch expects
        scheduler.step()
    return out


def ema_of(model: torch.nn.Module, decay: float) -> AveragedModel:
    """torch's EMA of the weights, starting from the model's initial weights: after each optimiser step
    `ema.update_parameters(model)` moves every parameter a fraction (1 - decay) toward the model's. BatchNorm
    statistics are copied from the model, not averaged (`use_buffers=False`)."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.update_parameters(model)  # the first update copies: the average then starts at the initial weights
    return ema


def parallel_plan(tc: TrainConfig, n_variants: int, cores: int | None = None) -> tuple[int, int]:
    """(passes trained at once, torch threads each): `train.parallel` and `train.num_threads` where set; else on a
    CPU one variant per usable core (each with cores // parallel threads), on GPUs one pass per GPU
    (`device: auto` or `cuda`; `cuda:N`: one)."""
    cores = cores or usable_cores()
    if tc.parallel:
        parallel = tc.parallel
    elif resolve_device(tc.device).type == "cuda":
        parallel = len(visible_gpus()) if ":" not in tc.device else 1
    else:
        parallel = max(1, cores // (tc.num_threads or 1))
    parallel = max(1, min(parallel, n_variants))
    return parallel, tc.num_threads or max(1, cores // parallel)


def pass_plan(tc: TrainConfig, variants: list, cores: int | None = None) -> tuple[list[list], int, int]:
    """(variant groups, groups trained at once, torch threads each). `variants`: variant names, or (variant, seed)
    runs (`seed_runs`): runs of different seeds never share a pass (each seed reads the data in its own order).
    Each group is one pass over the data
    (`train_variants`): `train.shared_pass`, by default on where one process trains all variants (`parallel_plan`
    gives 1) and on GPUs (one group per GPU); off where variants train in parallel processes on a CPU (each
    variant its own group), where a read from the resident cache is ~nothing beside a decoder step and
    single-variant tasks balance unequal variants across the workers (BENCHMARKS.md, issue 14).
    shared_pass=True with parallel > 1: `parallel` groups, variants dealt round-robin."""
    parallel, threads = parallel_plan(tc, len(variants), cores)
    shared = tc.shared_pass if tc.shared_pass is not None else (
        parallel == 1 or resolve_device(tc.device).type == "cuda")
    if not shared or len(variants) == 1:
        return [[v] for v in variants], parallel, threads
    by_seed: dict = {}
    for run in variants:
        by_seed.setdefault(run[1] if isinstance(run, tuple) else None, []).append(run)
    groups = [list(runs[i::parallel]) for runs in by_seed.values() for i in range(parallel)]
    return [g for g in groups if g], parallel, threads


def seed_runs(tc: TrainConfig) -> list[tuple[str, int]]:
    """Every (variant, seed) run of the sweep, seed by seed: the first seed's variants first."""
    return [(v, s) for s in tc.seed_list for v in tc.variants]


def run_label(tc: TrainConfig, variant: str, seed: int) -> str:
    """How tables, logs and task names call a run: the variant, and `<variant>/seed-<s>` (its folder below the
    sweep) when the config lists several seeds."""
    return f"{variant}/seed-{seed}" if tc.multi_seed else variant


def seed_config(cfg: Config, seed: int | None) -> Config:
    """The config of one seed's runs: `train.seed = seed` (None: the config's first seed); its run folders are
    that seed's (`pipeline.layout.run_dir`)."""
    seed = cfg.train.seed_list[0] if seed is None else seed
    if seed == cfg.train.seed:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})


def seed_context(ctx: RunContext | Config, seed: int | None) -> RunContext:
    """`seed_config` of a context. Stores and fingerprints do not depend on the seed: they are shared."""
    ctx = RunContext.of(ctx)
    cfg = seed_config(ctx.cfg, seed)
    return ctx if cfg is ctx.cfg else dataclasses.replace(ctx, cfg=cfg)


CUBLAS_DETERMINISTIC = ":4096:8"  # cuBLAS's documented deterministic workspace setting


@contextlib.contextmanager
def determinism(device: torch.device, threads: int | None, deterministic: bool | None = None):
    """torch's deterministic algorithms for the block (`train.deterministic`; None: on for a CPU, off for a GPU);
    the global torch settings are restored afterwards.

    CPU: a fixed seed and thread count repeat a run bit for bit on one machine. CUDA with `deterministic`: also
    `CUBLAS_WORKSPACE_CONFIG` (set here when absent; torch reads it once, at the process's first cuBLAS call, so a
    process that used CUDA before should be started with it) and cuDNN's deterministic algorithms without
    benchmarking: a run repeats bit for bit on one GPU model, driver and torch build, slower. Without it a GPU run
    differs from the last one within float rounding (atomics in some backward kernels), and so does a variant of
    a shared pass from the same variant trained alone."""
    cuda = device.type == "cuda"
    on = (not cuda) if deterministic is None else deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if threads:
        torch.set_num_threads(threads)
    if on and cuda:
        if before[4] is None and torch.cuda.is_initialized():
            log.warning("train.deterministic: this process used CUDA before CUBLAS_WORKSPACE_CONFIG was set; if "
                        "torch refuses a cuBLAS call, start it with CUBLAS_WORKSPACE_CONFIG=%s", CUBLAS_DETERMINISTIC)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if before[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# ---- data -----------------------------------------------------------------------------------------------------
@dataclass
class Sources:
    train: Batches
    val: Batches
    target_hw: tuple[int, int]
    fingerprints: dict  # {"train": fp, "val": fp}
    width: int


def check_cache(ctx: RunContext | Config) -> dict:
    """The fingerprint guard: the complete train and val stores this config expects, or a `StoreError` saying
    what differs. Returns {"train": url, "val": url}."""
    ctx = RunContext.of(ctx)
    return {split: ctx.open_store(split).url for split in ("train", "val")}


def build_sources(ctx: RunContext, layers, device: torch.device) -> Sources:
    cfg, tc = ctx.cfg, ctx.cfg.train
    common = dict(seed=tc.seed, shuffle_window=tc.shuffle_window, device=device)
    fingerprints = {split: ctx.fingerprint(split) for split in ("train", "val")}
    if tc.feature_source == "cache":
        stores = {split: ctx.open_store(split) for split in ("train", "val")}
        common["read_workers"] = tc.read_workers
        common["memory_share"] = tc.parallel or 1  # concurrent trainings share the RAM budget
        common["device_share"] = tc.device_share or 1  # and those on one GPU its memory
        train = CachedBatches(stores["train"], layers, tc.batch_size, train=True, flip_p=tc.flip_p,
                              cache_device=tc.cache_device, **common)
        val = CachedBatches(stores["val"], layers, cfg.eval.batch_size, train=False, cache_device=tc.cache_device,
                            **common)
        return Sources(train, val, train.target_hw, fingerprints, int(stores["train"].attrs["width"]))
    # The reference path: the frozen encoder runs on every step, on the same samples and views as the cache.
    encoder = ctx.encoder.to(device)
    autocast = encoder_settings(cfg.encoder).autocast
    loaders = {}
    for split, train in (("train", True), ("val", False)):
        plan = plan_split(cfg, split)
        loaders[split] = ImageBatches(
            plan.index, encoder, layers, tc.batch_size if train else cfg.eval.batch_size,
            split_file=cfg.data.train_split, layout=cfg.data.layout, target_hw=plan.target_hw,
            chunk_size=cfg.cache.chunk_size, train=train, flip_p=tc.flip_p, autocast_dtype=autocast, **common)
    return Sources(loaders["train"], loaders["val"], loaders["train"].target_hw, fingerprints, encoder.width)


def median_target_depth(loader: Batches, depth_range: tuple[float, float], max_samples: int = 256) -> float:
    """Median of the valid training targets (`decoder.init_depth = median`), from the first samples of the split."""
    lo, hi = depth_range
    depth = loader.targets(max_samples)
    valid = depth[(depth > lo) & (depth < hi)]
    if valid.size == 0:
        raise RunError(f"no valid training target in ({lo}, {hi}) m among the first {max_samples} samples")
    return round(float(np.median(valid)), 3)


def recompute_bn(model: torch.nn.Module, batches: Iterable[Batch]) -> None:
    """`train.bn_recompute`: BatchNorm running statistics recomputed over the first training batches of the epoch
    (a plain average, torch's `update_bn`) before validation and checkpointing. With a large learning rate the
    momentum-0.1 running averages trail the weights by several steps, so an eval-mode decoder (FiLM variants most:
    gamma * x rescales the tokens) can predict a different scale than it trains with; seen on the demo as validation
    AbsRel jumping 0.9 -> 3.0 -> 0.3 between epochs while the training loss fell smoothly."""
    from torch.optim.swa_utils import update_bn

    update_bn(batches, model)


# ---- validation -----------------------------------------------------------------------------------------------
def validate(model: torch.nn.Module, loader: Batches, depth_range: tuple[float, float], autocast: bool = False) -> dict:
    """Mean per-image metrics over the loader's samples: prediction at the target size, valid pixels only, no
    crop, no median scaling (the one metrics function, as everywhere)."""
    return validate_many([model], loader, depth_range, autocast)[0]


@torch.inference_mode()
def validate_many(models: list[torch.nn.Module], loader: Batches, depth_range: tuple[float, float],
                  autocast: bool = False) -> list[dict]:
    """`validate` of several models in one pass over the loader (a shared pass validates all its variants)."""
    for model in models:
        model.eval()
    lo, hi = depth_range
    rows: list[list[dict]] = [[] for _ in models]
    for batch in loader.epoch(0):
        gt = batch.depth  # (B, H, W)
        gt_np = gt.cpu().numpy()
        for model, out in zip(models, rows):
            with torch.autocast(gt.device.type, dtype=torch.bfloat16, enabled=autocast):
                pred = model(batch.features, out_size=tuple(gt.shape[-2:]))["depth"][:, 0]  # (B, H, W)
            for p, g in zip(pred.float().cpu().numpy(), gt_np):
                try:
                    out.append(compute_metrics(p, g, crop="none", min_depth=lo, max_depth=hi))
                except ValueError:  # no valid pixel in this target: nothing to measure
                    continue
    return [mean_metrics(r) if r else {k: float("nan") for k in METRIC_KEYS} for r in rows]


# ---- files ------------------------------------------------------------------------------------------------------
def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: (int(v) if k in ("epoch", "skipped_batches") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def write_history(path: Path, rows: list[dict]) -> None:
    with replaced_atomically(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in HISTORY_COLUMNS} for row in rows)


def save_checkpoint(model: SpaceClipDecoder, directory: Path, extra: dict) -> None:
    """`save_pretrained` into a sibling folder, then swap it in: a kill never leaves half a checkpoint."""
    with replaced_atomically(directory) as tmp:
        model.save_pretrained(tmp, extra=extra)


def save_state(path: Path, state: dict) -> None:
    with replaced_atomically(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    # weights_only: tensors, numbers, strings and containers only; an arbitrary pickled object fails to load.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # it holds an object that is not plain data: refused as such
        raise
    except Exception as err:  # written atomically, so only outside damage truncates or corrupts it
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise RunError(f"{path} cannot be read, it is damaged ({why}); delete it to train this variant again from "
                       "the start (or --no-resume)") from None


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---- training ---------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW of the recipe. On a GPU torch's fused kernel: it takes the step's skip flag as a device tensor
    (`found_inf`, as GradScaler hands it over) and leaves weights, moments and step count untouched where it is
    set, so `train_step` never waits for the GPU to learn whether to step. On the CPU, where nothing waits, torch's
    default AdamW: the fused CPU kernel rounds some updates differently (1 ulp), so CPU runs would no longer repeat
    those trained with it bit for bit (`tests/test_train_syncs.py`)."""
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                             fused=True if device.type == "cuda" else None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict(saved)` keeping this optimizer's kernel choice: torch takes the saved groups'
    options wholesale, and a state saved by a non-fused AdamW would switch the fused one back off."""
    kernel = ("fused", "foreach", "capturable", "differentiable")
    groups = [{**g, **{k: o[k] for k in kernel if k in o}} for g, o in zip(saved["param_groups"],
                                                                          optimizer.param_groups)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


@torch.no_grad()
def _ema_update_where(ema: AveragedModel, model: torch.nn.Module, ok: torch.Tensor) -> None:
    """`ema.update_parameters(model)` where `ok` holds, a no-op where it does not, `ok` never read on the host.
    Where it holds this is AveragedModel's own update (`ema_of`'s EMA function on the same tensors, the buffers
    copied); elsewhere the EMA is lerped toward itself, which leaves it exactly as it was."""
    ema_params = [p.detach() for p in ema.module.parameters()]
    targets = [torch.where(ok, p.detach(), e) for p, e in zip(model.parameters(), ema_params, strict=True)]
    ema.multi_avg_fn(ema_params, targets, ema.n_averaged)
    for b_ema, b in zip(ema.module.buffers(), model.buffers(), strict=True):  # BatchNorm statistics: copied
        b_ema.copy_(torch.where(ok, b.detach(), b_ema))


def train_step(model: SpaceClipDecoder, optimizer: torch.optim.Optimizer, batch: Batch, loss_kwargs: dict,
               grad_clip: float, ema: AveragedModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one batch -> (loss, taken), two tensors on the batch's device that nothing here reads:
    `taken` is False where the batch was skipped (a non-finite loss or gradient, or no valid target pixel), and
    then weights, BatchNorm statistics, AdamW's moments and step count and the EMA are exactly as they were. With
    `make_optimizer`'s fused AdamW (a GPU) the decision stays on the device, so a step queues its kernels without
    waiting for the ones before it (a host read would: two a step here, and eleven in the losses before they were
    masked sums); read the results when the numbers are needed (`_train`: once an epoch). With any other optimiser
    (a CPU, where nothing waits) the skip flag is read on the host. bf16 autocast on CUDA; the loss itself in
    float32."""
    gt = batch.depth[:, None]  # (B, 1, H, W)
    # The train-mode forward moves the model's buffers (BatchNorm's running statistics) before the skip is known (a
    # NaN feature would leave them NaN for every later validation): kept here and put back where the step is skipped.
    buffers = list(model.buffers())
    kept = [b.clone() for b in buffers]
    with torch.autocast(gt.device.type, dtype=torch.bfloat16, enabled=gt.device.type == "cuda"):
        outputs = model(batch.features, out_size=tuple(gt.shape[-2:]))
    loss, parts = depth_loss(outputs, gt, **loss_kwargs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # a non-finite loss gives non-finite gradients; the step is skipped below
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # no host read (error_if_nonfinite off)
    taken = torch.isfinite(loss.detach()) & (parts["valid_pixels"] > 0) & torch.isfinite(grad_norm)
    for b, before in zip(buffers, kept):
        b.copy_(torch.where(taken, b, before))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~taken).float()  # read by the fused kernel on the device
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif taken.item():  # the one host read, free where the tensors live on the host
        optimizer.step()
    if ema is not None:
        _ema_update_where(ema, model, taken)
    return loss.detach(), taken


def loss_kwargs_for(cfg: Config) -> dict:
    lo, hi = cfg.data.depth_range
    tc = cfg.train
    return dict(min_depth=lo, max_depth=hi, silog_weight=tc.silog_weight, ssim_weight=tc.ssim_weight,
                aux_weights=tc.aux_weights)


def train_variant(
    ctx: RunContext | Config,
    variant: str,
    *,
    seed: int | None = None,
    resume: bool = True,
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train (or resume, or skip when finished) one decoder variant with one seed (None: the config's first seed).
    `on_epoch(row)` is called after each epoch's files are written, with the history row (the flow logs it; tests
    use it to simulate a kill)."""
    hook = None if on_epoch is None else (lambda _variant, row: on_epoch(row))
    return train_variants(ctx, [variant], seed=seed, resume=resume, progress=progress, on_epoch=hook)[variant]


def train_variants(
    ctx: RunContext | Config,
    variants: list[str],
    *,
    seed: int | None = None,
    resume: bool = True,
    progress: bool = False,
    on_epoch: Callable[[str, dict], None] | None = None,
) -> dict[str, TrainResult]:
    """Train several variants in one pass over the data (`train.shared_pass`): each batch is read once and every
    variant takes its optimiser step on it in turn. Each keeps its own model, optimiser, schedule, EMA, run folder
    and random stream, so its checkpoints and history are bit-identical to training it alone (`train_variant`),
    timing columns aside, wherever runs are deterministic (`determinism`); within float rounding elsewhere.
    Variants resumed at different epochs join the pass at their own epoch.
    `on_epoch(variant, row)` after each variant's epoch files are written. `seed`: the seed of these runs (None:
    the config's first seed). Returns {variant: result}."""
    ctx = seed_context(ctx, seed)
    with locked_run_dirs([ctx.run_dir(v) for v in dict.fromkeys(variants)]):  # one training per run folder
        return _train_variants(ctx, variants, resume=resume, progress=progress, on_epoch=on_epoch)


def _train_variants(ctx: RunContext, variants: list[str], *, resume: bool, progress: bool,
                    on_epoch: Callable[[str, dict], None] | None) -> dict[str, TrainResult]:
    device = resolve_device(ctx.cfg.train.device)
    opened = {v: open_run(ctx, v, resume) for v in dict.fromkeys(variants)}
    results = {v: r for v, r in opened.items() if isinstance(r, TrainResult)}
    todo = [r for r in opened.values() if not isinstance(r, TrainResult)]
    if todo:
        with determinism(device, ctx.cfg.train.num_threads, ctx.cfg.train.deterministic):
            results.update(_train(ctx, todo, device, progress, on_epoch))
    return {v: results[v] for v in opened}


@dataclass
class OpenRun:
    variant: str
    out: Path
    state: dict | None  # train_state.pt of the run to resume, None to start afresh
    meta: dict  # what the saved state must match


def open_run(ctx: RunContext, variant: str, resume: bool) -> OpenRun | TrainResult:
    """A variant's run folder, ready to train: the saved state to resume from (checked against this config), or an
    emptied folder (`resume=False`); a `TrainResult` when the run had already reached its epochs."""
    cfg, tc = ctx.cfg, ctx.cfg.train
    out = ctx.run_dir(variant)
    state_path = out / STATE_NAME
    meta = {"variant": variant, "seed": tc.seed, "cache_fingerprint": ctx.fingerprint("train"),
            "feature_source": tc.feature_source, "decoder": cfg.decoder.model_dump(mode="json")}

    state = None
    if resume and state_path.is_file():
        state = load_state(state_path)
        found = json.loads(state["meta"])
        found.setdefault("seed", tc.seed)  # a state saved before runs recorded their seed: this config's
        differs = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
        if differs:
            raise RunError(
                f"{out} holds a run that differs from this config: "
                + "; ".join(f"{k}: run has {a!r}, config has {b!r}" for k, (a, b) in differs.items())
                + ". Use --no-resume (resume=False) to overwrite it, or another --sweep."
            )
        done = int(state["epoch"])
        if done >= tc.epochs:
            log.info("%s: already trained (%d of %d epochs, best val AbsRel %.4f at epoch %d) in %s; skipping",
                     variant, done, tc.epochs, state["best_abs_rel"], state["best_epoch"], out)
            return TrainResult(variant, out, done, int(state["best_epoch"]), float(state["best_abs_rel"]),
                               already_done=True, history=read_history(out / HISTORY_NAME), seed=tc.seed)
    elif not resume:
        for name in ("last", "best", HISTORY_NAME, STATE_NAME):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return OpenRun(variant, out, state, meta)


@dataclass
class _Run:
    """One variant inside a pass: everything that is its own, the random stream included."""

    variant: str
    out: Path
    meta: dict
    model: SpaceClipDecoder
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    ema: AveragedModel | None
    rng: dict  # {"cpu": state[, "cuda": [states]]}: torch's generators as this variant left them
    ckpt_extra: dict = field(default_factory=dict)
    start: int = 0  # epochs done before this call
    best_abs_rel: float = float("inf")
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    # the current epoch's running sums [loss x images, images, skipped batches], on the device: read at its end
    totals: torch.Tensor | None = None
    loss_sum: float = 0.0
    images: int = 0
    skipped: int = 0
    lr: float = 0.0
    busy_s: float = 0.0  # seconds in this variant's own steps

    def batch_view(self, batch: Batch) -> Batch:
        """The batch with only the layers this variant reads (a pass reads the union of its variants' layers)."""
        tokens = batch.features["tokens"]
        return batch._replace(features={"tokens": {k: tokens[k] for k in self.model.layers},
                                        "global": batch.features["global"]})


@contextlib.contextmanager
def own_random_stream(run: _Run):
    """Torch's global generators set to this variant's stream for the block, and its stream kept afterwards.
    nn.Dropout draws its Bernoulli masks from the global generator (a module takes no generator of its own), so
    variants that share a pass swap generator states: each then draws exactly what it would draw alone."""
    torch.set_rng_state(run.rng["cpu"])
    if "cuda" in run.rng:
        torch.cuda.set_rng_state_all(run.rng["cuda"])
    try:
        yield
    finally:
        run.rng["cpu"] = torch.get_rng_state()
        if "cuda" in run.rng:
            run.rng["cuda"] = torch.cuda.get_rng_state_all()


def _start_run(ctx: RunContext, opened: OpenRun, sources: Sources, head_bias, device, steps: int) -> _Run:
    cfg, tc = ctx.cfg, ctx.cfg.train
    cuda = device.type == "cuda"
    variant, state, out = opened.variant, opened.state, opened.out
    torch.manual_seed(tc.seed)
    model = SpaceClipDecoder(variant, width=ctx.encoder_identity["width"], head_bias=head_bias,
                             **cfg.decoder.kwargs())
    if cuda:
        model = model.to(device, memory_format=torch.channels_last)
    if sources.width != model.width:
        raise RunError(f"the cache holds {sources.width}-channel features but the encoder has width {model.width}")
    if steps == 0:
        raise RunError(f"{variant}: the train split has no usable samples")
    optimizer = make_optimizer(model, tc, device)
    scheduler = lr_scheduler(optimizer, tc, steps)
    ema = ema_of(model, tc.ema) if tc.ema else None
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()} if cuda else {})}
    run = _Run(variant, out, opened.meta, model, optimizer, scheduler, ema, rng)

    if state is not None:
        model.load_state_dict(state["model"])
        if "scheduler" not in state:  # saved before the scheduler's state was: replay the steps it had taken
            for _ in range(int(state["epoch"]) * steps):
                scheduler.step()
            state["scheduler"] = scheduler.state_dict()
            state["optimizer"]["param_groups"] = [{**g, "lr": o["lr"], "initial_lr": o["initial_lr"]} for g, o in
                                                  zip(state["optimizer"]["param_groups"], optimizer.param_groups)]
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            if "ema" not in state:
                raise RunError(f"{out / STATE_NAME} has no EMA weights but train.ema is set; resume=False to restart")
            ema.module.load_state_dict(state["ema"])
        run.rng["cpu"] = state["torch_rng"]
        if cuda and "cuda_rng" in state:
            run.rng["cuda"] = list(state["cuda_rng"])
        run.start, run.best_abs_rel, run.best_epoch = (int(state["epoch"]), float(state["best_abs_rel"]),
                                                       int(state["best_epoch"]))
        run.history = [r for r in read_history(out / HISTORY_NAME) if r["epoch"] <= run.start]
        log.info("%s: resuming after epoch %d of %d from %s", variant, run.start, tc.epochs, out)

    run.ckpt_extra = {
        "variant": variant, "encoder": ctx.encoder_identity, "cache_fingerprint": sources.fingerprints["train"],
        "val_fingerprint": sources.fingerprints["val"], "feature_source": tc.feature_source,
        "target_size": list(sources.target_hw), "depth_range": list(cfg.data.depth_range), "config": dump_config(cfg),
    }
    if sources.val.n_usable == 0:
        log.warning("%s: the validation split is empty (data.val_fraction = %s); best/ will follow last/", variant,
                    cfg.data.val_fraction)
    log.info("%s: %d parameters, layers %s, %d steps/epoch of %d on %s, source %s (%s)", variant,
             model.count_parameters(), list(model.layers), steps, tc.batch_size, device, tc.feature_source,
             sources.train.mode)
    return run


def _train(ctx: RunContext, opened: list[OpenRun], device, progress, on_epoch) -> dict[str, TrainResult]:
    cfg, tc = ctx.cfg, ctx.cfg.train
    cuda = device.type == "cuda"
    depth_range = cfg.data.depth_range
    reuse_freed_memory()  # a decoder step allocates its activations afresh: from freed memory, not new pages
    # The pass reads the union of the variants' layers once; each variant is handed the layers it reads.
    layers = sorted(set().union(*(cfg.decoder.layers_of(o.variant) for o in opened)))
    sources = build_sources(ctx, layers, device)
    head_bias = median_target_depth(sources.train, depth_range) if cfg.decoder.init_depth == "median" else None
    steps = len(sources.train)
    runs = [_start_run(ctx, o, sources, head_bias, device, steps) for o in opened]
    loss_kwargs = loss_kwargs_for(cfg)

    for epoch in range(min(r.start for r in runs), tc.epochs):
        active = [r for r in runs if r.start <= epoch]
        for r in active:
            r.model.train()
            r.totals = torch.zeros(3, dtype=torch.float64, device=device)
            r.lr, r.busy_s = tc.lr, 0.0
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"{'+'.join(r.variant for r in active)} epoch {epoch + 1}/{tc.epochs}",
                   unit="step", disable=not progress, leave=False)
        for i, batch in enumerate(sources.train.epoch(epoch), 1):
            for r in active:
                t = time.perf_counter()
                with own_random_stream(r):
                    r.lr = r.optimizer.param_groups[0]["lr"]
                    loss, taken = train_step(r.model, r.optimizer, r.batch_view(batch), loss_kwargs, tc.grad_clip,
                                             r.ema)
                    r.scheduler.step()  # every batch, a skipped one too: the rate follows the step count
                n = batch.depth.shape[0]  # in float64, as a Python sum of the loss values would be
                r.totals += torch.stack([torch.where(taken, loss.double() * n, 0.0), taken.double() * n,
                                         (~taken).double()])
                r.busy_s += time.perf_counter() - t
            bar.update(1)
            if progress and i % PROGRESS_EVERY == 0:  # the running mean losses: a host read, so not every step
                bar.set_postfix({r.variant: f"{s / max(k, 1):.3f}" for r, (s, k, _) in
                                 zip(active, torch.stack([r.totals for r in active]).tolist())})
        bar.close()
        # The epoch's sums, read once for all its variants (on a GPU this waits for their queued steps).
        for r, (loss_sum, images, skipped) in zip(active, torch.stack([r.totals for r in active]).tolist()):
            r.loss_sum, r.images, r.skipped = loss_sum, int(images), int(skipped)
        # Each variant's training time: its own steps plus an equal share of the waits for data.
        wait_s = max(time.perf_counter() - t0 - sum(r.busy_s for r in active), 0.0) / len(active)

        t1 = time.perf_counter()
        validated = epoch + 1 >= tc.validate_from or epoch + 1 == tc.epochs
        if validated:
            candidates, scores = _validate_epoch(tc, active, sources, epoch, depth_range, cuda)
        else:  # `train.validate_from`: the weights validation would have taken, without scores
            candidates = [_validated_weights(r) for r in active]
            scores = [dict.fromkeys(VAL_KEYS, math.nan) for _ in candidates]
        val_s = (time.perf_counter() - t1) / len(active)

        for r in active:
            (eval_model, weights, metrics), *others = [(m, w, s) for (run, m, w), s in zip(candidates, scores)
                                                       if run is r]
            for model, w, s in others:
                if not metrics["abs_rel"] < s["abs_rel"]:
                    eval_model, weights, metrics = model, w, s
            train_s = r.busy_s + wait_s
            row = {"epoch": epoch + 1, "train_loss": r.loss_sum / r.images if r.images else float("nan"),
                   **{f"val_{k}": metrics[k] for k in VAL_KEYS}, "lr": r.lr, "seconds": train_s + val_s,
                   "val_seconds": val_s, "images_per_s": r.images / train_s if train_s > 0 else 0.0,
                   "skipped_batches": r.skipped}
            r.history.append(row)
            _save_epoch(r, epoch, eval_model, weights, metrics, cuda, validated)
            scored = scores_text(row) + ("" if validated else f" (train.validate_from {tc.validate_from})")
            log.info("%s epoch %d/%d: train loss %.4f, %s, lr %.2e, %.1f s, %.1f img/s, %d skipped%s%s", r.variant,
                     epoch + 1, tc.epochs, row["train_loss"], scored, r.lr, row["seconds"], row["images_per_s"],
                     r.skipped, f", {weights} weights" if r.ema is not None else "",
                     " (best)" if r.best_epoch == epoch + 1 else "")
            if on_epoch is not None:
                on_epoch(r.variant, row)

    return {r.variant: TrainResult(r.variant, r.out, tc.epochs, r.best_epoch, r.best_abs_rel, history=r.history,
                                   seed=tc.seed) for r in runs}


def _validate_epoch(tc: TrainConfig, active: list, sources: Sources, epoch: int, depth_range, cuda: bool):
    """BatchNorm statistics recomputed (`train.bn_recompute`), then every candidate validated in one pass over the
    val split: (run, model, weights) with the EMA weights or the raw ones, and with ema_select=better both (the
    release's eval_both_for_best: EMA kept only if strictly better). Returns (candidates, their scores)."""
    if tc.bn_recompute:
        bn_batches = list(islice(sources.train.epoch(epoch), tc.bn_recompute))  # read once for all
        for r in active:
            with own_random_stream(r):  # train-mode forwards: dropout draws
                for m in [r.model] + ([r.ema.module] if r.ema is not None else []):
                    recompute_bn(m, bn_batches)
    candidates = []
    for r in active:
        candidates.append(_validated_weights(r))
        if r.ema is not None and tc.ema_select == "better":
            candidates.append((r, r.model, "raw"))
    return candidates, validate_many([m for _, m, _ in candidates], sources.val, depth_range, autocast=cuda)


def _validated_weights(r: _Run) -> tuple:
    """(run, model, weights) validated and kept each epoch: the EMA weights where the run keeps an EMA."""
    return (r, r.model, "raw") if r.ema is None else (r, r.ema.module, "ema")


def scores_text(row: dict) -> str:
    """A history row's validation scores for a log line, or that it has none (an epoch not validated, or a
    validation split without valid pixels)."""
    if not math.isfinite(row["val_abs_rel"]):
        return "no validation scores"
    return f"val AbsRel {row['val_abs_rel']:.4f}, RMSE {row['val_rmse']:.3f}, d1 {row['val_d1']:.3f}"


def _save_epoch(r: _Run, epoch: int, eval_model, weights: str, metrics: dict, cuda: bool,
                validated: bool) -> None:
    """Files, in an order that a kill at any point resumes from: checkpoints, history, then the state. An epoch not
    validated (`train.validate_from`) leaves best/ as it is."""
    scores = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}  # JSON
    extra = {**r.ckpt_extra, "epoch": epoch + 1, "val_metric": {"name": "abs_rel", "value": scores["abs_rel"]},
             "val_metrics": scores, "weights": weights}
    save_checkpoint(eval_model, r.out / "last", extra)
    abs_rel = metrics["abs_rel"]
    if validated and (not math.isfinite(abs_rel) or abs_rel < r.best_abs_rel):  # no val pixels: best follows last
        r.best_abs_rel, r.best_epoch = (abs_rel if math.isfinite(abs_rel) else r.best_abs_rel), epoch + 1
        save_checkpoint(eval_model, r.out / "best", extra)
    write_history(r.out / HISTORY_NAME, r.history)
    state = {
        "meta": json.dumps(r.meta), "epoch": epoch + 1, "best_abs_rel": r.best_abs_rel, "best_epoch": r.best_epoch,
        "model": _cpu_state(r.model), "optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(),
        "torch_rng": r.rng["cpu"],
    }
    if r.ema is not None:
        state["ema"] = _cpu_state(r.ema.module)
    if cuda:
        state["cuda_rng"] = r.rng["cuda"]
    save_state(r.out / STATE_NAME, state)
