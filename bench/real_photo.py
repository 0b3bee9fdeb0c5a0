"""The demo's trained decoder on a real photograph with ground truth: Middlebury 2014 "motorcycle" (scikit-image).

    .venv/bin/python bench/real_photo.py [--checkpoint runs/demo/full/best] [--out docs/real_photo.png]

`skimage.data.stereo_motorcycle()` ships the left image (500 x 741, a 4x down-sampled Middlebury 2014 frame) with
its ground-truth disparity and the calibration for that size: depth = f * B / (d + doffs), f = 994.978 px,
B = 193.001 mm, doffs = 31.086 px. The decoder was trained on ~80 synthetic street frames, so its metric scale
means nothing indoors: the prediction is median-scaled (per-image median of prediction and GT over the valid
pixels), then scored with the one metrics function. A constant-depth predictor (after median scaling: the GT
median everywhere) is scored the same way: the decoder is only useful where it beats that. Prints one JSON object
and writes the side-by-side picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spaceclip.metrics import compute_metrics  # noqa: E402
from spaceclip.model import SpaceClip  # noqa: E402

FOCAL_PX, BASELINE_M, DOFFS_PX = 994.978, 0.193001, 31.086  # skimage's calibration for the down-sampled pair


def motorcycle() -> tuple[np.ndarray, np.ndarray]:
    from skimage.data import stereo_motorcycle

    left, _, disparity = stereo_motorcycle()
    depth = np.zeros(disparity.shape, np.float64)
    valid = np.isfinite(disparity)
    depth[valid] = FOCAL_PX * BASELINE_M / (disparity[valid] + DOFFS_PX)  # metres
    return left, depth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/demo/full/best")
    parser.add_argument("--out", default="docs/real_photo.png")
    args = parser.parse_args()
    image, gt = motorcycle()
    model = SpaceClip.from_pretrained(args.checkpoint)
    pred = model.infer_image(image)  # (H, W) metres, at the image's size
    lo, hi = float(gt[gt > 0].min()) * 0.5, float(gt.max()) * 2.0
    scored = {
        "decoder": compute_metrics(pred, gt, min_depth=lo, max_depth=hi, median_scaling=True),
        "constant_depth": compute_metrics(np.ones_like(gt), gt, min_depth=lo, max_depth=hi, median_scaling=True),
    }
    rank = {}
    valid = gt > 0
    from scipy.stats import spearmanr

    rank["decoder_spearman"] = float(spearmanr(pred[valid], gt[valid]).statistic)
    report = {
        "image": "skimage.data.stereo_motorcycle (Middlebury 2014, 500 x 741)", "checkpoint": args.checkpoint,
        "encoder": model.encoder.name, "gt_valid_fraction": round(float(valid.mean()), 4),
        "gt_depth_range_m": [round(float(gt[valid].min()), 3), round(float(gt[valid].max()), 3)],
        "protocol": "median scaling, no crop, predictions clipped to the GT range",
        **{name: {k: round(v, 4) for k, v in m.items() if k in ("abs_rel", "rmse", "d1", "silog")}
           for name, m in scored.items()},
        **{k: round(v, 4) for k, v in rank.items()},
    }
    write_picture(image, pred, gt, Path(args.out), report)
    report["picture"] = args.out
    print(json.dumps(report, indent=2))


def write_picture(image: np.ndarray, pred: np.ndarray, gt: np.ndarray, out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = gt > 0
    scaled = pred * np.median(gt[valid]) / np.median(pred[valid])
    vmin, vmax = np.percentile(gt[valid], [2, 98])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0), constrained_layout=True)
    axes[0].imshow(image)
    axes[0].set_title("input: Middlebury 2014 motorcycle", fontsize=10)
    axes[1].imshow(np.where(valid, gt, np.nan), cmap="turbo_r", vmin=vmin, vmax=vmax)
    axes[1].set_title("ground truth (from disparity)", fontsize=10)
    shown = axes[2].imshow(scaled, cmap="turbo_r", vmin=vmin, vmax=vmax)
    d = report["decoder"]
    axes[2].set_title(f"demo `full` decoder, median-scaled\nAbsRel {d['abs_rel']:.3f} "
                      f"(a constant depth: {report['constant_depth']['abs_rel']:.3f})", fontsize=10)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.9, label="depth (m), near = red")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
