"""Cross-dataset evaluation: the tiny KITTI-layout demo's runs scored on a tiny synthetic NYU-layout test split with
NYU's protocol, the diagonal equal to the ordinary evaluation, the matrix on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import datasets
from pipeline.config import ConfigError
from pipeline.cross_dataset import OWN, config_for_test_set, cross_dataset, main, write_cross_dataset
from pipeline.evaluate import evaluate_run
from spaceclip.decoder import resize
from spaceclip.metrics import compute_metrics, mean_metrics


def ramp(batch):
    """Depth growing to the right, 2 m -> 30 m over the 16-pixel map, whatever the features."""
    cols = torch.linspace(2.0, 30.0, 16, dtype=torch.float64)
    return cols.expand(len(batch.index), 16, 16).clone()


@pytest.fixture(scope="module")
def nyu_set(tmp_path_factory):
    """A tiny synthetic NYU-layout dataset's config file (rendered on first use: 2 train + 5 test frames)."""
    root = tmp_path_factory.mktemp("nyu-set")
    data = root / "nyu"
    path = root / "tiny-nyu.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"layout": "nyu", "image_root": str(data / "sync"), "depth_root": str(data / "sync"),
                 "train_split": str(data / "splits/nyudepthv2_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/nyudepthv2_test_files_with_gt.txt"),
                 "synth": {"train": 2, "test": 5, "seed": 3}},
        "views": {"kb_crop": False, "mode": "full"},
    }))
    return path


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_diagonal_is_the_ordinary_evaluation_and_nyu_is_scored_with_its_protocol(demo_cfg, nyu_set, tmp_path):
    evaluation = evaluate_run(demo_cfg, predictors={"ramp": ramp})
    table = cross_dataset(demo_cfg, evaluation, test_sets=[str(nyu_set)], predictors={"ramp": ramp})

    own = table[(table["test"] == demo_cfg.name) & (table["alignment"] == OWN)].iloc[0]
    summary = evaluation.summary().iloc[0]
    for key in ("abs_rel", "rmse", "d1", "n_images"):
        assert own[key] == summary[key]  # the diagonal: the ordinary evaluation's numbers, exactly
    assert (own["crop"], own["max_depth"], own["test_dataset"]) == ("garg", 80.0, "kitti")
    aligned = table[(table["test"] == demo_cfg.name) & (table["alignment"] == "median")].iloc[0]
    assert aligned["crop"] == "garg" and aligned["abs_rel"] != own["abs_rel"]

    nyu = table[table["test"] == str(nyu_set)].iloc[0]
    assert (nyu["test_dataset"], nyu["crop"], nyu["min_depth"], nyu["max_depth"], nyu["alignment"]) == (
        "nyu", "nyu", 1e-3, 10.0, "median")
    assert nyu["n_images"] == 5 and "/nyu/test-" in nyu["test_cache"]
    # Independently: each NYU test frame's GT from its file, the ramp resized to it, NYU's crop and range, medians
    other = config_for_test_set(demo_cfg, str(nyu_set))
    samples = datasets.parse_split_file(Path(other.data.test_split), *map(Path, other.data.roots("test")), "nyu")
    per_image, uncropped = [], []
    for sample in samples:
        gt = datasets.load_depth(sample, "nyu")
        pred = resize(ramp(type("B", (), {"index": [0]}))[None], gt.shape)[0, 0].numpy()
        per_image.append(compute_metrics(pred, gt, crop="nyu", min_depth=1e-3, max_depth=10.0, median_scaling=True))
        uncropped.append(compute_metrics(pred, gt, crop="none", min_depth=1e-3, max_depth=80.0, median_scaling=True))
    assert nyu["abs_rel"] == pytest.approx(mean_metrics(per_image)["abs_rel"], rel=1e-9)
    assert mean_metrics(uncropped)["abs_rel"] != pytest.approx(nyu["abs_rel"], rel=1e-6)  # the protocol matters

    paths = write_cross_dataset(table, tmp_path)
    assert pd.read_csv(paths["cross_dataset_csv"]).shape[0] == 3
    text = paths["cross_dataset_md"].read_text()
    assert f"| {demo_cfg.name} | ramp | {OWN} | {own['abs_rel']:.4f} ◆ | — |" in text
    assert f"{nyu['abs_rel']:.4f}" in text and "(NYU test, crop nyu, (0.001, 10] m)" in text
    main([str(paths["cross_dataset_csv"]), "-o", str(tmp_path / "matrix.md")])
    assert (tmp_path / "matrix.md").read_text() == text


def test_a_test_set_whose_crop_does_not_fit_fails_before_any_work(demo_cfg, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"layout": "kitti"}, "eval": {"crop": "nyu"}}))
    with pytest.raises(ConfigError, match="eval.crop 'nyu' does not apply to kitti"):
        config_for_test_set(demo_cfg, str(path))
    with pytest.raises(ConfigError, match="eval.test_sets entry 'no-such-set'"):
        config_for_test_set(demo_cfg, "no-such-set")
    assert np.isfinite(demo_cfg.data.depth_range[1])


@pytest.mark.slow
def test_evaluate_flow_writes_failure_cases_efficiency_and_the_matrix(fast_cfg, nyu_set, prefect_harness,
                                                                       tmp_path):
    """The flow's new steps on trained checkpoints (one epoch of baseline and full on the 64-px cache)."""
    from flows.evaluate import evaluate
    from pipeline.config import config_from_dict, dump_config
    from pipeline.train import train_variant
    from spaceclip.decoder import SpaceClipDecoder

    cfg = config_from_dict(dump_config(fast_cfg), overrides=["sweep=extras", "train.epochs=1",
                                                             "train.variants=[baseline,full]"])
    for variant in cfg.train.variants:
        train_variant(cfg, variant, resume=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(dump_config(cfg)))
    paths = evaluate(config=str(path), overrides=["eval.efficiency=true", "eval.efficiency_batch=2",
                                                  "eval.failure_cases=true",
                                                  f"eval.test_sets=[{nyu_set}]"])
    for key in ("qualitative_best", "qualitative_worst", "failure_cases", "efficiency_md", "efficiency_csv",
                "cross_dataset_md", "cross_dataset_csv"):
        assert Path(paths[key]).is_file(), key
    out = Path(paths["results"])
    per_image, summary = pd.read_csv(out / "per_image.csv"), pd.read_csv(out / "summary.csv")

    chosen = pd.read_csv(out / "failure_cases.csv")
    for variant, run in per_image.groupby("variant"):
        best = chosen[(chosen["which"] == "best") & (chosen["variant"] == variant)].iloc[0]
        assert best["id"] == run.loc[run["abs_rel"].idxmin(), "id"]
        assert best["abs_rel"] == pytest.approx(run["abs_rel"].min(), rel=1e-5)

    efficiency = pd.read_csv(out / "efficiency.csv").set_index("variant")
    for variant in cfg.train.variants:
        decoder = SpaceClipDecoder.from_pretrained(Path(cfg.train.out_dir) / "extras" / variant / "best")
        assert efficiency.loc[variant, "params_decoder"] == sum(p.numel() for p in decoder.parameters())
    assert efficiency.loc["full (authors)", "params_total"] == 97_850_420

    matrix = pd.read_csv(out / "cross_dataset.csv")
    own = matrix[matrix["alignment"] == OWN].set_index("variant")
    for record in summary.to_dict("records"):
        assert own.loc[record["variant"], "abs_rel"] == pytest.approx(record["abs_rel"], rel=1e-12)
    nyu = matrix[matrix["test"] == str(nyu_set)]
    assert set(nyu["crop"]) == {"nyu"} and set(nyu["max_depth"]) == {10.0} and len(nyu) == 2
