"""The one depth-metrics implementation: training validation, evaluation and the tests all call `compute_metrics`.

Protocol, per image (then a plain mean over images with `mean_metrics`):
  1. valid = `valid_mask(gt, min_depth, max_depth)`, intersected with the eval crop.
     Strict `<` at the top, as in the reference release's evaluation and BTS/AdaBins/Monodepth2; docs/design.md
     writes the KITTI range as (1e-3, 80], which differs only for gt exactly equal to max_depth.
  2. median scaling (optional): pred *= median(gt[valid]) / median(pred[valid]).
  3. pred clipped to [min_depth, max_depth].
  4. abs_rel, sq_rel, rmse, rmse_log, log10, silog, d1, d2, d3 over the valid pixels.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

METRIC_KEYS: tuple[str, ...] = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "d1", "d2", "d3")
CROPS: tuple[str, ...] = ("none", "garg", "eigen", "nyu")

# KITTI crops as fractions of the full ground-truth size (Garg et al. 2016; Eigen et al. 2014).
_KITTI_ROWS = {"garg": (0.40810811, 0.99189189), "eigen": (0.3324324, 0.91351351)}
_KITTI_COLS = (0.03594771, 0.96405229)
# NYU v2 Eigen crop, in pixels of the official 480 x 640 frames.
_NYU_SHAPE, _NYU_ROWS, _NYU_COLS = (480, 640), (45, 471), (41, 601)


def valid_mask(gt, min_depth: float, max_depth: float):
    """The one valid-pixel rule (losses, validation, evaluation): min_depth < gt < max_depth. A NumPy array gives a
    NumPy mask, a tensor a tensor. 0 (no LiDAR return) and NaN fail both comparisons, inf the second."""
    return (gt > min_depth) & (gt < max_depth)


def crop_mask(shape: tuple[int, ...], crop: str) -> np.ndarray:
    """Boolean (H, W) mask of the evaluation crop for an image whose last two dims are (H, W)."""
    if crop not in CROPS:
        raise ValueError(f"unknown eval crop {crop!r}; valid crops: {list(CROPS)}")
    h, w = int(shape[-2]), int(shape[-1])
    mask = np.zeros((h, w), dtype=bool)
    if crop == "none":
        mask[:] = True
    elif crop == "nyu":
        if (h, w) != _NYU_SHAPE:
            raise ValueError(f"the nyu crop is defined on 480 x 640 ground truth, got {h} x {w}")
        mask[slice(*_NYU_ROWS), slice(*_NYU_COLS)] = True
    else:
        r0, r1 = _KITTI_ROWS[crop]
        c0, c1 = _KITTI_COLS
        mask[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)] = True
    return mask


def compute_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    crop: str = "none",
    min_depth: float = 1e-3,
    max_depth: float = 80.0,
    median_scaling: bool = False,
) -> dict[str, float]:
    """Metrics of one image. `pred` must already be at the ground truth's resolution (same shape).

    Raises ValueError when the shapes differ or when no pixel is valid (callers decide whether to skip).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}; resize pred to gt first")
    if gt.ndim < 2:
        raise ValueError(f"expected an image (..., H, W), got shape {gt.shape}")
    valid = valid_mask(gt, min_depth, max_depth) & crop_mask(gt.shape, crop)
    if not valid.any():
        raise ValueError(
            f"no valid pixels: gt {gt.shape} has none in ({min_depth}, {max_depth}) inside crop {crop!r}"
        )
    p, g = pred[valid], gt[valid]
    if median_scaling:
        p_med = np.median(p)
        # A prediction whose valid median is 0 (an untrained ReLU head) cannot be scaled; keep it unscaled.
        if np.isfinite(p_med) and p_med > 0:
            p = p * (np.median(g) / p_med)
    p = np.clip(p, min_depth, max_depth)

    thresh = np.maximum(g / p, p / g)
    e = np.log(p) - np.log(g)
    return {
        "abs_rel": float(np.mean(np.abs(g - p) / g)),
        "sq_rel": float(np.mean((g - p) ** 2 / g)),
        "rmse": float(np.sqrt(np.mean((g - p) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(e**2))),
        "log10": float(np.mean(np.abs(np.log10(g) - np.log10(p)))),
        "silog": float(100.0 * np.sqrt(max(np.mean(e**2) - np.mean(e) ** 2, 0.0))),
        "d1": float(np.mean(thresh < 1.25)),
        "d2": float(np.mean(thresh < 1.25**2)),
        "d3": float(np.mean(thresh < 1.25**3)),
    }


def mean_metrics(per_image: Iterable[dict]) -> dict[str, float]:
    """Plain mean over images (each image weighs the same, whatever its number of valid pixels)."""
    rows = list(per_image)
    if not rows:
        raise ValueError("mean_metrics needs at least one image's metrics")
    for i, row in enumerate(rows):
        missing = [k for k in METRIC_KEYS if k not in row]
        if missing:
            raise ValueError(f"metrics of image {i} lack {missing}")
    return {k: float(np.mean([row[k] for row in rows])) for k in METRIC_KEYS}
