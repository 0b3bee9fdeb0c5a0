"""Seconds per decoder training step: from the cache, the decoder alone, and with the encoder in the loop.

    .venv/bin/python bench/train.py [--variant full] [--batch-size 4] [--warmup 1] [--steps 3] [--rounds 3]
    .venv/bin/python bench/train.py --data-only --threads 1 [--images 64]

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

The data paths with the decoder taken out (issue 14), `full` layers:
- `read_limit_samples_per_s`: `--threads` cores x the single-thread rate of reading and decompressing one whole
  chunk (`FeatureStore.read_chunk`, chunk after chunk in one pool thread, as the loader reads).
- `parallel_read_samples_per_s`: the same reads in `--threads` threads at once: what the cores reach together.
- `stream_samples_per_s`: the streaming loader alone (`cache_device: stream`, `read_workers = --threads`, flips
  on), an epoch iterated with no decoder: whole chunks read, rows gathered into batches, flips applied on the
  host. `stream_over_read_limit`: against the read limit (goal >= 0.8).
- `bytes_read_per_epoch`: compressed bytes a streamed epoch reads from the store for the four Table-2 variants,
  one pass each (`separate`) vs `train.shared_pass` (one read of the union of their layers).
- `projection_h100`: the 4-variant x 10-epoch KITTI sweep (23,158 samples) on one H100, from these figures and
  the assumptions it lists.
`--data-only` measures these and skips the step timings below.

Ratios: `cached_over_decoder_only` = a/b (target <= 1.15), `images_over_cached` = c/a. The modes run in
alternation (`--rounds`, in a rotated order each round; a mode's loader thread runs only while that mode is timed),
each round timing `--steps` steps after `--warmup`, and
the median step is reported, so that load from other processes on a shared machine hits all modes alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/extract.py's NullEncoder

from pipeline.config import load_config  # noqa: E402
from pipeline.devices import encoder_settings, usable_cores  # noqa: E402
from pipeline.extract import plan_split  # noqa: E402
from pipeline.image_batches import ImageBatches  # noqa: E402
from pipeline.layout import RunContext, encoder_for, resolve_device  # noqa: E402
from pipeline.loader import CachedBatches  # noqa: E402
from pipeline.store import layer_key  # noqa: E402
from pipeline.train import loss_kwargs_for, make_optimizer, train_step  # noqa: E402
from spaceclip.decoder import SpaceClipDecoder  # noqa: E402


def write_config(root: Path, images: int, encoder: str, batch: int, device: str, compressor: str | None = None) -> Path:
    data = root / "data"
    cfg = {
        "name": "bench-train",
        "data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                 "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/eigen_test_files_with_gt.txt"),
                 "val_fraction": 0.0, "synth": {"train": images, "test": 2, "seed": 5}},
        "encoder": {"name": encoder, "batch_size": 8, "device": device},
        "views": {"views_per_image": 1},
        "cache": {"root": str(root / "cache"), "chunk_size": 8, **({"compressor": compressor} if compressor else {})},
        "train": {"batch_size": batch, "device": device},
        "dask": {"processes": False},
    }
    path = root / "bench-train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_store(cfg, null_encoder: bool = False) -> None:
    """The benchmark's training store, extracted by the pipeline. `null_encoder`: with `bench/extract.py`'s
    zero-cost stand-in (the real encoder's activations on the first batch, repeated), so that a store of
    hundreds of samples is built in seconds for the data-path figures; the chunks hold real activations to read."""
    from pipeline import datasets, synth
    from pipeline.extract import extract_chunks, prepare_store
    from pipeline.layout import finalize_store

    synth.ensure(cfg.data)
    store, reused = prepare_store(RunContext.of(cfg), "train")
    encoder = None
    if null_encoder and store.pending_chunks():
        from extract import NullEncoder  # bench/extract.py

        real = encoder_for(cfg)
        frames = datasets.read_split(cfg.data, "train")[: encoder_settings(cfg.encoder).batch_size]
        pixels = torch.cat([real.preprocess(datasets.load_image(s)) for s in frames])
        encoder = NullEncoder(real, pixels, cfg.cache_layers)
    extract_chunks(cfg, store.url, store.pending_chunks(), encoder=encoder)
    finalize_store(store.url)


def chunk_bytes(store, name: str) -> int:
    """Compressed bytes of one array's chunk files: what a streamed epoch reads of it."""
    return sum(p.stat().st_size for p in (Path(store.url) / name).rglob("*") if p.is_file() and p.name != "zarr.json")


def data_paths(cfg, store, threads: int, batch: int) -> dict:
    """The streaming loader against the read limit, and the bytes a 4-variant sweep reads per epoch."""
    layers = cfg.decoder.layers_of("full")
    # One thread's rate of reading whole chunks as the loader reads them (file read, checksum, decompression when
    # the store is compressed; targets as stored); best of three passes (the first warms the page cache). In a pool
    # thread, as the loader reads: this process's main thread measured 2-3x slower on the same reads (its malloc
    # arena hands back fresh pages for every chunk buffer), which would flatter the ratio.
    def read_all(chunks) -> None:
        for c in chunks:
            store.read_chunk(c, layers)

    per_pass, parallel = [], []
    for _ in range(3):
        with ThreadPoolExecutor(1) as one:
            t0 = time.perf_counter()
            one.submit(read_all, range(store.n_chunks)).result()
            per_pass.append(time.perf_counter() - t0)
        # What `threads` threads reading at once actually reach here (memory bandwidth and the hypervisor decide):
        # the ceiling any loader on these cores meets, against which the limit's `threads x` is an assumption.
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(read_all, [range(i, store.n_chunks, threads) for i in range(threads)]))
            parallel.append(time.perf_counter() - t0)
    read_s = min(per_pass)
    loader = CachedBatches(store, layers, batch, cache_device="stream", flip_p=0.5, seed=0, read_workers=threads)
    runs = []
    for epoch in range(3):
        t0 = time.perf_counter()
        samples = sum(len(b.index) for b in loader.epoch(epoch))
        runs.append(time.perf_counter() - t0)
    stream_s = min(runs)
    read_limit = threads * store.n / read_s
    # Bytes per epoch: each pass reads every chunk of its layers, the CLS vectors and the targets once.
    fixed = chunk_bytes(store, "cls") + chunk_bytes(store, "depth")
    per_layer = {k: chunk_bytes(store, layer_key(k)) for k in store.layers}
    variants = ["baseline", "film", "structural", "full"]
    per_variant = {v: fixed + sum(per_layer[k] for k in cfg.decoder.layers_of(v)) for v in variants}
    separate = sum(per_variant.values())
    union = sorted(set().union(*(cfg.decoder.layers_of(v) for v in variants)))
    shared = fixed + sum(per_layer[k] for k in union)
    return {
        "stream_samples_per_s": round(samples / stream_s, 2),
        "read_limit_samples_per_s": round(read_limit, 2),
        "stream_over_read_limit": round(samples / stream_s / read_limit, 3),
        "single_thread_read_ms_per_sample": round(1000 * read_s / store.n, 3),
        "parallel_read_samples_per_s": round(store.n / min(parallel), 2),
        "stream_over_parallel_read": round(samples / stream_s / (store.n / min(parallel)), 3),
        "stream_s_runs": [round(x, 3) for x in runs],
        "read_s_passes": [round(x, 3) for x in per_pass],
        "parallel_read_s_passes": [round(x, 3) for x in parallel],
        "layers": list(layers), "read_workers": threads, "batch_size": batch,
        "feature_codec": f"{cfg.cache.compressor}-{cfg.cache.compression_level}" if cfg.cache.compressor != "none"
        else "none",
        "bytes_per_sample_on_disk": round(sum(chunk_bytes(store, n) for n in store.data_arrays()) / store.n),
        "bytes_read_per_epoch": {"separate_4_passes": separate, "shared_pass": shared,
                                 "ratio": round(separate / shared, 3), "samples": store.n, "per_variant": per_variant,
                                 "per_sample": {"separate": round(separate / store.n),
                                                "shared": round(shared / store.n)}},
    }


def decoder_flops(variant: str, width: int, grid: int, target_hw) -> float:
    """FLOPs of one training step of one sample (forward + backward ~ 3 x forward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = SpaceClipDecoder(variant, width=width)
    feats = {"tokens": {k: torch.randn(1, grid, grid, width) for k in model.layers}, "global": torch.randn(1, width)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(feats, out_size=tuple(target_hw))
    return 3.0 * counter.get_total_flops()


def projection_h100(data: dict, width: int, grid: int, target_hw, epochs: int = 10, samples: int = 23_158) -> dict:
    """The 4-variant x 10-epoch KITTI sweep on one H100, from the measured data paths; assumptions listed."""
    peak, mfu, cores = 989e12, 0.25, 16
    flops = {v: decoder_flops(v, width, grid, target_hw) for v in ("baseline", "film", "structural", "full")}
    compute_s = sum(flops.values()) * samples * epochs / (peak * mfu)
    per_core = data["read_limit_samples_per_s"] / data["read_workers"]
    stream_rate = per_core * cores * data["stream_over_read_limit"]  # samples/s the loader feeds
    ratio = data["bytes_read_per_epoch"]["ratio"]
    data_shared_s = samples * epochs / stream_rate
    data_separate_s = data_shared_s * ratio  # the separate passes read ratio x the bytes (decompress them, too)
    # A pass is as slow as its slower side when loading and stepping overlap (prefetch, side-stream copies).
    shared_s = max(compute_s, data_shared_s)
    read = data["bytes_read_per_epoch"]
    separate_s = sum(max(samples * epochs * f / (peak * mfu),
                         data_shared_s * read["per_variant"][v] / read["shared_pass"]) for v, f in flops.items())
    return {
        "assumptions": {
            "gpu": "H100 SXM, 989 TFLOP/s dense bf16 peak", "decoder_mfu": mfu,
            "training_flops": "3 x forward FLOPs (torch FlopCounterMode, paper decoder at ViT-B/16 widths)",
            "host_cores": cores,
            "stream_rate_per_core": "this machine's single-thread chunk read rate (file read + checksum + "
                                    "decompression when compressed) x the stream/limit ratio measured here",
            "cache": "48.6 GB (7 layers fp16) does not fit half an 80 GB H100: streamed",
            "variants_layers": "baseline/film 4 layers, structural/full 7", "extraction": "not included",
        },
        "train_flops_per_sample": {v: round(f / 1e9, 2) for v, f in flops.items()},  # GFLOP
        "compute_h": round(compute_s / 3600, 2),
        "stream_samples_per_s_16_cores": round(stream_rate),
        "data_h_shared_pass": round(data_shared_s / 3600, 2),
        "data_h_separate_passes": round(data_separate_s / 3600, 2),
        "sweep_h_shared_pass": round(shared_s / 3600, 2),
        "sweep_h_separate_passes": round(separate_s / 3600, 2),
    }


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
    ap.add_argument("--threads", type=int, default=None, help="torch threads and read workers [all cores]")
    ap.add_argument("--data-only", action="store_true", help="only the data paths (no decoder steps)")
    ap.add_argument("--stream-batch", type=int, default=16, help="batch size of the streaming-loader measure")
    ap.add_argument("--compressor", default=None, choices=["none", "zstd", "blosc-zstd"],
                    help="codec of the feature arrays [the config default]")
    ap.add_argument("--null-store", action="store_true",
                    help="build the store with the zero-cost stand-in encoder (fast; for --data-only on many --images)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "spaceclip-bench-train"),
                    help="data + cache folder, reused across runs (the store is found again by fingerprint)")
    args = ap.parse_args()
    threads = args.threads or usable_cores()  # the cores this process may use, as the pipeline counts them
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(root, args.images, args.encoder, args.batch_size, args.device, args.compressor))
    t0 = time.perf_counter()
    build_store(cfg, null_encoder=args.null_store)
    build_s = time.perf_counter() - t0
    device = resolve_device(args.device)
    encoder = encoder_for(cfg).to(device)
    store = RunContext.of(cfg).open_store("train")
    data = data_paths(cfg, store, threads, args.stream_batch)
    data["projection_h100"] = projection_h100(data, encoder.width, encoder.grid, store.group["depth"].shape[1:])
    data["load_avg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    data["cpu_count"], data["store_samples"], data["chunk_size"] = os.cpu_count(), store.n, store.chunk_size
    if args.data_only:
        print(json.dumps(data, indent=1))
        return

    torch.manual_seed(0)
    model = SpaceClipDecoder(args.variant, width=encoder.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(model, cfg.train, device)  # the trainer's: fused on a GPU (no host read a step)
    loss_kwargs = loss_kwargs_for(cfg)
    kw = dict(flip_p=0.5, seed=0, device=device)

    resident = CachedBatches(store, model.layers, args.batch_size, cache_device="auto", **kw)
    streamed = CachedBatches(store, model.layers, args.batch_size, cache_device="stream", **kw)
    plan = plan_split(cfg, "train")
    images = ImageBatches(plan.index, encoder, model.layers, args.batch_size, split_file=cfg.data.train_split,
                          layout=cfg.data.layout, target_hw=plan.target_hw, chunk_size=cfg.cache.chunk_size,
                          **kw)
    first = resident.epoch(0)
    fixed = next(first).to(device)  # (b): one batch, kept in memory
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
        "data_paths": data,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
