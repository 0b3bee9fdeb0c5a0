"""compute_metrics against an independent, inline re-derivation of the standard formulas, plus the eval crops."""

import numpy as np
import pytest

from spaceclip.metrics import METRIC_KEYS, compute_metrics, crop_mask, mean_metrics


def reference_metrics(pred, gt, mask, lo, hi, median=False):
    """Written from the formulas (Eigen 2014 / BTS eval), not from spaceclip.metrics."""
    g = gt[mask].astype(np.float64)
    p = pred[mask].astype(np.float64)
    if median:
        p = p * np.median(g) / np.median(p)
    p = np.minimum(np.maximum(p, lo), hi)
    n = g.size
    ratio = np.maximum(g / p, p / g)
    d = np.log(p) - np.log(g)
    return {
        "abs_rel": np.sum(np.abs(p - g) / g) / n,
        "sq_rel": np.sum((p - g) ** 2 / g) / n,
        "rmse": (np.sum((p - g) ** 2) / n) ** 0.5,
        "rmse_log": (np.sum(d**2) / n) ** 0.5,
        "log10": np.sum(np.abs(np.log(p) / np.log(10) - np.log(g) / np.log(10))) / n,
        "silog": 100 * (np.sum(d**2) / n - (np.sum(d) / n) ** 2) ** 0.5,
        "d1": np.count_nonzero(ratio < 1.25) / n,
        "d2": np.count_nonzero(ratio < 1.5625) / n,
        "d3": np.count_nonzero(ratio < 1.953125) / n,
    }


@pytest.fixture
def kitti_like():
    rng = np.random.default_rng(0)
    h, w = 375, 1242
    gt = rng.uniform(0.5, 90.0, (h, w))
    gt[rng.random((h, w)) < 0.8] = 0.0  # sparse LiDAR: 0 = no return
    pred = np.clip(gt * rng.lognormal(0.05, 0.2, (h, w)) + rng.uniform(0, 2, (h, w)), 1e-4, 120.0)
    pred[gt == 0] = rng.uniform(0, 100, np.count_nonzero(gt == 0))
    return pred, gt


@pytest.mark.parametrize("crop", ["none", "garg", "eigen"])
@pytest.mark.parametrize("median", [False, True])
def test_matches_independent_formulas(kitti_like, crop, median):
    pred, gt = kitti_like
    h, w = gt.shape
    rows = {"none": (0, h), "garg": (153, 371), "eigen": (124, 342)}[crop]
    cols = (0, w) if crop == "none" else (44, 1197)
    mask = np.zeros_like(gt, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    mask &= (gt > 1e-3) & (gt < 80.0)
    got = compute_metrics(pred, gt, crop=crop, min_depth=1e-3, max_depth=80.0, median_scaling=median)
    want = reference_metrics(pred, gt, mask, 1e-3, 80.0, median)
    assert set(got) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


def test_kitti_crops_exact_rows_and_cols():
    shape = (375, 1242)
    for crop, (r0, r1) in {"garg": (153, 371), "eigen": (124, 342)}.items():
        want = np.zeros(shape, dtype=bool)
        want[r0:r1, 44:1197] = True
        np.testing.assert_array_equal(crop_mask(shape, crop), want)
    assert crop_mask(shape, "none").all()


def test_nyu_crop():
    want = np.zeros((480, 640), dtype=bool)
    want[45:471, 41:601] = True
    np.testing.assert_array_equal(crop_mask((480, 640), "nyu"), want)
    with pytest.raises(ValueError, match="480 x 640"):
        crop_mask((479, 640), "nyu")
    with pytest.raises(ValueError, match="valid crops"):
        crop_mask((10, 10), "kb")


def test_nyu_crop_ignores_outside_pixels():
    gt = np.full((480, 640), 3.0)
    pred = np.full((480, 640), 3.0)
    pred[:45] = 9.0  # wrong only outside the crop
    m = compute_metrics(pred, gt, crop="nyu", max_depth=10.0)
    assert m["abs_rel"] == 0.0 and m["d1"] == 1.0
    assert compute_metrics(pred, gt, crop="none", max_depth=10.0)["abs_rel"] > 0


def test_scaled_prediction_known_values():
    rng = np.random.default_rng(1)
    gt = rng.uniform(1.0, 40.0, (40, 60))  # x1.9 stays below max_depth 80
    m = compute_metrics(gt * 1.1, gt)
    assert m["abs_rel"] == pytest.approx(0.1)
    assert m["rmse_log"] == pytest.approx(np.log(1.1))
    assert m["log10"] == pytest.approx(np.log10(1.1))
    assert m["silog"] == pytest.approx(0.0, abs=1e-5)  # a global scale is invisible to silog
    assert m["sq_rel"] == pytest.approx(0.01 * gt.mean())
    assert m["d1"] == 1.0
    ms = compute_metrics(gt * 1.1, gt, median_scaling=True)
    assert ms["abs_rel"] == pytest.approx(0.0, abs=1e-12) and ms["rmse"] == pytest.approx(0.0, abs=1e-9)
    far = compute_metrics(gt * 1.9, gt)  # 1.5625 < 1.9 < 1.953125
    assert far["d1"] == 0.0 and far["d2"] == 0.0 and far["d3"] == 1.0


def test_prediction_clipped_to_range_after_median_scaling():
    gt = np.full((4, 4), 10.0)
    pred = np.full((4, 4), 1000.0)
    assert compute_metrics(pred, gt, max_depth=80.0)["abs_rel"] == pytest.approx(7.0)  # clipped to 80
    pred[0, 0] = 0.0
    assert np.isfinite(compute_metrics(pred, gt)["rmse_log"])  # clipped up to min_depth, no log(0)


def test_valid_range_is_open():
    gt = np.array([[0.0, 1e-3, 80.0, 5.0]])
    pred = np.array([[1.0, 1.0, 1.0, 5.0]])
    assert compute_metrics(pred, gt)["abs_rel"] == 0.0  # only the 5.0 pixel is valid


def test_errors():
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        compute_metrics(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="no valid pixels"):
        compute_metrics(np.ones((3, 4)), np.zeros((3, 4)))


def test_mean_metrics_is_plain_mean_over_images():
    a = dict.fromkeys(METRIC_KEYS, 1.0)
    b = dict.fromkeys(METRIC_KEYS, 3.0)
    assert mean_metrics([a, b]) == dict.fromkeys(METRIC_KEYS, 2.0)
    with pytest.raises(ValueError):
        mean_metrics([])
    with pytest.raises(ValueError, match="abs_rel"):
        mean_metrics([{"rmse": 1.0}])
