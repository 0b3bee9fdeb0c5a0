"""The data path of two source trees measured in one run, in alternating rounds, printed as one JSON object.

    .venv/bin/python bench/store_ab.py --base /tmp/base [--images 256] [--rounds 3] [--threads N]

`--base` is a checkout of the commit to compare with (`git archive <commit> | tar -x -C /tmp/base`); the other
tree is this one. Each measure runs in a fresh process that imports `pipeline` from its tree, with the same
venv, and uses only the API both trees share:

- `stream_samples_per_s`: one epoch of `CachedBatches(cache_device="stream", flip_p=0.5, read_workers=threads)`
  over a training store of `--images` synthetic KITTI frames (batch 16, no decoder), best of two epochs; the store
  is built once per tree by that tree's pipeline with the zero-cost stand-in encoder (`bench/extract.py`).
- `extract_images_per_s`: `extract_chunks` with the stand-in encoder into a fresh store of the same frames: decode,
  view, preprocess, conversion and the store's writes (the data path of extraction). Measured a third time as
  `new_zarr_writes`: this tree with every feature chunk written by Zarr (`FeatureStore._put_raw` off), the
  library's figure beside the kept write's.

Rounds alternate the trees (rotated each round), so that load from other processes hits both alike; the median
of the rounds is reported per tree, and `new_over_base` their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def _tree_imports(tree: Path):
    sys.path[:0] = [str(tree), str(tree / "bench")]
    import train as bench_train  # noqa: E402  (the tree's bench/train.py: write_config, build_store)

    return bench_train


def measure(tree: Path, what: str, images: int, threads: int, workdir: Path, zarr_writes: bool = False) -> dict:
    bench_train = _tree_imports(tree)
    import torch

    if zarr_writes:
        from pipeline.store import FeatureStore

        FeatureStore._put_raw = lambda *args: False

    from pipeline.config import load_config
    from pipeline.layout import RunContext

    torch.set_num_threads(threads)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(bench_train.write_config(workdir, images, "clip-vit-b16-random", 4, "cpu"))
    bench_train.build_store(cfg, null_encoder=True)  # once per tree: found again by fingerprint after that
    store = RunContext.of(cfg).open_store("train")
    if what == "build":
        return {"samples": store.n}
    if what == "stream":
        from pipeline.loader import CachedBatches

        loader = CachedBatches(store, cfg.decoder.layers_of("full"), 16, cache_device="stream", flip_p=0.5,
                               seed=0, read_workers=threads)
        runs = []
        for epoch in range(2):
            t0 = time.perf_counter()
            samples = sum(len(b.index) for b in loader.epoch(epoch))
            runs.append(time.perf_counter() - t0)
        return {"stream_samples_per_s": round(samples / min(runs), 1)}
    from extract import NullEncoder  # the tree's bench/extract.py

    from pipeline import datasets
    from pipeline.extract import extract_chunks, prepare_store
    from pipeline.layout import encoder_for

    real = encoder_for(cfg)
    frames = datasets.read_split(cfg.data, "train")[:8]
    null = NullEncoder(real, torch.cat([real.preprocess(datasets.load_image(s)) for s in frames]), cfg.cache_layers)
    cfg.cache.root = str(workdir / f"extract-{time.monotonic_ns()}")  # a fresh store
    fresh, _ = prepare_store(RunContext.of(cfg), "train")
    try:
        t0 = time.perf_counter()
        extract_chunks(cfg, fresh.url, fresh.pending_chunks(), torch_threads=threads, encoder=null)
        return {"extract_images_per_s": round(fresh.n / (time.perf_counter() - t0), 1)}
    finally:
        shutil.rmtree(cfg.cache.root, ignore_errors=True)


def child(tree: Path, what: str, args, workdir: Path, zarr_writes: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--tree", str(tree), "--images", str(args.images),
           "--threads", str(args.threads), "--workdir", str(workdir)] + (["--zarr-writes"] if zarr_writes else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        sys.exit(f"{tree} {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="the tree to compare with (a checkout of the earlier commit)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "spaceclip-store-ab"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--zarr-writes", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.tree), args.child, args.images, args.threads, Path(args.workdir),
                                 args.zarr_writes)))
        return
    if not args.base:
        ap.error("--base is required")
    args.threads = args.threads or len(os.sched_getaffinity(0))
    trees = {"base": Path(args.base).resolve(), "new": HERE}
    work = {name: Path(args.workdir) / name for name in trees}
    load_before = os.getloadavg()[0]
    for name, tree in trees.items():
        child(tree, "build", args, work[name])
    results: dict[str, dict[str, list]] = {name: {"stream_samples_per_s": [], "extract_images_per_s": []}
                                           for name in trees}
    results["new_zarr_writes"] = {"extract_images_per_s": []}
    names = list(results)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            tree = trees.get(name, HERE)
            for what in ("stream", "extract") if name in trees else ("extract",):
                for key, value in child(tree, what, args, work.get(name, work["new"]), name not in trees).items():
                    results[name][key].append(value)
    median = {name: {k: statistics.median(v) for k, v in res.items()} for name, res in results.items()}
    print(json.dumps({
        "median": median,
        "new_over_base": {k: round(median["new"][k] / median["base"][k], 3) for k in median["new"]},
        "zarr_writes_over_base": round(median["new_zarr_writes"]["extract_images_per_s"]
                                       / median["base"]["extract_images_per_s"], 3),
        "rounds": results, "images": args.images, "threads": args.threads, "cpu_count": os.cpu_count(),
        "trees": {k: str(v) for k, v in trees.items()},
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }, indent=1))


if __name__ == "__main__":
    main()
