"""`train.shared_pass`: several variants trained on one read of each batch are bit-identical to each trained alone."""

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.config import config_from_dict, dump_config
from pipeline.train import (HISTORY_NAME, STATE_NAME, load_state, pass_plan, read_history, train_variant,
                            train_variants)

TIMING = ("seconds", "val_seconds", "images_per_s")  # wall-clock columns: the only ones allowed to differ


def derive(cfg, *overrides):
    return config_from_dict(dump_config(cfg), overrides=list(overrides))


def same_value(a, b) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def assert_same_run(got: Path, want: Path) -> None:
    """Checkpoint bytes, train state tensors (weights, optimiser, EMA, RNG) and history (timing aside) equal."""
    for folder in ("last", "best"):
        assert (got / folder / "model.safetensors").read_bytes() == (want / folder / "model.safetensors").read_bytes()
        a, b = (json.loads((d / folder / "config.json").read_text()) for d in (got, want))
        for key in ("epoch", "val_metrics", "weights", "cache_fingerprint", "decoder"):
            assert a[key] == b[key], (folder, key)
    sa, sb = load_state(got / STATE_NAME), load_state(want / STATE_NAME)
    assert sa.keys() == sb.keys()
    assert torch.equal(sa["torch_rng"], sb["torch_rng"])  # each variant's random stream ends where it would alone
    for key in ("model", "ema"):
        if key in sa:
            assert all(torch.equal(sa[key][k], sb[key][k]) for k in sb[key])
    for key in ("epoch", "best_abs_rel", "best_epoch", "scheduler"):
        assert sa[key] == sb[key]
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pb)
    ha, hb = read_history(got / HISTORY_NAME), read_history(want / HISTORY_NAME)
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        assert all(same_value(ra[k], rb[k]) for k in rb if k not in TIMING), (ra, rb)


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
