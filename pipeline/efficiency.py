"""What a frozen encoder + decoder costs at inference, measured as the authors measure it (their repository,
docs/efficiency.md): parameters, FLOPs, latency, throughput and peak memory, per decoder variant.

    measure_efficiency(cfg, {"baseline": decoder, ...})  ->  DataFrame, one row per variant
    write_efficiency(table, out_dir)                      ->  results/<sweep>/efficiency.{csv,md}

What each number is:
  parameters   `sum(p.numel())` of the encoder's whole HF model (the pooled vector FiLM reads needs its post-norm)
               and of the decoder; trainable = those with `requires_grad` (the frozen encoder has none)
  FLOPs        per image, at batch 1, as `torch.utils.flop_counter.FlopCounterMode` counts them: 2 per
               multiply-add of every matmul, convolution (transposed too) and attention product; bias adds,
               norms, activations and resizes are not counted. Attention is counted through the math backend
               (the CPU's fused kernel has no FLOP formula in torch).
  latency      wall time of one call at batch 1 (mean, p50, p95 over the repeats, after warm-up; CUDA synchronised),
               for the encoder alone (pixels -> token grids and pooled vector), the decoder alone (features ->
               depth at its native size, 16g x 16g for four stages) and both in turn. Image decoding and
               preprocessing are not included.
  throughput   images per second at batch `eval.efficiency_batch`, same three parts
  peak memory  both parts at batch 1 and at the larger batch, weights + input + every intermediate tensor alive at
               once. CUDA: `torch.cuda.max_memory_allocated` after a reset (as the authors), less the allocations
               made before the call that are neither these weights nor this input.
               CPU: the same quantity counted exactly: the weights' and the input's bytes plus the peak of the
               bytes of tensors the forward allocates and still holds (every ATen op's outputs, tracked by storage
               with a `TorchDispatchMode`; kernels' private scratch space is not a tensor and is not seen).
The encoder runs at the autocast dtype extraction uses (`encoder.dtype`: bfloat16 on CUDA, float32 on a CPU), the
decoder in float32 as evaluation runs it.
"""

from __future__ import annotations

import logging
import math
import platform
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config
from pipeline.devices import encoder_settings
from pipeline.layout import encoder_for, resolve_device
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.encoder import FrozenEncoder

log = logging.getLogger(__name__)

AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2 ** 20
WARMUP = 1
REPEATS = 20  # timed calls per measurement, fewer when `BUDGET_S` runs out first (at least MIN_REPEATS)
MIN_REPEATS = 3
BUDGET_S = 0.5  # seconds of timed calls per measurement: the demo's whole table stays within ~20 s on 2 cores

# The authors' published figures (CLIP ViT-B/16 at 224 px, decoder channels [256, 128, 64, 32], their full model).
AUTHORS_SOURCE = ("taewan2002/SPACE-CLIP docs/efficiency.md (commit 71615ce), the paper's integration table "
                  "(configs/nyu.yaml, batch 1, 10 warm-up + 50 timed calls, device cuda:1, GPU model not named)")
AUTHORS_ROWS = [
    {"variant": "full (authors)", "encoder": "openai/clip-vit-base-patch16", "device": "cuda:1 (model not named)",
     "params_total": 97_850_420, "params_trainable": 12_050_996, "params_encoder": 85_799_424,
     "params_decoder": 12_050_996, "both_b1_mean_ms": 5.200, "peak_b1_mib": 468.1,
     "memory_measure": "torch.cuda.max_memory_allocated (their 'peak_memory_mb' field, MiB)",
     "source": AUTHORS_SOURCE},
    {"variant": "encoder only (authors)", "encoder": "openai/clip-vit-base-patch16",
     "device": "cuda:1 (model not named)", "params_total": 85_799_424, "params_trainable": 0,
     "params_encoder": 85_799_424, "params_decoder": 0, "encoder_b1_mean_ms": 3.368, "peak_b1_mib": 346.9,
     "memory_measure": "torch.cuda.max_memory_allocated (their 'peak_memory_mb' field, MiB)",
     "source": AUTHORS_SOURCE},
]

PARTS = ("encoder", "decoder", "both")


# ---- counting -----------------------------------------------------------------------------------------------------
def parameter_counts(encoder: torch.nn.Module, decoder: torch.nn.Module) -> dict[str, int]:
    """total, trainable, encoder and decoder parameters (`numel`, buffers such as BatchNorm statistics excluded)."""
    enc = sum(p.numel() for p in encoder.parameters())
    dec = sum(p.numel() for p in decoder.parameters())
    trainable = sum(p.numel() for m in (encoder, decoder) for p in m.parameters() if p.requires_grad)
    return {"params_total": enc + dec, "params_trainable": trainable, "params_encoder": enc, "params_decoder": dec}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as `FlopCounterMode` counts them (2 per multiply-add). Scaled-dot-product
    attention is routed through the math backend, whose batched matmuls are counted on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


class LiveTensorPeak(TorchDispatchMode):
    """The peak, over a forward pass, of the bytes held by the tensors its ATen ops allocated (each storage counted
    once, until the last tensor viewing it is gone). Storages that existed before (`known`: weights, inputs) are
    never counted, nor are views of them."""

    def __init__(self, known: list[torch.Tensor] = ()):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive that view it]
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.known:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]


def tensor_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())


def peak_memory(fn: Callable[[], object], device: torch.device, resident: list[torch.Tensor]) -> int:
    """Bytes at the peak of one call of `fn`: weights + inputs (`resident`) + the intermediate tensors alive at once
    (module docstring). CUDA: the allocator's own peak, less what was allocated before the call that is not
    `resident` (other decoders' weights, features kept for the timings), so that it measures the same thing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)) - before + tensor_bytes(resident)
    with LiveTensorPeak(resident) as tracker:
        out = fn()
    del out
    return tensor_bytes(resident) + tracker.peak


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int = REPEATS,
               budget_s: float = BUDGET_S, warmup: int = WARMUP) -> np.ndarray:
    """Seconds of each timed call (after `warmup` untimed ones): `repeats` calls, or fewer (at least
    `MIN_REPEATS`) once `budget_s` is spent."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= MIN_REPEATS and time.perf_counter() - started > budget_s:
            break
    return np.asarray(times)


def device_name(device: torch.device) -> str:
    """The device as a reader can look it up: the GPU model, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {torch.get_num_threads()} torch threads)"


# ---- the table ----------------------------------------------------------------------------------------------------
def measure_efficiency(
    cfg: Config,
    decoders: dict[str, SpaceClipDecoder],
    *,
    encoder: FrozenEncoder | None = None,
    batch: int | None = None,
    repeats: int = REPEATS,
    budget_s: float = BUDGET_S,
    warmup: int = WARMUP,
) -> pd.DataFrame:
    """One row per decoder (variant name -> decoder, e.g. each variant's evaluated checkpoint): parameters, FLOPs,
    latency, throughput and peak memory (module docstring), on the device evaluation uses (`train.device`)."""
    encoder = encoder or encoder_for(cfg)
    device = resolve_device(cfg.train.device)
    batch = batch or cfg.eval.efficiency_batch
    dtype_name = encoder_settings(cfg.encoder).dtype if device.type == "cuda" else "float32"
    autocast = AUTOCAST[dtype_name]
    encoder = encoder.to(device)
    where = device_name(device)
    size = encoder.image_size
    generator = torch.Generator().manual_seed(0)
    pixels = {b: torch.randn(b, 3, size, size, generator=generator).to(device) for b in (1, batch)}
    layers = sorted(set().union(*(d.layers for d in decoders.values())))
    enc_weights = [*encoder.model.parameters(), *encoder.model.buffers()]

    def encode(b: int, cast: bool = True) -> dict:
        return encoder(pixels[b], layers, autocast_dtype=autocast if cast else None)

    log.info("efficiency on %s: encoder %s at %d px (%s), batch 1 and %d", where, encoder.name, size, dtype_name,
             batch)
    with torch.inference_mode():
        enc_flops = count_flops(lambda: encode(1, cast=False)) if decoders else 0
        enc_time = {b: time_calls(lambda: encode(b), device, repeats, budget_s, warmup) for b in (1, batch)}
        features = {b: encode(b) for b in (1, batch)}
    rows = []
    for name, decoder in decoders.items():
        decoder = decoder.to(device).eval()
        dec_weights = [*decoder.parameters(), *decoder.buffers()]

        def decode(b: int) -> torch.Tensor:
            return decoder(features[b])["depth"]

        def both(b: int) -> torch.Tensor:
            return decoder(encode(b))["depth"]

        with torch.inference_mode():
            dec_flops = count_flops(lambda: decode(1))
            dec_time = {b: time_calls(lambda: decode(b), device, repeats, budget_s, warmup) for b in (1, batch)}
            both_time = {b: time_calls(lambda: both(b), device, repeats, budget_s, warmup) for b in (1, batch)}
            peak = {b: peak_memory(lambda: both(b), device, enc_weights + dec_weights + [pixels[b]])
                    for b in (1, batch)}
        row = {"variant": name, "encoder": encoder.name, "device": where, "image_size": size,
               "grid": encoder.grid, "depth_size": decoder.upscale * encoder.grid, "encoder_dtype": dtype_name,
               **parameter_counts(encoder.model, decoder),
               "gflops_encoder": enc_flops / 1e9, "gflops_decoder": dec_flops / 1e9,
               "gflops_total": (enc_flops + dec_flops) / 1e9}
        for part, times in (("encoder", enc_time), ("decoder", dec_time), ("both", both_time)):
            ms = times[1] * 1e3
            row |= {f"{part}_b1_mean_ms": ms.mean(), f"{part}_b1_p50_ms": np.percentile(ms, 50),
                    f"{part}_b1_p95_ms": np.percentile(ms, 95),
                    f"{part}_b{batch}_img_s": batch / times[batch].mean()}
        row |= {"peak_b1_mib": peak[1] / MIB, f"peak_b{batch}_mib": peak[batch] / MIB,
                "memory_measure": ("torch.cuda.max_memory_allocated over the call (weights + input + activations)"
                                   if device.type == "cuda"
                                   else "weights + input + peak of live ATen tensors (TorchDispatchMode)"),
                "batch": batch, "repeats": int(min(len(t) for d in (enc_time, dec_time, both_time)
                                                 for t in d.values())),
                "source": "measured here"}
        rows.append(row)
        log.info("%s: %s parameters (%s trainable), %.2f GFLOPs per image, %.1f ms per image at batch 1, "
                 "%.1f images/s at batch %d, peak %.0f MiB", name, f"{row['params_total']:,}",
                 f"{row['params_trainable']:,}", row["gflops_total"], row["both_b1_mean_ms"],
                 row[f"both_b{batch}_img_s"], batch, row["peak_b1_mib"])
    return pd.DataFrame(rows)


def evaluated_decoders(evaluation, cfg: Config, width: int) -> dict[str, SpaceClipDecoder]:
    """Variant -> the decoder of its first evaluated checkpoint (the seed changes the weights, not the cost), or,
    for an evaluation without checkpoints (injected predictors), the decoder the config describes."""
    out: dict[str, SpaceClipDecoder] = {}
    for c in evaluation.checkpoints.values():
        if c["variant"] not in out:
            out[c["variant"]] = SpaceClipDecoder.from_pretrained(c["path"])
    if not out:
        out = {v: SpaceClipDecoder(v, width=width, **cfg.decoder.kwargs()) for v in cfg.train.variants}
    return out


def with_published(table: pd.DataFrame) -> pd.DataFrame:
    """The measured rows followed by the authors' published figures (sourced; blank where they publish none)."""
    return pd.concat([table, pd.DataFrame(AUTHORS_ROWS)], ignore_index=True)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def efficiency_markdown(table: pd.DataFrame) -> str:
    """Two Markdown tables (size and compute; speed and memory) and the notes a reader needs to use them."""
    measured = table[table["source"] == "measured here"]
    batch = int(measured["batch"].iloc[0]) if len(measured) else 8
    lines = ["## Size and compute", "",
             "| variant | encoder | parameters | trainable | encoder | decoder | GFLOPs encoder | GFLOPs decoder "
             "| GFLOPs total |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table.to_dict("records"):
        lines.append(f"| {r['variant']} | {r['encoder']} | {_fmt(r['params_total'], ',')} | "
                     f"{_fmt(r['params_trainable'], ',')} | {_fmt(r['params_encoder'], ',')} | "
                     f"{_fmt(r['params_decoder'], ',')} | {_fmt(r.get('gflops_encoder'), '.2f')} | "
                     f"{_fmt(r.get('gflops_decoder'), '.2f')} | {_fmt(r.get('gflops_total'), '.2f')} |")
    lines += ["", "## Speed and memory", "",
              "| variant | device | ms/image at batch 1: encoder (mean, p50, p95) | decoder | both | images/s at "
              f"batch {batch}: encoder | decoder | both | peak MiB, batch 1 | peak MiB, batch {batch} |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in table.to_dict("records"):
        cells = [" / ".join(_fmt(r.get(f"{p}_b1_{s}_ms"), ".2f") for s in ("mean", "p50", "p95"))
                 for p in PARTS]
        cells = [c if c != "— / — / —" else "—" for c in cells]
        cells = [c.replace(" / — / —", "") for c in cells]  # published means only
        lines.append(f"| {r['variant']} | {r['device']} | " + " | ".join(cells) + " | "
                     + " | ".join(_fmt(r.get(f"{p}_b{batch}_img_s"), ".1f") for p in PARTS)
                     + f" | {_fmt(r.get('peak_b1_mib'), '.1f')} | {_fmt(r.get(f'peak_b{batch}_mib'), '.1f')} |")
    notes = sorted(set(table["memory_measure"].dropna()))
    lines += ["", "FLOPs: per image at batch 1, `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add of "
              "matmuls, convolutions and attention; norms, activations and resizes not counted). Latency: wall time "
              "of one call after warm-up (CUDA synchronised), pixels in, tokens or depth out (at the decoder's native "
              "size, `depth_size`); image decoding and preprocessing not included. Encoder at its extraction dtype, "
              "decoder float32.",
              "Peak memory: " + "; ".join(notes) + ".",
              f"Published rows: {AUTHORS_SOURCE}."]
    return "\n".join(lines) + "\n"


def write_efficiency(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """efficiency.csv (every column, the published rows included) and efficiency.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = with_published(table)
    table.to_csv(out / "efficiency.csv", index=False)
    (out / "efficiency.md").write_text("# Efficiency\n\n" + efficiency_markdown(table))
    return {"efficiency_csv": out / "efficiency.csv", "efficiency_md": out / "efficiency.md"}
