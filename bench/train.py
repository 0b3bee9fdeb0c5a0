"""Seconds per decoder training step: from the cache, the decoder alone, and with the encoder in the loop.

    .venv/bin/python bench/train.py [--variant full] [--batch-size 4] [--warmup 1] [--steps 3] [--rounds 3]

Same variant, batch size, loss and optimiser (`pipeline.train.train_step`) in every mode; `clip-vit-b16-random`
sizes (ViT-B/16 width 768, 14 x 14 grid, decoder at 224 x 224); CPU unless --device cuda.

- `decoder_only_s_per_step` (b): the decoder's forward + backward + AdamW step on one batch of tensors already in
  memory. The limit: no data pipeline at all.
- `cached_s_per_step` (a): training steps fed by `CachedBatches` over a real Zarr store of random-weight ViT-B/16
  features (`--images` synthetic KITTI frames extracted by the pipeline), with the config's `cache_device: auto`
  (this store fits in RAM, so it is held resident); `cached_stream_s_per_step`: the same with
  `cache_device: stream` (whole-chunk reads + decompression in the prefetch thread, what a cache larger than RAM
  does). Flips are on (p = 0.5) in both.
- `images_s_per_step` (c): `feature_source: images`: PNG decode + crop + preprocess (prefetch threads) and the
  frozen encoder's forward on every step, then the same decoder step.

Ratios: `cached_over_decoder_only` = a/b (target <= 1.15), `images_over_cached` = c/a. The modes run in
alternation (`--rounds`, in a rotated order each round; a mode's loader thread runs only while that mode is timed),
each round timing `--steps` steps after `--warmup`, and
the median step is reported, so that load from other processes on a shared machine hits all modes alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_config  # noqa: E402
from pipeline.extract import encoder_for, open_for, plan_split, resolve_device  # noqa: E402
from pipeline.loader import CachedBatches, ImageBatches, batch_to  # noqa: E402
from pipeline.train import loss_kwargs_for, train_step  # noqa: E402
from spaceclip.decoder import SpaceClipDecoder  # noqa: E402


def write_config(root: Path, images: int, encoder: str, batch: int, device: str) -> Path:
    data = root / "data"
    cfg = {
        "name": "bench-train",
        "data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                 "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/eigen_test_files_with_gt.txt"),
                 "val_fraction": 0.0, "synth": {"train": images, "test": 2, "seed": 5}},
        "encoder": {"name": encoder, "batch_size": 8, "device": device},
        "views": {"views_per_image": 1},
        "cache": {"root": str(root / "cache"), "chunk_size": 8},
        "train": {"batch_size": batch, "device": device},
        "dask": {"processes": False},
    }
    path = root / "bench-train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_store(cfg) -> None:
    from pipeline.datasets import ensure_dataset
    from pipeline.extract import extract_chunk, finalize_store, prepare_store

    ensure_dataset(cfg.data)
    store, reused = prepare_store(cfg, "train", encoder_for(cfg))
    for chunk in store.pending_chunks():
        extract_chunk(cfg, store.url, chunk)
    finalize_store(store.url)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="full")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--global-warmup", type=int, default=3, help="untimed steps before any mode is timed")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode and round")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=32, help="synthetic frames in the benchmark store")
    ap.add_argument("--encoder", default="clip-vit-b16-random")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "spaceclip-bench-train"),
                    help="data + cache folder, reused across runs (the store is found again by fingerprint)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(root, args.images, args.encoder, args.batch_size, args.device))
    t0 = time.perf_counter()
    build_store(cfg)
    build_s = time.perf_counter() - t0
    device = resolve_device(args.device)
    encoder = encoder_for(cfg).to(device)
    store = open_for(cfg, "train", encoder)

    torch.manual_seed(0)
    model = SpaceClipDecoder(args.variant, width=encoder.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    loss_kwargs = loss_kwargs_for(cfg)
    kw = dict(flip_p=0.5, seed=0, device=device)

    resident = CachedBatches(store, model.layers, args.batch_size, cache_device="auto", **kw)
    streamed = CachedBatches(store, model.layers, args.batch_size, cache_device="stream", **kw)
    plan = plan_split(cfg, "train", encoder)
    images = ImageBatches(plan.index, encoder, model.layers, args.batch_size, split_file=cfg.data.train_split,
                          layout=cfg.data.layout, target_hw=plan.target_hw, chunk_size=cfg.cache.chunk_size,
                          **kw)
    first = resident.epoch(0)
    fixed = batch_to(next(first), device)  # (b): one batch, kept in memory
    first.close()
    loaders = {"decoder_only": None, "cached": resident, "cached_stream": streamed, "images": images}
    if len(resident) < args.warmup + args.steps:
        sys.exit(f"--images {args.images} gives {len(resident)} batches per epoch; need >= warmup + steps")
    # The first steps of a process are slow (allocator growth, AdamW state creation, oneDNN primitive caches):
    # several seconds more each on the CPU. Untimed, before any mode, so they do not land on the first one timed.
    for _ in range(args.global_warmup):
        train_step(model, optimizer, fixed, loss_kwargs, grad_clip=1.0)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in loaders}
    sequence: list[tuple[str, float]] = []  # every timed step, in the order run
    names = list(loaders)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated each round: drift hits all alike
            # Each mode's background producer lives only while that mode is timed: a fresh epoch iterator, closed
            # afterwards, so no other mode's prefetch thread competes for the cores or fills a queue in advance.
            source = iter(lambda: fixed, None) if loaders[name] is None else loaders[name].epoch(r)
            for i in range(args.warmup + args.steps):
                sync(device)
                start = time.perf_counter()
                batch = next(source)  # time spent waiting for data counts
                train_step(model, optimizer, batch, loss_kwargs, grad_clip=1.0)
                sync(device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    sequence.append((name, round(time.perf_counter() - start, 2)))
            if hasattr(source, "close"):
                source.close()

    per_step = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "cached_s_per_step": per_step["cached"],
        "decoder_only_s_per_step": per_step["decoder_only"],
        "images_s_per_step": per_step["images"],
        "cached_stream_s_per_step": per_step["cached_stream"],
        "cached_over_decoder_only": per_step["cached"] / per_step["decoder_only"],
        "cached_stream_over_decoder_only": per_step["cached_stream"] / per_step["decoder_only"],
        "images_over_cached": per_step["images"] / per_step["cached"],
        "mean_s_per_step": {name: statistics.fmean(t) for name, t in times.items()},
        "timed_steps_in_order": sequence,
        "variant": args.variant,
        "batch_size": args.batch_size,
        "encoder": args.encoder,
        "width": encoder.width,
        "target_hw": list(resident.target_hw),
        "cache_mode_auto": resident.mode,
        "store_samples": store.n,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "timed_steps_per_mode": args.steps * args.rounds,
        "warmup_steps_per_round": args.warmup,
        "global_warmup_steps": args.global_warmup,
        "store_build_s": build_s,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
