"""`train.shared_pass`: several variants trained on one read of each batch are bit-identical to each trained alone."""

from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.train import HISTORY_NAME, pass_plan, read_history, train_variant, train_variants
from tests.conftest import assert_same_run, derive


@pytest.mark.slow
def test_shared_pass_is_bit_identical_to_training_each_variant_alone(fast_cfg):
    # Dropout (p = 0.1) draws masks on every step and in bn_recompute's train-mode forwards; EMA with
    # ema_select=better validates two models per variant; baseline and full read different layers (the pass reads
    # the union); streaming reads: every path where sharing a pass could leak between variants.
    cfg = derive(fast_cfg, "sweep=shared", "train.epochs=2", "train.ema=0.9", "train.ema_select=better",
                 "train.bn_recompute=2", "train.cache_device=stream")
    assert cfg.decoder.dropout > 0
    variants = ["baseline", "full"]
    shared = train_variants(cfg, variants, resume=False)
    assert list(shared) == variants
    for variant in variants:
        alone = train_variant(derive(cfg, f"sweep=alone-{variant}"), variant, resume=False)
        assert_same_run(shared[variant].run_dir, alone.run_dir)


@pytest.mark.slow
def test_shared_pass_resumes_variants_killed_at_different_epochs(fast_cfg):
    cfg = derive(fast_cfg, "sweep=shared-resume", "train.epochs=3", "train.cache_device=cpu")

    class Killed(Exception):
        pass

    def kill(variant, row):  # baseline has written epoch 2, full not yet: they resume from different epochs
        if (variant, row["epoch"]) == ("baseline", 2):
            raise Killed

    with pytest.raises(Killed):
        train_variants(cfg, ["baseline", "full"], resume=False, on_epoch=kill)
    out = Path(cfg.train.out_dir) / "shared-resume"
    assert [len(read_history(out / v / HISTORY_NAME)) for v in ("baseline", "full")] == [2, 1]
    resumed = train_variants(cfg, ["baseline", "full"], resume=True)
    for variant in ("baseline", "full"):
        alone = train_variant(derive(cfg, f"sweep=shared-resume-ref-{variant}"), variant, resume=False)
        assert_same_run(resumed[variant].run_dir, alone.run_dir)


def test_pass_plan_shares_on_one_process_and_not_across_cpu_workers():
    variants = ["baseline", "film", "structural", "full"]
    tc = config_from_dict({}).train.model_copy(update={"device": "cpu"})
    assert pass_plan(tc.model_copy(update={"parallel": 1}), variants)[0] == [variants]
    assert pass_plan(tc.model_copy(update={"parallel": 2}), variants)[0] == [[v] for v in variants]
    groups, parallel, threads = pass_plan(tc.model_copy(update={"parallel": 2, "shared_pass": True}), variants,
                                          cores=2)
    assert groups == [["baseline", "structural"], ["film", "full"]] and (parallel, threads) == (2, 1)
    assert pass_plan(tc.model_copy(update={"parallel": 1, "shared_pass": False}), variants)[0] == [
        [v] for v in variants]
    assert pass_plan(tc, ["full"], cores=16)[0] == [["full"]]
