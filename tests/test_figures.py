"""The evaluation's pictures: sparse-GT dilation, the crop box, the shared colour range, and both figures drawn
from a real evaluation of the tiny demo's test split (a known predictor instead of a trained decoder)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.evaluate import evaluate_run
from pipeline.figures import crop_box, dilate_sparse, shared_range, training_curves, write_figures
from spaceclip.metrics import crop_mask


def assert_picture(path, min_h=200, min_w=400) -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > min_h and pixels.shape[1] > min_w, pixels.shape
    assert pixels.std() > 20, f"{path} looks blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, f"{path} has almost no distinct colours"
    return pixels


def test_dilate_sparse_fills_each_gap_from_its_nearest_measurement():
    depth = np.zeros((5, 7), np.float32)
    depth[1, 1], depth[3, 5] = 2.0, 9.0
    out = dilate_sparse(depth, radius=1)
    expected = np.zeros_like(depth)
    expected[0:3, 0:3] = 2.0  # the 3 x 3 (Chebyshev radius 1) around each point
    expected[2:5, 4:7] = 9.0
    np.testing.assert_array_equal(out, expected)
    assert out[1, 1] == 2.0 and depth[0, 0] == 0.0  # measurements kept, the input untouched
    # Equidistant measurements: the 4-neighbour (distance 1) wins over the diagonal one (distance sqrt 2).
    tie = np.zeros((3, 3), np.float32)
    tie[1, 0], tie[0, 0] = 5.0, 7.0
    assert dilate_sparse(tie, radius=1)[1, 1] == 5.0


@pytest.mark.parametrize("crop", ["garg", "eigen"])
def test_crop_box_is_the_bounding_box_of_the_eval_crop(crop):
    h, w = 375, 1242
    top, left, height, width = crop_box((h, w), crop)
    rows = {"garg": (0.40810811, 0.99189189), "eigen": (0.3324324, 0.91351351)}[crop]
    assert (top, top + height) == (int(rows[0] * h), int(rows[1] * h))  # the protocol's fractions of the GT size
    assert (left, left + width) == (int(0.03594771 * w), int(0.96405229 * w))
    box = np.zeros((h, w), bool)
    box[top:top + height, left:left + width] = True
    np.testing.assert_array_equal(box, crop_mask((h, w), crop))
    assert crop_box((h, w), "none") is None


def ramp(batch):
    """A positive depth that grows to the right (5 m -> 50 m over the 16-pixel-wide map), whatever the features."""
    cols = torch.linspace(5.0, 50.0, 16, dtype=torch.float64)
    return cols.expand(len(batch.index), 16, 16).clone()


def test_figures_of_a_real_evaluation(demo_cfg, tmp_path):
    evaluation = evaluate_run(demo_cfg, predictors={"ramp": ramp})
    assert evaluation.samples, "the evaluation keeps a few qualitative examples"
    gt = np.concatenate([s.gt[s.gt > 0] for s in evaluation.samples])
    assert shared_range(evaluation.samples) == pytest.approx(tuple(np.percentile(gt, (2.0, 98.0))))

    paths = write_figures(evaluation, demo_cfg, tmp_path)
    assert set(paths) == {"qualitative"}  # an injected predictor has no training history
    assert_picture(paths["qualitative"])

    epochs = np.arange(1, 6)
    histories = {v: pd.DataFrame({"epoch": epochs, "val_abs_rel": 0.5 / epochs * k, "train_loss": 3.0 / epochs * k})
                 for k, v in enumerate(("baseline", "full"), start=1)}
    curves = training_curves(histories, tmp_path / "curves.png", selected={"baseline": 5, "full": 2})
    assert curves == tmp_path / "curves.png"
    assert_picture(curves)
    with pytest.raises(ValueError, match="no training history"):
        training_curves({}, tmp_path / "none.png")
