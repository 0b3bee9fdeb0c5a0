"""What the feature cache changes about the science, measured on the real pretrained encoder of the demo.

    .venv/bin/python bench/shortcuts.py [--config demo] [--out bench_out/shortcuts] [--skip-training]

The cache takes shortcuts that a pixel-space pipeline does not. Each is measured on the demo's data and encoder
(`dinov2-small-imgfocus`, DINOv2 ViT-S/14, not CLIP) and printed as one JSON object:

(a) `flip`: feature-space flip (mirror the token grid of every layer; keep the global vector) against the features
    of the mirrored image: relative error ||flip(F(x)) - F(flip x)|| / ||F(flip x)|| per layer, over test frames.
(b) `fp16`: the fp16 cache against fp32 features: relative error per layer, and what it does to a trained `full`
    decoder's output (relative change of the depth map, change of test AbsRel).
(c) `flip_training`: test AbsRel of `full` trained with feature-space flips (the default), exact flips
    (`views.flip: extract`: the mirrored image's features stored beside the plain ones) and no flips.
(d) `views`: test AbsRel of `full` trained on one fixed view per frame (the whole KB crop, the demo default; one
    random 176 x 352 crop) against K = 4 seeded random crops per frame at equal optimiser steps (epochs / 4).

Everything else is the demo's recipe; every training uses the same seed. (c) and (d) train one decoder each, about
a minute apiece on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import config_from_dict, dump_config, load_config  # noqa: E402
from pipeline.evaluate import evaluate_run  # noqa: E402
from pipeline.extract import encoder_for, extract_splits  # noqa: E402
from pipeline.layout import RunContext, run_dir  # noqa: E402
from pipeline.loader import flip_features  # noqa: E402
from pipeline.train import train_variant  # noqa: E402
from spaceclip.decoder import SpaceClipDecoder  # noqa: E402


def derive(cfg, *overrides):
    return config_from_dict(dump_config(cfg), overrides=list(overrides))


def build(cfg, splits=("train", "val", "test")) -> float:
    started = time.perf_counter()
    extract_splits(cfg, splits)
    return time.perf_counter() - started


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole batch."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_images(cfg, n: int) -> list[np.ndarray]:
    """The first n test frames as decoded RGB arrays (the full frames the test store was extracted from)."""
    from pipeline.datasets import load_image, sample_from_row

    test = RunContext.of(cfg).open_store("test")
    return [load_image(sample_from_row(row._asdict(), test.attrs["split_file"]))
            for row in test.index().iloc[:n].itertuples()]


def flip_error(cfg, n: int) -> dict:
    """(a) per layer: feature-space flip of F(x) vs F(mirrored x), on the first n test frames' full-frame views."""
    encoder = encoder_for(cfg)
    pixels = encoder.preprocess(test_images(cfg, n))  # (n, 3, S, S)
    layers = cfg.cache_layers
    plain = encoder(pixels, layers)
    mirrored = encoder(pixels.flip(-1), layers)
    flips = torch.ones(n, dtype=torch.bool)
    approx = flip_features({"tokens": dict(plain["tokens"]), "global": plain["global"]}, flips)
    per_layer = {f"L{k}": round(rel(approx["tokens"][k], mirrored["tokens"][k]), 4) for k in layers}
    # For scale: how different the features of two different frames are (a flip error near this is no better
    # than random), and the global vector (kept unchanged by the feature-space flip).
    other = {f"L{k}": round(rel(plain["tokens"][k].roll(1, 0), mirrored["tokens"][k]), 4) for k in layers}
    return {
        "frames": n, "image_size": encoder.image_size, "grid": encoder.grid,
        "feature_flip_rel_error": per_layer,
        "global_vector_rel_error": round(rel(plain["global"], mirrored["global"]), 4),
        "different_frame_rel_error": other,
    }


def fp16_error(cfg, checkpoint: Path, n: int) -> dict:
    """(b) per layer: fp16 rounding of fp32 features; and a trained decoder's output on fp32 vs fp16 features."""
    encoder = encoder_for(cfg)
    layers = cfg.cache_layers
    fp32 = encoder(encoder.preprocess(test_images(cfg, n)), layers)
    fp16 = {"tokens": {k: t.half() for k, t in fp32["tokens"].items()}, "global": fp32["global"].half()}
    per_layer = {f"L{k}": float(f"{rel(fp16['tokens'][k], fp32['tokens'][k]):.3g}") for k in layers}
    out = {"frames": n, "feature_rel_error": per_layer,
           "global_rel_error": float(f"{rel(fp16['global'], fp32['global']):.3g}")}
    if checkpoint.is_dir():
        decoder = SpaceClipDecoder.from_pretrained(checkpoint).eval()
        with torch.no_grad():
            d32 = decoder(fp32)["depth"]
            d16 = decoder(fp16)["depth"]
        out["decoder"] = str(checkpoint)
        out["depth_rel_change"] = float(f"{rel(d16, d32):.3g}")
        out["depth_max_abs_change_m"] = float(f"{float((d16 - d32).abs().max()):.3g}")
    return out


def train_and_test(cfg, variant: str = "full") -> dict:
    result = train_variant(cfg, variant, resume=True)  # a finished run (same config) is reused
    seconds = sum(row["seconds"] for row in result.history)  # from its history, also for a reused run
    evaluation = evaluate_run(cfg, [variant])
    row = evaluation.summary().set_index("variant").loc[variant]
    return {"test_abs_rel": round(float(row["abs_rel"]), 4), "test_d1": round(float(row["d1"]), 4),
            "test_rmse": round(float(row["rmse"]), 3), "val_abs_rel_last": round(result.history[-1]["val_abs_rel"], 4),
            "train_samples": RunContext.of(cfg).open_store("train").n, "epochs": result.epochs_done,
            "train_s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--out", default="bench_out/shortcuts")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--skip-training", action="store_true", help="(a) and (b) only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    base = load_config(args.config, overrides=[
        f"cache.root={out / 'cache'}", f"train.out_dir={out / 'runs'}", f"eval.out_dir={out / 'results'}",
        "eval.qualitative=0", *([f"train.num_threads={args.threads}"] if args.threads else []),
    ])
    report: dict = {"config": args.config, "encoder": base.encoder.name, "machine": platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
    report["extract_s"] = round(build(base), 1)
    report["flip"] = flip_error(base, args.frames)

    runs: dict = {}
    if not args.skip_training:
        cases = {
            "features": (base, []),
            "extract": (derive(base, "views.flip=extract"), []),
            "none": (derive(base, "train.flip_p=0"), []),
        }
        for name, (cfg, _) in cases.items():
            cfg = derive(cfg, f"sweep=flip-{name}")
            extract_s = build(cfg, ("train", "val"))
            runs[name] = {**train_and_test(cfg), "extract_train_s": round(extract_s, 1)}
        report["flip_training"] = runs
        epochs = base.train.epochs
        views = {
            "one_view_full_kb_crop": derive(base, "sweep=views-full"),
            "one_random_crop": derive(base, "sweep=views-k1", "views.mode=random", "views.crop_size=[176,352]"),
            "k4_random_crops_equal_steps": derive(base, "sweep=views-k4s", "views.mode=random",
                                                  "views.crop_size=[176,352]", "views.views_per_image=4",
                                                  f"train.epochs={max(1, epochs // 4)}"),
        }
        report["views"] = {}
        for name, cfg in views.items():
            extract_s = build(cfg, ("train", "val"))
            if name == "one_view_full_kb_crop":
                report["views"][name] = {**runs["features"], "note": "same run as flip_training.features"}
                continue
            report["views"][name] = {**train_and_test(cfg), "extract_train_val_s": round(extract_s, 1)}
    checkpoint = run_dir(derive(base, "sweep=flip-features"), "full") / "last"
    report["fp16"] = fp16_error(base, checkpoint, args.frames)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
