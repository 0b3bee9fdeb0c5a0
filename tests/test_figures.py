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


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
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


def test_training_curves_legend_sits_below_the_panels(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    epochs = np.arange(1, 7)
    histories = {v: {seed: pd.DataFrame({"epoch": epochs, "val_abs_rel": 0.5 / epochs + 0.01 * seed,
                                         "train_loss": 3.0 / epochs}) for seed in (1, 2, 3)}
                 for v in ("baseline", "film", "structural", "full")}
    training_curves(histories, tmp_path / "curves.png")
    (fig,) = drawn
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent(renderer)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"{v} (mean of 3 seeds)" for v in histories]
    assert all(legend.y1 <= ax.get_tightbbox(renderer).y0 for ax in fig.axes)  # under the axes, their labels too


def flat(batch):
    """20 m everywhere: a second run, worse on the near frames than on the far ones."""
    return torch.full((len(batch.index), 16, 16), 20.0, dtype=torch.float64)


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_failure_cases_are_each_runs_best_and_worst_frames(demo_cfg, tmp_path):
    from pipeline.evaluate import predict_examples
    from pipeline.figures import extreme_frames, relative_error, write_failure_cases

    predictors = {"ramp": ramp, "flat": flat}
    evaluation = evaluate_run(demo_cfg, predictors=predictors)
    per_image = evaluation.per_image
    paths = write_failure_cases(demo_cfg, evaluation, tmp_path, predictors=predictors)
    assert set(paths) == {"qualitative_best", "qualitative_worst", "failure_cases"}
    chosen = pd.read_csv(paths["failure_cases"])
    for variant in predictors:
        run = per_image[per_image["variant"] == variant].sort_values("abs_rel", kind="stable")
        best, worst = run.iloc[0], run.iloc[-1]
        assert run["abs_rel"].nunique() > 1 and extreme_frames(per_image, variant, 42) == (best["id"], worst["id"])
        for which, row in (("best", best), ("worst", worst)):
            picked = chosen[(chosen["which"] == which) & (chosen["variant"] == variant)].iloc[0]
            assert picked["id"] == row["id"] and picked["seed"] == 42
            assert picked["abs_rel"] == pytest.approx(row["abs_rel"], rel=1e-6)  # predicted again, the same score
    for key in ("qualitative_best", "qualitative_worst"):
        assert_picture(paths[key], min_h=200, min_w=600)

    # The error map: |pred - GT| / GT where the GT is in range, NaN (grey) where it is not
    example = predict_examples(demo_cfg, {"flat": flat}, {"flat": [best["id"]]})["flat"][0]
    error = relative_error(example.predictions["flat"], example.gt, 1e-3, 80.0)
    valid = (example.gt > 1e-3) & (example.gt <= 80.0)
    np.testing.assert_allclose(error[valid], np.abs(20.0 - example.gt[valid]) / example.gt[valid], rtol=1e-6)
    assert np.isnan(error[~valid]).all() and (~valid).any()
