"""Training passes on an existing Dask scheduler (`dask.address`): a real `dask scheduler` and two `dask worker`
processes on loopback train a grid's passes, and each run's checkpoints are the bytes one process writes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distributed import Client

from pipeline.config import dump_config
from tests.conftest import derive

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def scheduler(tmp_path, prefect_harness):
    """`tcp://127.0.0.1:<port>` of a scheduler with two single-threaded worker processes (the CLIs from this venv),
    the workers reporting to the Prefect harness."""
    env = {**os.environ, "PREFECT_API_URL": prefect_harness, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(file)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                           str(file), "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(file.read_text())["address"]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=30)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_passes_on_an_existing_scheduler_equal_one_process(fast_cfg, scheduler, tmp_path):
    """A 2 x 2 grid (train.lr x decoder.dropout, pipeline/grid.py) of one variant: four passes spread over the two
    workers, each point's checkpoints the bytes of its config trained alone in one process."""
    from flows.train import train_decoders
    from pipeline.devices import plan_on_scheduler
    from pipeline.grid import points
    from pipeline.train import train_variant

    plan = plan_on_scheduler(scheduler)
    assert plan.n_workers == 2 and plan.threads >= 1
    cfg = derive(fast_cfg, f"train.out_dir={tmp_path / 'runs'}", "train.epochs=1", "sweep=remote",
                 "train.num_threads=null", "decoder.channels=[16,8,8,8]", "train.variants=[baseline]",
                 "grid={'train.lr': [0.01, 0.005], 'decoder.dropout': [0.1, 0.0]}")
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False))  # the axes in their order
    grid_points = points(cfg)
    runs = train_decoders(config=str(path), dask_address=scheduler)
    assert runs == {f"{p.label}/baseline": str(tmp_path / "runs" / "remote" / p.label / "baseline")
                    for p in grid_points}
    assert len(runs) == 4
    with Client(scheduler, timeout=30) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "train_pass_task" in prefixes  # the passes ran on that scheduler's workers

    for i, p in enumerate(grid_points):
        alone = derive(cfg, "grid={}", *(f"{k}={v}" for k, v in p.values.items()), "train.parallel=1",
                       f"train.num_threads={plan.threads}", f"sweep=alone-{i}")
        train_variant(alone, "baseline")
        for ckpt in ("best", "last"):
            remote = Path(runs[f"{p.label}/baseline"]) / ckpt / "model.safetensors"
            assert remote.read_bytes() == (tmp_path / "runs" / f"alone-{i}" / "baseline" / ckpt /
                                           "model.safetensors").read_bytes()
