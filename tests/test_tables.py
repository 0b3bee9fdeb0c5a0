"""The result tables: this run's rows, the published rows (paper Table 1 / Table 2, abstract, release run) with
their sources, and the protocol line. Built from a hand-made `Evaluation`, so no training is needed."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline.evaluate import Evaluation
from pipeline.tables import COLUMNS, write_tables
from spaceclip.metrics import METRIC_KEYS

# The figures exactly as arXiv 2601.17657 prints them (Table 1 row SPACE-CLIP; Table 2 rows 1-4), typed in here
# from the paper, independently of pipeline/tables.py.
PAPER_TABLE1 = ["0.104", "0.658", "4.837", "0.180", "0.880", "0.970", "0.991"]
PAPER_TABLE2 = {
    "baseline": ["0.1165", "0.7981", "5.152", "0.1962", "0.858", "0.963", "0.988"],
    "film": ["0.1142", "0.7684", "5.121", "0.1941", "0.862", "0.964", "0.988"],
    "structural": ["0.1094", "0.7238", "5.143", "0.1911", "0.870", "0.966", "0.989"],
    "full": ["0.1038", "0.6577", "4.837", "0.1799", "0.880", "0.970", "0.991"],
}
MARKS = {"baseline": ["", ""], "film": ["✓", ""], "structural": ["", "✓"], "full": ["✓", "✓"]}


def protocol(dataset: str = "kitti", **extra) -> dict:
    return {
        "config": "unit", "sweep": "tables", "dataset": dataset, "synthetic": False,
        "split_file": "splits/eigen_test_files_with_gt.txt",
        "counts": {"lines": 3, "evaluated": 2, "gt_none": 1, "unreadable": 0, "no_valid_pixels": 0},
        "crop": "garg", "depth_range": [1e-3, 80.0], "median_scaling": False, "flip_tta": False,
        "selection": "best = lowest validation AbsRel", "encoder": "openai/clip-vit-base-patch16",
        "test_fingerprint": "abc123", "train_fingerprints": ["def456"], "versions": {"torch": "2.x"},
        "git": "0000000", **extra,
    }


def evaluation(dataset: str = "kitti", **extra) -> Evaluation:
    rows = []
    for v, base in (("baseline", 0.20), ("full", 0.10)):
        for i in range(2):
            rows.append({"variant": v, "id": f"img{i}", "line": i + 1, "gt_h": 4, "gt_w": 4, "valid_px": 16,
                         **{k: base + 0.01 * i for k in METRIC_KEYS}})
    per_image = pd.DataFrame(rows)
    skipped = pd.DataFrame([{"id": "img2", "line": 3, "reason": "GT None in the split file"}])
    return Evaluation(per_image, protocol(dataset, **extra)["counts"], protocol(dataset, **extra), {}, [], skipped)


def md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def test_kitti_table_quotes_paper_tables_1_and_2_with_sources(tmp_path):
    paths = write_tables(evaluation("kitti"), tmp_path)
    md = paths["table_md"].read_text()
    rows = md_rows(md)
    assert rows[0][4:] == ["n"] + [h for _, h, _, _ in COLUMNS]
    published = {row[1]: row for row in rows if row[0].startswith("published [")}

    t1 = published["SPACE-CLIP (paper Table 1)"]
    assert t1[2:4] == ["✓", "✓"] and t1[4:] == ["1"] + PAPER_TABLE1
    labels = {"baseline": "baseline (paper Table 2, #1)", "film": "baseline + FiLM (paper Table 2, #2)",
              "structural": "baseline + structural (paper Table 2, #3)", "full": "SPACE-CLIP full (paper Table 2, #4)"}
    for variant, label in labels.items():
        assert published[label][2:4] == MARKS[variant], label
        assert published[label][4:] == ["1"] + PAPER_TABLE2[variant], label
    # the abstract's figure and the release run stay, each with its own provenance
    assert published["SPACE-CLIP (abstract v2)"][5:] == ["0.0901"] + ["—"] * 6
    assert published["SPACE-CLIP (release run)"][5:] == ["0.0901", "0.4701", "3.845", "0.1528", "0.9088", "0.9812",
                                                         "0.9945"]

    # footnotes: the number in each row's Source cell points at the right source line
    notes = {line.split("]", 1)[0] + "]": line for line in md.splitlines() if line.startswith("[")}
    def note(label):
        return notes[published[label][0].removeprefix("published ")]
    assert "arXiv 2601.17657" in note("SPACE-CLIP (paper Table 1)") and "Table 1" in note("SPACE-CLIP (paper Table 1)")
    for label in labels.values():
        assert "arXiv 2601.17657" in note(label) and "Table 2" in note(label)
    assert "abstract" in note("SPACE-CLIP (abstract v2)") and "2601.17657v2" in note("SPACE-CLIP (abstract v2)")
    assert "historical_training.md" in note("SPACE-CLIP (release run)")
    assert "selected on the official test split" in note("SPACE-CLIP (release run)")

    # LaTeX: the same figures, one line per published row
    tex = paths["table_tex"].read_text()
    t1_line = next(line for line in tex.splitlines() if "SPACE-CLIP (paper Table 1)" in line)
    assert [c.strip().rstrip("\\").strip() for c in t1_line.split("&")][5:] == PAPER_TABLE1
    for variant, label in labels.items():
        line = next(line for line in tex.splitlines()
                    if "&" in line and line.split("&")[1].strip() == label.replace("#", r"\#"))
        assert [c.strip().rstrip("\\").strip() for c in line.split("&")][5:] == PAPER_TABLE2[variant]
    assert sum(line.startswith(r"published\textsuperscript") for line in tex.splitlines()) == 7
    assert r"Table 2 (decoder ablations on KITTI)" in tex and r"\url{https://arxiv.org/abs/2601.17657}" in tex


def test_nyu_table_keeps_the_abstract_and_release_rows_and_no_kitti_rows(tmp_path):
    md = write_tables(evaluation("nyu", crop="nyu", depth_range=[1e-3, 10.0]), tmp_path)["table_md"].read_text()
    published = {row[1]: row[5:] for row in md_rows(md) if row[0].startswith("published [")}
    assert published["SPACE-CLIP (abstract v2)"][0] == "0.1042"
    assert published["SPACE-CLIP (release run)"][0] == "0.1042"
    assert not any("Table" in label for label in published)  # the paper's tables are KITTI only


def test_protocol_json_carries_the_protocol_line(tmp_path):
    paths = write_tables(evaluation("kitti"), tmp_path)
    saved = json.loads(paths["protocol"].read_text())
    assert saved["protocol_line"].startswith("Protocol: KITTI, test split splits/eigen_test_files_with_gt.txt; N = 2")
    summary = pd.read_csv(paths["summary"])
    assert summary.set_index("variant")["abs_rel"].to_dict() == pytest.approx({"baseline": 0.205, "full": 0.105})


def seeded_evaluation(dataset: str = "kitti", seeds: int = 3, shift: float = 0.05) -> Evaluation:
    """Three variants x `seeds` seeds x 6 images: `full` better than baseline by `shift` AbsRel, `film` = baseline
    give or take seed noise."""
    import numpy as np

    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 0.03, 6)
    rows = []
    for v, effect in (("baseline", 0.0), ("film", 0.0), ("full", -shift)):
        for s in range(seeds):
            values = 0.2 + effect + rng.normal(0, 0.005) + difficulty + rng.normal(0, 0.002, 6)
            rows += [{"variant": v, "seed": s, "id": f"img{i}", "line": i + 1, "gt_h": 4, "gt_w": 4,
                      "valid_px": 16, **{k: x for k in METRIC_KEYS}, "d1": 1 - x} for i, x in enumerate(values)]
    p = protocol(dataset, seeds=list(range(seeds)))
    return Evaluation(pd.DataFrame(rows), p["counts"], p, {}, [], pd.DataFrame(columns=["id", "line", "reason"]))


def test_seeded_table_shows_mean_sd_n_and_intervals_from_the_statistics(tmp_path):
    from pipeline.stats import compare

    ev = seeded_evaluation()
    paths = write_tables(ev, tmp_path)
    md = paths["table_md"].read_text()
    rows = md_rows(md)
    assert rows[0][4] == "n" and rows[0][-2:] == ["ΔAbsRel↓ vs baseline [95 % CI]", "Δδ<1.25↑ vs baseline [95 % CI]"]
    ours = {row[1]: row for row in rows if row[0] == "this run"}
    seed_means = ev.per_image.groupby(["variant", "seed"])["abs_rel"].mean()
    for v in ("baseline", "film", "full"):
        m = seed_means[v].to_numpy()
        assert ours[v][4] == "3"
        assert ours[v][5].strip("*") == f"{m.mean():.4f} ± {m.std(ddof=1):.4f}"  # mean ± sample sd over seeds
    assert ours["baseline"][-2] == "reference"
    c = compare(ev.per_image, "full", "baseline", "abs_rel")
    assert c.significant and ours["full"][-2] == f"−{-c.diff:.4f} [−{-c.low:.4f}, −{-c.high:.4f}]†"
    f = compare(ev.per_image, "film", "baseline", "abs_rel")
    assert not f.significant and not ours["film"][-2].endswith("†") and f.low < 0 < f.high
    # bold: full is significantly better than the runner-up on AbsRel; nothing else is bold in that column
    assert ours["full"][5].startswith("**") and not any(ours[v][5].startswith("**") for v in ("baseline", "film"))
    assert "Significant: " in md and "full < baseline in 3 of 3 seeds" in md and "Not significant: " in md
    pairs = pd.read_csv(paths["pairwise"])
    assert len(pairs) == 3 * len(COLUMNS) and set(pairs["confidence"]) == {0.95}
    row = pairs[(pairs.metric == "abs_rel") & (pairs.a == "baseline") & (pairs.b == "full")].iloc[0]
    assert row["low"] == pytest.approx(-c.high) and row["high"] == pytest.approx(-c.low) and row["significant"]
    summary = pd.read_csv(paths["summary"])
    assert len(summary) == 9 and list(summary.columns[:2]) == ["variant", "seed"]  # one row per (variant, seed)
    tex = paths["table_tex"].read_text()
    assert r"$\pm$" in tex and r"$^\dagger$" in tex and r"95\% CI" in tex


def test_one_seed_table_says_so_and_bolds_nothing(tmp_path):
    md = write_tables(seeded_evaluation(seeds=1), tmp_path)["table_md"].read_text()
    ours = [row for row in md_rows(md) if row[0] == "this run"]
    assert all(row[4] == "1" and "±" not in "".join(row) and "**" not in "".join(row) for row in ours)
    assert len(md_rows(md)[0]) == 5 + len(COLUMNS)  # no difference columns
    assert "One seed per variant (seed 0)" in md and "no ± and no interval" in md


def test_published_seed_studies_show_their_spread_and_single_runs_n_1(tmp_path):
    md = write_tables(seeded_evaluation("nyu"), tmp_path)["table_md"].read_text()
    published = {row[1]: row for row in md_rows(md) if row[0].startswith("published [")}
    full = published["full (controlled study, 5 seeds)"]
    assert full[4] == "5" and full[5] == "0.1283 ± 0.0113"  # component_comparison.json: mean, sample_sd
    assert published["film (controlled study, 5 seeds)"][9] == "0.7797 ± 0.0745"
    assert published["SPACE-CLIP (release run)"][4] == "1"
