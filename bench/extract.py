"""Extraction throughput and bytes on disk, printed as one JSON object.

    .venv/bin/python bench/extract.py [--images 32] [--repeats 2] [--threads N] [--encoder clip-vit-b16-random]

- `bare_forward_images_per_s`: the encoder alone on images already decoded and preprocessed in memory.
- `pipeline_images_per_s`: the extraction pipeline on the same images: PNG decode + crop + preprocess (in the
  decode pool) + forward + fp16 conversion + compression + Zarr writes + done flags, as `extract_splits` and each
  Dask worker run it (`pipeline.extract.extract_chunks`). The flow adds a fixed start-up cost (Prefect + Dask).
- `null_encoder_images_per_s`: the same whole extraction with a zero-cost stand-in encoder: it hands back real
  activations of the right shapes (the encoder's own output on the first batch, so compression costs what it does
  on real features) without computing anything. The data path alone.
- `decode_limit_images_per_s`: `--threads` cores x the single-core rate of decode + view + preprocess + target
  of one frame (`pipeline.extract._load_row`, timed one frame after another in one thread). The goal is
  null / limit >= 0.8: the data path scales with the cores and the write hides behind it.
  `decode_and_write_limit_images_per_s`: the same with one core's cost (CPU time, user + kernel) of writing an
  image's features into new chunk files (default codec) added to the frame's: what the cores can do when every
  write costs core time.
- `fresh_page_ms_per_mb`: this machine's cost of memory never touched before (`fresh_page_ms_per_mb()`), which
  every new page-cache page of a write pays.
- `bytes_per_image`: the store's size on disk divided by the number of samples, for the default codec, and
  `codecs`: ratio, write and read cost of each codec we considered for the feature arrays, measured on these
  activations (fp16 in, so only the codec and the file are timed).

`--threads N` sets torch's threads and the decode pool (default: all cores); `load_avg_1m` says how busy the
machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import datasets, synth  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.devices import usable_cores  # noqa: E402
from pipeline.extract import _load_row, extract_chunks, prepare_store  # noqa: E402
from pipeline.layout import RunContext, encoder_for, finalize_store  # noqa: E402
from pipeline.store import FeatureStore, StoreSpec  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class _Preprocess:
    """The encoder's preprocessing without the model, for decode worker processes (picklable)."""

    def __init__(self, encoder):
        self.args = (encoder.image_size, encoder.backbone.mean, encoder.backbone.std)

    def preprocess(self, image):
        from spaceclip.encoder import preprocess

        return preprocess(image, *self.args)


_WORKER = {}


def _init_process(url: str, encoder: _Preprocess, layout: str, target_hw) -> None:
    torch.set_num_threads(1)
    store = FeatureStore.open(url)
    _WORKER.update(store=store, rows=list(store.index().itertuples()), encoder=encoder, layout=layout,
                   target_hw=target_hw)


def _load_in_process(i: int):
    w = _WORKER
    return _load_row(w["store"], w["rows"][i], w["encoder"], w["layout"], w["target_hw"])


def decode_pools(store, encoder, layout: str, workers: int) -> dict:
    """Images/s of decode + view + preprocess + target over the store's frames: in this thread, in a pool of
    threads and in a pool of processes (which ship each (3, S, S) float32 frame and its target back)."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    rows = list(store.index().itertuples())
    target_hw = tuple(store.group["depth"].shape[1:]) if store.has_depth else None
    out = {}
    t0 = time.perf_counter()
    for row in rows:
        _load_row(store, row, encoder, layout, target_hw)
    out["one_thread"] = len(rows) / (time.perf_counter() - t0)
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda r: _load_row(store, r, encoder, layout, target_hw), rows))
        out["threads"] = len(rows) / (time.perf_counter() - t0)
    with ProcessPoolExecutor(workers, initializer=_init_process,
                             initargs=(store.url, _Preprocess(encoder), layout, target_hw)) as pool:
        list(pool.map(_load_in_process, range(workers)))  # start-up, untimed
        t0 = time.perf_counter()
        list(pool.map(_load_in_process, range(len(rows)), chunksize=2))
        out["processes"] = len(rows) / (time.perf_counter() - t0)
    return {k: round(v, 2) for k, v in out.items()}


class NullEncoder:
    """A zero-cost stand-in for the frozen encoder: the real one's preprocessing and sizes, and as features the real
    encoder's output on one batch, sliced to each batch's size (no compute, realistic bytes to write). The features
    come in the store's dtype, as from a GPU, where `extract_chunks` converts them on the device before copying
    them back."""

    def __init__(self, encoder, pixels: torch.Tensor, layers, dtype: torch.dtype = torch.float16):
        self.grid, self.width, self.preprocess = encoder.grid, encoder.width, encoder.preprocess
        feats = encoder(pixels, layers)
        self.feats = {"tokens": {k: t.to(dtype) for k, t in feats["tokens"].items()},
                      "global": feats["global"].to(dtype)}

    def __call__(self, pixels: torch.Tensor, layers, autocast_dtype=None) -> dict:
        b = pixels.shape[0]
        reps = -(-b // self.feats["global"].shape[0])
        take = lambda t: t if t.shape[0] == b else t.repeat(reps, *[1] * (t.dim() - 1))[:b]
        return {"tokens": {k: take(self.feats["tokens"][k]) for k in layers}, "global": take(self.feats["global"])}


def write_config(tmp: Path, n: int, encoder: str, dtype: str, batch: int, compressor: str | None = None,
                 workers: int | None = None) -> Path:
    data = tmp / "data"
    cfg = {
        "data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                 "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/eigen_test_files_with_gt.txt"),
                 "synth": {"train": 8, "test": n, "seed": 1}},
        "encoder": {"name": encoder, "dtype": dtype, "batch_size": batch, "decode_workers": workers},
        "cache": {"root": str(tmp / f"cache-{compressor}"), "chunk_size": 16,
                  **({"compressor": compressor} if compressor else {})},
        "dask": {"processes": False},
    }
    path = tmp / f"bench-{compressor}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fresh_page_ms_per_mb(mb: int = 256) -> float:
    """What this machine's kernel takes to hand out memory never touched before: ms per MB to fault in one byte of
    every page of a new anonymous map. Under a hypervisor that takes freed pages back (free page reporting) it can
    be several ms per MB, and every new page-cache page of a buffered write pays it too."""
    import mmap

    m = mmap.mmap(-1, mb << 20)
    try:
        view = np.frombuffer(m, np.uint8)
        t0 = time.perf_counter()
        view[::4096] = 1
        return round(1000 * (time.perf_counter() - t0) / mb, 3)
    finally:
        del view
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--encoder", default="clip-vit-b16-random")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="cores to use: torch threads and decode pool [all]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    fresh_ms_per_mb = fresh_page_ms_per_mb()
    threads = args.threads or usable_cores()  # the cores this process may use, as the pipeline counts them
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        cfg = load_config(write_config(tmp, args.images, args.encoder, args.dtype, args.batch_size, workers=threads))
        synth.ensure(cfg.data)
        encoder = encoder_for(cfg)
        samples = [s for s in datasets.read_split(cfg.data, "test")]
        autocast = None if args.dtype == "float32" else torch.bfloat16

        # (1) bare forward on preprocessed images held in memory (the limit the pipeline is measured against)
        # and (2) the pipeline, chunk by chunk, as a Dask worker runs it; interleaved `--repeats` times and the
        # best of each kept, so that a neighbour's load on the machine does not favour one of them.
        pixels = torch.cat([encoder.preprocess(datasets.load_image(s)) for s in samples])
        encoder(pixels[: args.batch_size], cfg.cache_layers, autocast_dtype=autocast)  # warm-up
        null = NullEncoder(encoder, pixels[: args.batch_size], cfg.cache_layers)
        bare, piped, nulled, single = [], [], [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(0, len(pixels), args.batch_size):
                encoder(pixels[i : i + args.batch_size], cfg.cache_layers, autocast_dtype=autocast)
            bare.append(time.perf_counter() - t0)
            cfg.cache.root = str(tmp / f"cache-run{r}")  # a fresh store each repeat
            store, _ = prepare_store(RunContext.of(cfg), "test")
            t0 = time.perf_counter()
            extract_chunks(cfg, store.url, store.pending_chunks(), torch_threads=threads, encoder=encoder)
            piped.append(time.perf_counter() - t0)
            # The data path alone: the same extraction with the zero-cost encoder, into its own store.
            cfg.cache.root = str(tmp / f"cache-null{r}")
            null_store, _ = prepare_store(RunContext.of(cfg), "test")
            t0 = time.perf_counter()
            extract_chunks(cfg, null_store.url, null_store.pending_chunks(), torch_threads=threads, encoder=null)
            nulled.append(time.perf_counter() - t0)
            # One core's rate: decode + view + preprocess + target of each frame in turn, in this thread.
            rows = list(null_store.index().itertuples())
            target_hw = tuple(null_store.group["depth"].shape[1:]) if null_store.has_depth else None
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            for row in rows:
                _load_row(null_store, row, encoder, cfg.data.layout, target_hw)
            single.append((time.perf_counter() - t0) / len(rows))
            torch.set_num_threads(threads)
        bare_s, pipeline_s, null_s, frame_s = min(bare), min(piped), min(nulled), min(single)
        pools = decode_pools(null_store, encoder, cfg.data.layout, threads)
        finalize_store(store.url)
        store = FeatureStore.open(store.url)
        n = store.n
        tokens_bytes = dir_bytes(Path(store.url) / "tokens")

        # (3) codecs on these same activations: ratio and seconds to write one image's features
        batch = store.read(slice(0, min(n, 16)))
        raw = sum(t.numel() * 2 for t in batch["tokens"].values())
        codecs = {}
        for name, level in (("none", 0), ("zstd", 1), ("zstd", 3), ("blosc-zstd", 1), ("blosc-zstd", 5)):
            url = str(tmp / f"codec-{name}-{level}.zarr")
            m = batch["global"].shape[0]
            spec = StoreSpec(n=m, layers=store.layers, grid=store.attrs["grid"], width=store.attrs["width"],
                             chunk_size=m, compressor=name, level=level)
            idx = {k: np.asarray(store.group[f"index/{k}"][:m]) for k in
                   ("id", "image_path", "depth_path", "focal", "orig_hw", "view", "group", "line")}
            s = FeatureStore.create(url, spec, idx)
            # New chunk files (what extraction writes), then the same files written again: on some machines (this
            # VM) the kernel's cost of fresh page-cache pages dominates a write (`*_sys_ms`: kernel CPU time).
            timings = []
            for _ in range(2):
                cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                s.write_chunk(0, batch["tokens"], batch["global"])  # already fp16: the codec's own cost
                wall, cpu = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
                timings.append((wall, cpu.ru_stime - cpu0.ru_stime,
                                cpu.ru_stime - cpu0.ru_stime + cpu.ru_utime - cpu0.ru_utime))
            t0 = time.perf_counter()
            s.read_chunk(0)
            read_s = time.perf_counter() - t0
            on_disk = dir_bytes(Path(url) / "tokens")
            ms = lambda x: round(1000 * x / m, 2)
            codecs[f"{name}-{level}"] = {
                "ratio": round(raw / on_disk, 3), "write_ms_per_image": ms(timings[0][0]),
                "write_sys_ms_per_image": ms(timings[0][1]), "write_cpu_ms_per_image": ms(timings[0][2]),
                "rewrite_ms_per_image": ms(timings[1][0]),
                "rewrite_sys_ms_per_image": ms(timings[1][1]), "read_ms_per_image": ms(read_s)}

        # The same limit with one core's cost of writing an image's features into new chunk files of the default
        # codec added: the CPU time (user + kernel) of the write, which the data path cannot skip (a direct
        # write's wait for the disk is not core time, so it is not counted).
        default = "none-0" if cfg.cache.compressor == "none" else f"{cfg.cache.compressor}-{cfg.cache.compression_level}"
        write_s = codecs[default]["write_cpu_ms_per_image"] / 1000
        print(json.dumps({
            "null_encoder_images_per_s": round(n / null_s, 3),
            "decode_limit_images_per_s": round(threads / frame_s, 3),
            "null_over_decode_limit": round(frame_s * n / (threads * null_s), 3),
            "decode_and_write_limit_images_per_s": round(threads / (frame_s + write_s), 3),
            "null_over_decode_and_write_limit": round((frame_s + write_s) * n / (threads * null_s), 3),
            "single_core_ms_per_frame": round(1000 * frame_s, 2),
            "fresh_page_ms_per_mb": fresh_ms_per_mb,
            "null_s_runs": [round(x, 3) for x in nulled],
            "decode_pool_images_per_s": pools,
            "pipeline_images_per_s": round(n / pipeline_s, 3),
            "bare_forward_images_per_s": round(n / bare_s, 3),
            "pipeline_over_bare": round(bare_s / pipeline_s, 3),
            "bytes_per_image": round(dir_bytes(Path(store.url)) / n),
            "token_bytes_per_image": round(tokens_bytes / n),
            "raw_fp16_token_bytes_per_image": round(raw / batch["global"].shape[0]),
            "bare_s_runs": [round(x, 2) for x in bare], "pipeline_s_runs": [round(x, 2) for x in piped],
            "images": n, "frame_hw": list(datasets.load_image(samples[0]).shape[:2]),
            "encoder": args.encoder, "autocast": args.dtype, "batch_size": args.batch_size,
            "layers": list(store.layers), "store_dtype": store.dtype,
            "default_codec": f"{cfg.cache.compressor}-{cfg.cache.compression_level}",
            "codecs": codecs, "torch_threads": threads, "decode_workers": threads, "cpu_count": os.cpu_count(),
            "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
            "device": str(next(encoder.model.parameters()).device), "torch": torch.__version__,
        }, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
