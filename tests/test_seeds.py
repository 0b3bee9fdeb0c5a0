"""Seeds as a sweep axis: the config key and its bad values, the run folders, the pass plans over (variant, seed)
runs, a seed's run equal to a one-seed run with that seed, a half-trained seed grid resumed to the same bytes, and
an evaluation with missing seeds refused or (--allow-partial) stated."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict, dump_config, load_config
from pipeline.evaluate import EvaluationError, evaluate_run
from pipeline.layout import run_dir
from pipeline.tables import write_tables
from pipeline.train import (HISTORY_NAME, pass_plan, read_history, run_label, seed_config, seed_runs, train_variant,
                            train_variants)
from tests.conftest import assert_same_run, derive


@pytest.mark.parametrize("value, words", [("[]", "empty seed list"), ("[3, 1, 3]", "[3] listed more than once")])
def test_empty_or_repeated_seeds_fail_naming_the_key(value, words):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [f"train.seeds={value}"])
    message = str(err.value)
    assert "'train.seeds'" in message and words in message and "--set train.seeds=" in message


def test_demo_fixes_at_least_three_seeds_in_the_config():
    tc = load_config("demo").train
    assert tc.seeds is not None and len(tc.seeds) >= 3 and tc.multi_seed


def test_run_folders_one_seed_as_before_several_seeds_below_the_variant(tmp_path):
    one = config_from_dict({"sweep": "s", "train": {"out_dir": str(tmp_path), "seed": 7}})
    assert run_dir(one, "full") == tmp_path / "s" / "full"  # unchanged: old runs resume where they are
    assert one.train.seed_list == [7] and not one.train.multi_seed and seed_runs(one.train)[0] == ("baseline", 7)
    listed_once = derive(one, "train.seeds=[5]")
    assert run_dir(listed_once, "full") == tmp_path / "s" / "full" and seed_config(listed_once, None).train.seed == 5
    many = derive(one, "train.seeds=[0, 1, 2]", "train.variants=[baseline, full]")
    assert run_dir(many, "full", 1) == tmp_path / "s" / "full" / "seed-1"
    assert run_dir(seed_config(many, 2), "full") == tmp_path / "s" / "full" / "seed-2"
    assert seed_runs(many.train) == [("baseline", 0), ("full", 0), ("baseline", 1), ("full", 1), ("baseline", 2),
                                     ("full", 2)]
    assert run_label(many.train, "full", 2) == "full/seed-2" and run_label(one.train, "full", 7) == "full"


def test_pass_plans_cover_variants_times_seeds_and_never_mix_seeds_in_a_pass():
    tc = config_from_dict({"train": {"device": "cpu", "seeds": [0, 1, 2]}}).train
    runs = seed_runs(tc)  # 4 variants x 3 seeds
    groups, parallel, threads = pass_plan(tc.model_copy(update={"parallel": 2}), runs, cores=2)
    assert groups == [[r] for r in runs] and (parallel, threads) == (2, 1)  # the demo: 12 tasks, 2 at a time
    groups, parallel, _ = pass_plan(tc.model_copy(update={"parallel": 1}), runs, cores=2)  # a GPU: shared passes
    assert groups == [[r for r in runs if r[1] == s] for s in (0, 1, 2)] and parallel == 1
    groups, *_ = pass_plan(tc.model_copy(update={"parallel": 2, "shared_pass": True}), runs, cores=2)
    assert groups == [[("baseline", 0), ("structural", 0)], [("film", 0), ("full", 0)],
                      [("baseline", 1), ("structural", 1)], [("film", 1), ("full", 1)],
                      [("baseline", 2), ("structural", 2)], [("film", 2), ("full", 2)]]


@pytest.mark.slow
def test_a_seed_of_a_sweep_is_bit_identical_to_a_one_seed_run_with_that_seed(fast_cfg):
    sweep = derive(fast_cfg, "sweep=seeds", "train.epochs=2", "train.seeds=[3, 11]")
    results = train_variants(sweep, ["baseline", "full"], seed=11, resume=False)  # one shared pass of seed 11
    assert results["full"].run_dir == Path(sweep.train.out_dir) / "seeds" / "full" / "seed-11"
    assert results["full"].seed == 11
    for variant in ("baseline", "full"):
        alone = train_variant(derive(fast_cfg, f"sweep=one-seed-{variant}", "train.epochs=2", "train.seed=11"),
                              variant, resume=False)
        assert alone.run_dir == Path(fast_cfg.train.out_dir) / f"one-seed-{variant}" / variant
        assert_same_run(results[variant].run_dir, alone.run_dir)
    other = train_variant(sweep, "full", seed=3, resume=False)
    assert (other.run_dir / "last" / "model.safetensors").read_bytes() != (
        results["full"].run_dir / "last" / "model.safetensors").read_bytes()  # another seed, another decoder


@pytest.mark.slow
def test_a_half_trained_seed_grid_resumes_to_the_same_bytes(fast_cfg, prefect_harness, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.train import train_decoders

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    cfg = derive(fast_cfg, f"train.out_dir={tmp_path / 'runs'}", "sweep=grid", "train.epochs=2", "train.parallel=1",
                 "train.seeds=[0, 1]", "train.variants=[baseline, full]")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(dump_config(cfg)))

    class Killed(Exception):
        pass

    def kill(variant, row):
        if (variant, row["epoch"]) == ("full", 1):
            raise Killed

    # The grid half done: seed 0 finished, seed 1's baseline finished and its full killed after epoch 1.
    train_variants(cfg, ["baseline", "full"], seed=0, resume=False)
    with pytest.raises(Killed):
        train_variants(cfg, ["baseline", "full"], seed=1, resume=False, on_epoch=kill)
    out = Path(cfg.train.out_dir) / "grid"
    assert len(read_history(out / "full" / "seed-1" / HISTORY_NAME)) == 1

    runs = train_decoders(config=str(path))  # the flow resumes what is unfinished and skips what is done
    assert runs == {f"{v}/seed-{s}": str(out / v / f"seed-{s}") for s in (0, 1) for v in ("baseline", "full")}
    reference = derive(cfg, f"train.out_dir={tmp_path / 'ref'}")
    for s in (0, 1):
        train_variants(reference, ["baseline", "full"], seed=s, resume=False)  # the same grid, uninterrupted
        for v in ("baseline", "full"):
            assert_same_run(out / v / f"seed-{s}", Path(reference.train.out_dir) / "grid" / v / f"seed-{s}")


@pytest.mark.slow
def test_missing_seeds_are_refused_or_stated_never_averaged_silently(fast_cfg, tmp_path):
    cfg = derive(fast_cfg, f"train.out_dir={tmp_path / 'runs'}", f"eval.out_dir={tmp_path / 'results'}",
                 "sweep=partial", "train.epochs=1", "train.seeds=[0, 1, 2]", "train.variants=[baseline, full]")
    for s in (0, 1, 2):
        train_variant(cfg, "baseline", seed=s, resume=False)
    for s in (0, 1):
        train_variant(cfg, "full", seed=s, resume=False)  # full/seed-2 never trained
    with pytest.raises(EvaluationError, match=r"1 of the 6 runs .*full/seed-2: no checkpoint.*--allow-partial"):
        evaluate_run(cfg)

    evaluation = evaluate_run(derive(cfg, "eval.allow_partial=true"))
    assert evaluation.missing_runs.keys() == {"full/seed-2"}
    per_image = evaluation.per_image
    assert per_image.groupby("variant")["seed"].nunique().to_dict() == {"baseline": 3, "full": 2}
    summary = evaluation.summary()
    assert list(zip(summary["variant"], summary["seed"])) == [("baseline", 0), ("baseline", 1), ("baseline", 2),
                                                              ("full", 0), ("full", 1)]
    paths = write_tables(evaluation, tmp_path / "tables")
    md = paths["table_md"].read_text()
    cells = {row[1]: row for row in ([c.strip() for c in line.strip().strip("|").split("|")]
                                     for line in md.splitlines() if line.startswith("| this run"))}
    assert cells["baseline"][4] == "3" and cells["full"][4] == "2"  # each cell says its n
    assert "PARTIAL SWEEP (--allow-partial): not evaluated full/seed-2" in md
    pairs = pd.read_csv(paths["pairwise"])
    assert set(pairs["n_a"]) == {3} and set(pairs["n_b"]) == {2}

    # unfinished runs (the same folders read by a config of 2 epochs: each trained 1 of 2) are refused as well
    with pytest.raises(EvaluationError, match=r"6 of the 6 runs .*baseline/seed-0: trained 1 of 2 epochs"):
        evaluate_run(derive(cfg, "train.epochs=2"))
