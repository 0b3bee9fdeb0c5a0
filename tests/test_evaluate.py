"""Evaluation: hand-derived metrics through the whole path, GT-None counting, median scaling and flip TTA, the tables
(summary = mean of per-image rows, published rows, protocol line), the pictures, and the evaluate / paper-table
flows and CLI."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline import datasets
from pipeline.config import ConfigError, dump_config
from pipeline.evaluate import EvaluationError, evaluate_run
from pipeline.tables import COLUMNS, PUBLISHED, published_for
from pipeline.train import train_variant
from spaceclip.metrics import METRIC_KEYS
from tests.conftest import derive, open_for


def split_lines(cfg) -> list[list[str]]:
    return [line.split() for line in Path(cfg.data.test_split).read_text().splitlines() if line.strip()]


def gt_by_id(cfg) -> dict[str, np.ndarray]:
    """Every test frame's ground truth, read here independently of the evaluation code (uint16 PNG / 256)."""
    out = {}
    for row in open_for(cfg, "test").index().itertuples():
        if row.depth_path:
            out[row.id] = np.asarray(Image.open(row.depth_path), dtype=np.float64) / 256.0
    return out


def garg_valid(gt: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """docs/design.md's Garg crop, written out again: rows [0.40810811 H, 0.99189189 H), cols [0.03594771 W,
    0.96405229 W)."""
    h, w = gt.shape
    crop = np.zeros_like(gt, dtype=bool)
    crop[int(0.40810811 * h):int(0.99189189 * h), int(0.03594771 * w):int(0.96405229 * w)] = True
    return crop & (gt > lo) & (gt < hi)


def scaled_gt(cfg, factor: float):
    """A predictor that returns `factor` x the ground truth at its native resolution (float64, one image a batch)."""
    store = open_for(cfg, "test")
    index = store.index()

    def predict(batch):
        (p,) = batch.index  # eval.batch_size = 1: the frames differ in size
        sample = datasets.Sample(index.id[p], Path(index.image_path[p]), Path(index.depth_path[p]), 1.0, 1,
                                 Path(cfg.data.test_split), "")
        return torch.from_numpy(datasets.load_depth(sample, "kitti").astype(np.float64) * factor)[None]

    return predict


def constant(value: float, size: int = 16):
    """A constant map at a low resolution (16 x 16): exercises the bilinear resize to the GT's resolution."""
    return lambda batch: torch.full((len(batch.index), size, size), value, dtype=torch.float64)


def hand_metrics(pred: np.ndarray, g: np.ndarray) -> dict:
    thresh = np.maximum(g / pred, pred / g)
    return {"abs_rel": np.mean(np.abs(g - pred) / g), "sq_rel": np.mean((g - pred) ** 2 / g),
            "rmse": np.sqrt(np.mean((g - pred) ** 2)), "d1": np.mean(thresh < 1.25), "d2": np.mean(thresh < 1.5625)}


# ---- the evaluation path with known predictions --------------------------------------------------------------------
def test_gt_times_1_1_gives_the_hand_derived_metrics_and_none_lines_are_counted(demo_cfg):
    # max_depth 100: 1.1 x GT (GT up to ~75 m) is never clipped, so every metric has a closed form.
    cfg = derive(demo_cfg, "data.max_depth=100", "eval.batch_size=1")
    c = 31 / 3  # a constant whose ratios to the 1/256-m GT steps never tie with the 1.25^k thresholds
    ev = evaluate_run(cfg, predictors={"scaled": scaled_gt(cfg, 1.1), "constant": constant(c)})

    lines = split_lines(cfg)
    none_lines = [i for i, fields in enumerate(lines, start=1) if fields[1] == "None"]
    assert len(lines) == 8 and len(none_lines) == 1  # the tiny demo: 8 test lines, one with GT None
    assert ev.counts == {"lines": 8, "evaluated": 7, "gt_none": 1, "unreadable": 0, "no_valid_pixels": 0}
    assert list(ev.skipped["line"]) == none_lines and list(ev.skipped["reason"]) == ["GT None in the split file"]
    gts = gt_by_id(cfg)
    assert len(gts) == 7 and ev.skipped["id"].iloc[0] not in gts

    per = ev.per_image.set_index(["variant", "id"])
    assert sorted(per.loc["scaled"].index) == sorted(gts)
    for image_id, gt in gts.items():
        valid = garg_valid(gt, 1e-3, 100.0)
        g = gt[valid]
        row = per.loc[("scaled", image_id)]
        assert (row.gt_h, row.gt_w) == gt.shape
        assert row.valid_px == valid.sum() > 100
        assert row.abs_rel == pytest.approx(0.1, abs=1e-12)  # |1.1 g - g| / g
        assert row.sq_rel == pytest.approx(0.01 * g.mean(), rel=1e-9)  # (0.1 g)^2 / g
        assert row.rmse == pytest.approx(0.1 * np.sqrt(np.mean(g ** 2)), rel=1e-9)
        assert row.rmse_log == pytest.approx(math.log(1.1), rel=1e-9)
        assert row.log10 == pytest.approx(math.log10(1.1), rel=1e-9)
        assert row.silog == pytest.approx(0.0, abs=1e-5)  # a constant log error is scale, not structure
        assert (row.d1, row.d2, row.d3) == (1.0, 1.0, 1.0)
        expected = hand_metrics(np.full_like(g, c), g)  # the 16 x 16 constant, resized: still c everywhere
        row = per.loc[("constant", image_id)]
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-9), key
    summary = ev.summary().set_index("variant")
    assert summary.loc["scaled", "abs_rel"] == pytest.approx(0.1, abs=1e-12)
    assert summary.loc["scaled", "n_images"] == 7
    assert summary.loc["constant", "rmse"] == pytest.approx(per.loc["constant", "rmse"].mean(), rel=1e-12)


def test_median_scaling_rescales_to_the_gt_median(demo_cfg):
    cfg = derive(demo_cfg, "data.max_depth=100", "eval.batch_size=1", "eval.median_scaling=true",
                 "train.epochs=4", "train.validate_from=3")
    ev = evaluate_run(cfg, predictors={"scaled": scaled_gt(cfg, 1.1), "constant": constant(31 / 3)})
    per = ev.per_image.set_index(["variant", "id"])
    for image_id, gt in gt_by_id(cfg).items():
        g = gt[garg_valid(gt, 1e-3, 100.0)]
        row = per.loc[("scaled", image_id)]  # 1.1 x GT scaled by median(g) / median(1.1 g): GT again
        assert row.abs_rel == pytest.approx(0.0, abs=1e-12) and row.rmse == pytest.approx(0.0, abs=1e-9)
        assert row.d1 == 1.0
        row = per.loc[("constant", image_id)]  # a constant becomes median(g) everywhere
        assert row.abs_rel == pytest.approx(np.mean(np.abs(g - np.median(g)) / g), rel=1e-9)
    assert ev.protocol["median_scaling"] is True
    # checkpoints chosen among the validated epochs only: the protocol says which
    from pipeline.tables import protocol_line

    assert ev.protocol["selection"].endswith(", among epochs 3-4 (train.validate_from)")
    assert "among epochs 3-4" in protocol_line(ev.protocol)


def test_flip_tta_averages_the_flipped_back_prediction_in_feature_space(demo_cfg):
    def equivariant(batch):  # a function of each token's own features: flipping the grid flips the map
        return 5.0 + 40.0 * torch.sigmoid(batch.features["tokens"][12].double().mean(-1))  # (B, g, g)

    lo, hi = 5.0, 124 / 3 - 5.0  # a left-to-right ramp that ignores the features; its mean 62/3 never ties

    def ramp(batch):
        return torch.linspace(lo, hi, 16, dtype=torch.float64).expand(len(batch.index), 16, 16)

    predictors = {"equivariant": equivariant, "ramp": ramp, "constant": constant(62 / 3)}
    plain = evaluate_run(demo_cfg, predictors=predictors).per_image.set_index(["variant", "id"])
    tta = evaluate_run(derive(demo_cfg, "eval.flip_tta=true"), predictors=predictors).per_image.set_index(
        ["variant", "id"])
    metrics = list(METRIC_KEYS)
    # flip, predict, flip back, average: a flip-equivariant predictor is unchanged ...
    pd.testing.assert_frame_equal(tta.loc["equivariant", metrics], plain.loc["equivariant", metrics])
    # ... a ramp and its mirror average to its mean, a constant: TTA changes it exactly that way
    pd.testing.assert_frame_equal(tta.loc["ramp", metrics], plain.loc["constant", metrics], rtol=1e-9)
    assert not np.allclose(plain.loc["ramp", "abs_rel"], plain.loc["constant", "abs_rel"])


# ---- trained checkpoints through the flows --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(fast_cfg, tmp_path_factory):
    """baseline and full, one epoch each on the 64-px cache (a few seconds), and the config as a YAML file."""
    cfg = derive(fast_cfg, "sweep=evaltest", "train.epochs=1")
    for variant in ("baseline", "full"):
        train_variant(cfg, variant, resume=False)
    path = tmp_path_factory.mktemp("evaluate") / "config.yaml"
    path.write_text(yaml.safe_dump(dump_config(cfg)))
    return cfg, path


def assert_picture(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400, pixels.shape
    assert pixels.std() > 20, f"{path} looks blank (pixel std {pixels.std():.1f})"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, f"{path} has almost no distinct colours"


@pytest.mark.slow
def test_evaluate_flow_cli_tables_and_pictures(trained, prefect_harness, capsys, monkeypatch):
    from prefect.artifacts import Artifact
    from prefect.settings import PREFECT_API_URL

    from flows.cli import main

    cfg, path = trained
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the CLI reuses the harness's server
    assert main(["evaluate", "--config", str(path), "--variants", "baseline,full"]) == 0
    printed = capsys.readouterr().out
    out = Path(cfg.eval.out_dir) / "evaltest"
    assert f"results in {out}/" in printed and "| this run" in printed  # the table, then where everything is

    # summary.csv is the per-image mean, recomputed here from per_image.csv alone
    per_image, summary = pd.read_csv(out / "per_image.csv"), pd.read_csv(out / "summary.csv")
    assert list(summary["variant"]) == ["baseline", "full"]
    assert (per_image.groupby("variant").size() == 7).all() and set(per_image["variant"]) == {"baseline", "full"}
    recomputed = per_image.groupby("variant")[list(METRIC_KEYS)].mean()
    for record in summary.to_dict("records"):
        assert record["n_images"] == 7
        for key in METRIC_KEYS:
            assert record[key] == pytest.approx(recomputed.loc[record["variant"], key], rel=1e-12, abs=1e-15), key
        assert record["checkpoint_epoch"] == 1
    assert list(pd.read_csv(out / "skipped.csv")["reason"]) == ["GT None in the split file"]

    # table.md: one row per variant with this run's numbers, the published rows, the protocol line
    md = (out / "table.md").read_text()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ")]  # the header and the body (not the alignment row)
    assert rows[0][:5] == ["Source", "Variant", "FiLM", "Structural", "n"]
    assert rows[0][5:] == [header for _, header, _, _ in COLUMNS]  # one seed: no difference columns
    ours = [row for row in rows if row[0] == "this run"]
    assert [row[1] for row in ours] == ["baseline", "full"]
    assert [row[2:4] for row in ours] == [["", ""], ["✓", "✓"]]
    for row, record in zip(ours, summary.to_dict("records")):
        # one seed: a single run's values, no ±, nothing bold (no difference is tested against seed noise)
        assert row[4:] == ["1"] + [fmt.format(record[key]) for key, _, _, fmt in COLUMNS]
    assert "One seed per variant (seed 42)" in md and "no ± and no interval" in md
    published = published_for("kitti")
    theirs = [row for row in rows if row[0].startswith("published [")]
    assert [row[1] for row in theirs] == [p.label for p in published]
    for row, p in zip(theirs, published):
        assert row[4:] == ["1"] + [p.cell(key, fmt) for key, _, _, fmt in COLUMNS]  # published single runs: n = 1
    by_label = {row[1]: row[5:] for row in theirs}
    assert by_label["SPACE-CLIP (abstract v2)"][0] == "0.0901"  # the abstract's KITTI AbsRel
    assert by_label["SPACE-CLIP (paper Table 1)"] == ["0.104", "0.658", "4.837", "0.180", "0.880", "0.970", "0.991"]
    (protocol,) = [line for line in md.splitlines() if line.startswith("Protocol:")]
    test_fp = open_for(cfg, "test").fingerprint
    for part in ("N = 7 evaluated of 8 lines, skipped 1 GT None", "crop garg", "valid GT in (0.001, 80) m",
                 "median scaling off", "flip TTA off", "lowest validation AbsRel", f"test {test_fp}",
                 "torch ", "git "):
        assert part in protocol, part
    assert "not comparable" in md  # synthetic data and a tiny encoder

    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\caption{" in tex
    assert sum(line.startswith("this run & ") for line in tex.splitlines()) == 2
    assert sum(line.startswith(r"published\textsuperscript") for line in tex.splitlines()) == len(published)
    assert "Protocol: KITTI layout" in tex and r"eigen\_test\_files\_with\_gt.txt" in tex

    for name in ("qualitative.png", "training_curves.png"):
        assert_picture(out / name)
    key = "spaceclip-tiny-demo-64px-evaltest"
    assert Artifact.get(f"{key}-summary").type == "table"
    assert Artifact.get(f"{key}-table").data == md

    # a variant without a checkpoint: a one-line error naming it and where it was looked for
    assert main(["evaluate", "--config", str(path), "--variants", "film"]) == 2
    err = capsys.readouterr().err
    assert "'film'" in err and str(Path(cfg.train.out_dir) / "evaltest" / "film" / "best") in err


@pytest.mark.slow
def test_bad_parameters_fail_with_a_named_error(trained, prefect_harness):
    from flows.evaluate import evaluate

    cfg, path = trained
    with pytest.raises(ConfigError, match="no-such-config"):
        evaluate(config="no-such-config")
    with pytest.raises(ConfigError, match="bogus"):
        evaluate(config=str(path), variants=["baseline", "bogus"])
    with pytest.raises(EvaluationError, match="'structural'"):
        evaluate(config=str(path), variants=["structural"])
    with pytest.raises(ConfigError, match="eval.crop 'nyu'"):
        evaluate(config=str(path), overrides=["eval.crop=nyu"], variants=["baseline"])


@pytest.mark.slow
def test_paper_table_reuses_the_cache_and_finished_runs(trained, prefect_harness):
    from flows.paper_table import paper_table

    cfg, path = trained
    state = Path(cfg.train.out_dir) / "evaltest" / "baseline" / "train_state.pt"
    stamp = state.stat().st_mtime_ns
    stores = sorted(Path(cfg.cache.root).glob("kitti/*.zarr"))
    paths = paper_table(config=str(path), variants=["baseline"], overrides=["eval.flip_tta=true"])
    assert state.stat().st_mtime_ns == stamp  # already trained: skipped
    assert sorted(Path(cfg.cache.root).glob("kitti/*.zarr")) == stores  # same fingerprints: reused
    assert Path(paths["results"]) == Path(cfg.eval.out_dir) / "evaltest"
    assert "flip TTA on" in Path(paths["table_md"]).read_text()
    assert list(pd.read_csv(paths["summary"])["variant"]) == ["baseline"]


def test_published_figures_are_sourced_and_never_filled_in():
    for row in PUBLISHED:
        assert row.source.url.startswith("https://") and row.source.where
        assert set(row.metrics) <= {key for key, *_ in COLUMNS}
    abstract = {row.dataset: row.metrics for row in PUBLISHED if row.label == "SPACE-CLIP (abstract v2)"}
    assert abstract == {"kitti": {"abs_rel": 0.0901}, "nyu": {"abs_rel": 0.1042}}  # the abstract's figures, only
    table2 = [row for row in PUBLISHED if "Table 2" in row.label]
    assert [row.variant for row in table2] == ["baseline", "film", "structural", "full"]
    assert all(len(row.metrics) == len(COLUMNS) for row in table2)  # every column, as the paper prints it


# ---- protocol options: least-squares alignment, GT at 352 x 704 --------------------------------------------------
def gt_function(cfg, fn):
    """A predictor returning fn(GT) at the GT's native resolution (one image a batch)."""
    store = open_for(cfg, "test")
    index = store.index()

    def predict(batch):
        (p,) = batch.index
        gt = np.asarray(Image.open(index.depth_path[p]), dtype=np.float64) / 256.0
        return torch.from_numpy(fn(gt))[None]

    return predict


def test_lstsq_alignment_is_the_closed_form_scale_and_shift(demo_cfg):
    from pipeline.tables import protocol_line

    cfg = derive(demo_cfg, "data.max_depth=100", "eval.batch_size=1", "eval.alignment=lstsq")
    curved = lambda g: 3.0 * np.sqrt(g) + 1.0  # not affine in g: the aligned map keeps a residual
    ev = evaluate_run(cfg, predictors={"affine": gt_function(cfg, lambda g: 0.5 * g + 3.0),
                                       "curved": gt_function(cfg, curved)})
    per = ev.per_image.set_index(["variant", "id"])
    for image_id, gt in gt_by_id(cfg).items():
        valid = garg_valid(gt, 1e-3, 100.0)
        g, p = gt[valid], curved(gt)[valid]
        s = np.sum((p - p.mean()) * (g - g.mean())) / np.sum((p - p.mean()) ** 2)  # the normal equations
        t = g.mean() - s * p.mean()
        aligned = np.clip(s * p + t, 1e-3, 100.0)
        row = per.loc[("curved", image_id)]
        for key, value in hand_metrics(aligned, g).items():
            assert row[key] == pytest.approx(value, rel=1e-7), key
        assert row.abs_rel > 0.005  # the fit is not exact
        row = per.loc[("affine", image_id)]  # an affine map of GT is aligned back onto it
        assert row.abs_rel == pytest.approx(0.0, abs=1e-9) and row.d1 == 1.0
    line = protocol_line(ev.protocol)
    assert "least-squares scale-and-shift alignment per image, in depth space (median scaling off)" in line
    assert ev.protocol["alignment"] == "lstsq" and ev.protocol["median_scaling"] is False

    # eval.median_scaling keeps working (it is alignment=median), and a contradiction is refused
    assert derive(demo_cfg, "eval.median_scaling=true").eval.alignment is None
    with pytest.raises(ConfigError, match="eval.median_scaling=true contradicts eval.alignment=lstsq"):
        evaluate_run(derive(demo_cfg, "eval.median_scaling=true", "eval.alignment=lstsq"),
                     predictors={"a": gt_function(cfg, lambda g: g)})


def test_gt_resized_to_352x704_like_the_authors_loader(demo_cfg):
    from pipeline.tables import protocol_line

    cfg = derive(demo_cfg, "data.max_depth=100", "eval.batch_size=1", "eval.gt_resolution=352x704")
    c = 31 / 3
    ev = evaluate_run(cfg, predictors={"constant": constant(c)})
    per = ev.per_image.set_index(["variant", "id"])
    for image_id, gt in gt_by_id(cfg).items():
        H, W = gt.shape
        rows = np.floor((np.arange(352) + 0.5) * H / 352).astype(int)  # PIL's nearest neighbour: pixel centres
        cols = np.floor((np.arange(704) + 0.5) * W / 704).astype(int)
        small = gt[rows][:, cols]
        valid = garg_valid(small, 1e-3, 100.0)  # the crop as fractions of the resized GT
        row = per.loc[("constant", image_id)]
        assert (row.gt_h, row.gt_w) == (352, 704) and row.valid_px == valid.sum()
        for key, value in hand_metrics(np.full(valid.sum(), c), small[valid]).items():
            assert row[key] == pytest.approx(value, rel=1e-9), key
    assert "GT resized nearest-neighbour to 352×704 and the prediction bilinearly to it" in protocol_line(ev.protocol)
    with pytest.raises(ConfigError, match="eval.gt_resolution=352x704 is the authors' KITTI protocol"):
        evaluate_run(derive(demo_cfg, "eval.gt_resolution=352x704", "data.layout=nyu", "eval.crop=nyu"),
                     predictors={"a": constant(c)})
