"""What K augmented views per training frame cost (extraction time, bytes) and buy (test AbsRel), printed as JSON.

    .venv/bin/python bench/views.py [--ks 1,2,4] [--train 48] [--test 16] [--passes 8] [--encoder tiny-clip-64]

For each K the synthetic KITTI-layout train split is extracted with K seeded views per frame (random crops,
rotation <= 1 degree, the release's colour augmentation with p 0.5: `views.*` as in configs/kitti-release.yaml, at
the demo's size), one decoder variant is trained for the same number of passes over the frames (epochs = passes / K,
so every K makes the same optimiser steps on the same schedule: only the number of distinct views differs), and its
last checkpoint is evaluated on the full-resolution synthetic test frames (Garg crop, native GT resolution).

- `extract_s`: wall time of extracting the train split (plan + every chunk + verify), `bytes`: the train store on
  disk, both also per frame; `test_abs_rel` / `test_rmse` / `test_d1`: the evaluation's means over test images.
The numbers are those of a tiny random encoder on synthetic data; they show the cost scaling and the direction,
not what CLIP gains. Single-threaded torch unless --threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import synth  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.evaluate import evaluate_run  # noqa: E402
from pipeline.extract import encoder_for, extract_chunks, finalize_store, prepare_store  # noqa: E402
from pipeline.train import train_variant  # noqa: E402


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def config(root: Path, k: int, args) -> dict:
    data = root / "data"
    return {
        "name": f"bench-views-k{k}", "sweep": f"k{k}", "recipe": "bench",
        "data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                 "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/eigen_test_files_with_gt.txt"), "val_fraction": 0.2,
                 "synth": {"train": args.train, "test": args.test, "seed": 0}},
        "encoder": {"name": args.encoder, "batch_size": 16},
        "views": {"mode": "random", "crop_size": [176, 352], "views_per_image": k, "rotation_deg": 1.0,
                  "color": {"p": 0.5}},
        "cache": {"root": str(root / "cache"), "chunk_size": 16, "target_size": [44, 88]},
        "train": {"variants": [args.variant], "epochs": args.passes // k, "batch_size": 4, "lr": 1e-2,
                  "schedule": "cosine_warmup", "seed": 7, "out_dir": str(root / "runs"),
                  "num_threads": args.threads},
        "eval": {"out_dir": str(root / "results"), "checkpoint": "last", "qualitative": 0},
        "dask": {"processes": False},
    }


def extract(cfg, split: str) -> tuple[float, Path, int]:
    t0 = time.perf_counter()
    store, _ = prepare_store(cfg, split)
    for c in store.pending_chunks():
        extract_chunks(cfg, store.url, [c], torch_threads=cfg.train.num_threads)
    finalize_store(store.url)
    return time.perf_counter() - t0, Path(store.url), store.n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--test", type=int, default=16)
    ap.add_argument("--passes", type=int, default=8, help="passes over the training frames (divisible by each K)")
    ap.add_argument("--encoder", default="tiny-clip-64")
    ap.add_argument("--variant", default="full")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    bad = [k for k in ks if args.passes % k]
    if bad:
        ap.error(f"--passes {args.passes} is not divisible by K = {bad}: every K must make the same steps")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-views-"))
    out = {"encoder": args.encoder, "train_frames": args.train, "test_frames": args.test, "passes": args.passes,
           "variant": args.variant, "threads": args.threads, "views": "random 176x352, rotation <= 1 deg, colour p 0.5",
           "results": []}
    first = config_from_dict(config(root, ks[0], args))
    synth.ensure(first.data)
    encoder_for(first)  # built once, outside the timings
    test_s, _, _ = extract(first, "test")  # full frames: the same store for every K
    out["test_extract_s"] = round(test_s, 2)
    for k in ks:
        cfg = config_from_dict(config(root, k, args))
        train_s, url, n = extract(cfg, "train")
        extract(cfg, "val")  # one un-augmented view per frame, but its fingerprint follows views.*
        frames = n // k
        t0 = time.perf_counter()
        train_variant(cfg, args.variant, resume=False)
        fit_s = time.perf_counter() - t0
        summary = evaluate_run(cfg, [args.variant]).summary().iloc[0]
        out["results"].append({
            "k": k, "views": n, "frames": frames, "epochs": cfg.train.epochs,
            "extract_s": round(train_s, 2), "extract_s_per_frame": round(train_s / frames, 4),
            "bytes": dir_bytes(url), "bytes_per_frame": round(dir_bytes(url) / frames),
            "train_s": round(fit_s, 2), "test_abs_rel": round(float(summary["abs_rel"]), 4),
            "test_rmse": round(float(summary["rmse"]), 3), "test_d1": round(float(summary["d1"]), 4),
        })
        print(json.dumps(out["results"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
