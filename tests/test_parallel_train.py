"""`train.parallel`: how many variants train at once and with how many threads, and that a variant trained in a
Dask worker beside another is the variant trained alone, bit for bit."""

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import TrainConfig, dump_config
from pipeline.train import HISTORY_COLUMNS, parallel_plan, read_history, train_variant
from tests.conftest import derive


def test_parallel_plan_shares_the_cores(monkeypatch):
    cpu = TrainConfig(device="cpu")
    assert parallel_plan(cpu, 4, cores=2) == (2, 1)  # the demo: two variants at a time, one core each
    assert parallel_plan(cpu, 4, cores=16) == (4, 4)  # never more workers than variants; the cores shared out
    assert parallel_plan(cpu, 1, cores=16) == (1, 16)
    assert parallel_plan(cpu.model_copy(update={"num_threads": 2}), 4, cores=2) == (1, 2)  # threads set: fewer
    assert parallel_plan(cpu.model_copy(update={"num_threads": 4}), 4, cores=16) == (4, 4)
    assert parallel_plan(cpu.model_copy(update={"parallel": 3}), 4, cores=12) == (3, 4)
    assert parallel_plan(cpu.model_copy(update={"parallel": 8}), 2, cores=12) == (2, 6)
    monkeypatch.setattr("pipeline.train.resolve_device", lambda _: torch.device("cuda"))
    assert parallel_plan(TrainConfig(), 4, cores=16) == (1, 16)  # one GPU: one variant at a time


@pytest.mark.slow
def test_variants_trained_in_parallel_equal_variants_trained_alone(fast_cfg, prefect_harness, tmp_path,
                                                                     monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.train import train_decoders

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the Dask workers report to the harness too
    cfg = derive(fast_cfg, f"train.out_dir={tmp_path / 'runs'}", "train.epochs=2", "train.num_threads=1",
                 "train.parallel=2", "sweep=parallel")
    path = tmp_path / "parallel.yaml"
    path.write_text(yaml.safe_dump(dump_config(cfg)))
    variants = ["baseline", "full"]
    runs = train_decoders(config=str(path), variants=variants)
    assert runs == {v: str(Path(cfg.train.out_dir) / "parallel" / v) for v in variants}

    alone = derive(cfg, "train.parallel=1", "sweep=alone")
    for v in variants:
        train_variant(alone, v)  # in this process, one after the other, one thread
        for ckpt in ("best", "last"):
            together = Path(runs[v]) / ckpt / "model.safetensors"
            assert together.read_bytes() == (Path(alone.train.out_dir) / "alone" / v / ckpt / "model.safetensors"
                                             ).read_bytes(), f"{v} {ckpt}"
        timing = {"seconds", "val_seconds", "images_per_s"}
        rows = lambda p: [{k: r[k] for k in HISTORY_COLUMNS if k not in timing} for r in read_history(p)]
        assert rows(Path(runs[v]) / "history.csv") == rows(Path(alone.train.out_dir) / "alone" / v / "history.csv")
        assert len(rows(Path(runs[v]) / "history.csv")) == 2
