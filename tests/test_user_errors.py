"""A user's mistake reaches the user as one line that says what to change, whichever layer raises it (issue 27,
item 10): an encoder that cannot load inside a flow, a train split with one drive (no validation drive to carve)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import yaml

from tests.conftest import keep_main_env, tiny_demo_config

BAD_SIZE = "encoder 'tiny-clip': image_size 168 is not a multiple of its patch size 16"


def small_config(root: Path, **data) -> Path:
    """The tiny demo config with 6 synthetic frames, rooted in `root`; `data` overrides keys of `data:`."""
    d = tiny_demo_config(root)
    d["data"]["synth"] = {"train": 6, "test": 2, "seed": 0}
    d["data"].update(data)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


# ---- an encoder that cannot load, inside a flow ------------------------------------------------------------------
def test_an_encoder_that_cannot_load_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    """`spaceclip extract --set encoder.image_size=168` with tiny-clip (patch 16): the flow's own code raises
    EncoderLoadError; the command prints it in one line (the flow is called as a plain function here, no server)."""
    import flows.cli
    import flows.extract

    monkeypatch.setattr(flows.cli, "prefect_api", contextlib.nullcontext)
    monkeypatch.setattr(flows.extract, "extract_features", flows.extract.extract_features.fn)
    monkeypatch.setattr(flows.extract, "get_run_logger", lambda: logging.getLogger("test"))
    keep_main_env(monkeypatch)
    path = small_config(tmp_path)
    assert flows.cli.main(["extract", "--config", str(path), "--set", "encoder.image_size=168"]) == 2
    err = capsys.readouterr().err  # the synthetic dataset's rendering bar, then the error
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "render synthetic" not in line]
    assert lines == [f"error: {BAD_SIZE}"], err


def test_an_encoder_that_cannot_load_fails_the_flow_run_in_one_line(tmp_path, monkeypatch):
    """Inside a flow run, the same error becomes the run's Failed state with a one-line message (no traceback
    through Prefect's engine)."""
    import flows.extract
    import flows.parameters
    from prefect.states import State

    from spaceclip.encoder import EncoderLoadError

    logger = logging.getLogger("test-flow-run")
    monkeypatch.setattr(logger, "propagate", False)  # handlers an earlier main() left on the root logger
    monkeypatch.setattr(flows.parameters.FlowRunContext, "get", classmethod(lambda cls: object()))
    monkeypatch.setattr(flows.parameters, "get_run_logger", lambda: logger)
    monkeypatch.setattr(flows.extract, "get_run_logger", lambda: logger)
    state = flows.extract.extract_features.fn(config=str(small_config(tmp_path)),
                                              overrides=["encoder.image_size=168"])
    assert isinstance(state, State) and state.is_failed()
    assert state.message == f"EncoderLoadError: {BAD_SIZE}"
    assert isinstance(state.data, EncoderLoadError) and state.data.reported_by_flow  # the engine logs no traceback


def test_every_user_error_prints_one_line(monkeypatch, capsys):
    """A message that wraps a lower layer's (with its line breaks) still prints as one line."""
    import flows.cli
    from pipeline.errors import user_errors
    from spaceclip.model import EncoderMismatchError

    assert EncoderMismatchError in user_errors()

    def fail(verbose):
        raise EncoderMismatchError("first line\n(second line)")

    monkeypatch.setattr(flows.cli, "print_version", fail)  # what the `version` command calls
    keep_main_env(monkeypatch)
    assert flows.cli.main(["version"]) == 2
    assert capsys.readouterr().err == "error: first line (second line)\n"


# ---- a train split of one drive -------------------------------------------------------------------------------
def one_drive_config(root: Path) -> Path:
    """The small config, its train split cut down to the frames of one drive (and data.synth off, so that the
    cut split is not re-rendered)."""
    from pipeline import synth
    from pipeline.config import load_config

    cfg = load_config(small_config(root))
    synth.ensure(cfg.data)
    lines = Path(cfg.data.train_split).read_text().splitlines()
    drive = lines[0].split("/")[1]
    split = root / "one_drive.txt"
    split.write_text("\n".join(line for line in lines if line.split("/")[1] == drive) + "\n")
    return small_config(root, synth=None, train_split=str(split))


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_train_split_of_one_drive_has_an_empty_validation_store_that_loads(tmp_path, caplog):
    """Validation is carved by whole drives: with one drive there is none. That is no error (training keeps the
    last epoch, as with data.val_fraction 0), but the empty store must load in memory (cache_device cpu) instead
    of dying with IndexError, and the log says why there is no validation and what to change."""
    from pipeline.config import load_config
    from pipeline.extract import extract_splits
    from pipeline.loader import CachedBatches
    from pipeline.store import FeatureStore

    cfg = load_config(one_drive_config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.datasets"):
        extract_splits(cfg, ("val",))
    (url,) = Path(cfg.cache.root).glob("kitti/val-*.zarr")
    store = FeatureStore.open(str(url))
    assert store.n == 0
    for mode in ("cpu", "stream"):
        batches = CachedBatches(store, (0, 3, 6), 4, train=False, cache_device=mode)
        assert batches.mode == mode and len(batches) == 0 and list(batches.epoch(0)) == []
    warned = [r.getMessage() for r in caplog.records if r.name == "pipeline.datasets"]
    assert len(warned) == 1 and "has 1 drive (2011_09_26_drive_0001_sync)" in warned[0]
    assert "Add drives to data.train_split" in warned[0] and "data.val_fraction=0" in warned[0]


@pytest.mark.slow
def test_an_encoder_that_cannot_load_in_a_real_flow_run_has_no_traceback(tmp_path, prefect_harness):
    """`python -m flows.cli extract` against a Prefect server: the run fails with the one-line message, the engine
    logs no traceback, the command's last line is the error, exit status 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "extract", "--config", str(small_config(tmp_path)),
                           "--set", "encoder.image_size=168"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.splitlines()[-1] == f"error: {BAD_SIZE}"
    assert f"Finished in state Failed(\"EncoderLoadError: {BAD_SIZE}\")" in proc.stderr


@pytest.mark.slow
def test_training_on_a_train_split_of_one_drive_keeps_the_last_epoch(tmp_path):
    """The whole path the issue saw die with IndexError: extract train + val, train with the features in memory.
    It trains; with no validation, best/ is the last epoch."""
    from pipeline.config import config_from_dict, dump_config, load_config
    from pipeline.extract import extract_splits
    from pipeline.train import train_variants

    cfg = load_config(one_drive_config(tmp_path))
    cfg = config_from_dict(dump_config(cfg), overrides=["train.epochs=1", "train.cache_device=cpu"])
    extract_splits(cfg, ("train", "val"))
    result = train_variants(cfg, ["baseline"])["baseline"]
    assert result.epochs_done == 1 and result.best_epoch == 1
    assert (result.run_dir / "best" / "model.safetensors").is_file()
