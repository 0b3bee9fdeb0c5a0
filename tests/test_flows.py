"""The flows' own logic without a Prefect server (fast tier): parameters become one typed config, and a bad
parameter fails before any work with the error that names it. Each flow is called as a plain function
(`flow.fn`), its run logger a standard logger; runs on a real Prefect server are in tests/test_train.py,
tests/test_evaluate.py and tests/test_serve.py (slow tier)."""

from __future__ import annotations

import logging

import pytest
import yaml

from flows import evaluate as evaluate_flow
from flows import extract as extract_flow
from flows import paper_table as paper_table_flow
from flows import train as train_flow
from flows.parameters import fail_run_on_user_error, run_config
from pipeline.config import ConfigError, dump_config
from pipeline.evaluate import EvaluationError
from pipeline.store import StoreError


@pytest.fixture
def config_path(demo_cfg, tmp_path, monkeypatch):
    """The tiny demo config (its caches extracted, nothing trained in this sweep) as the YAML file a flow takes."""
    for module in (extract_flow, train_flow, evaluate_flow, paper_table_flow):
        if hasattr(module, "get_run_logger"):
            monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test-flows"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**dump_config(demo_cfg), "sweep": "flow-checks"}))
    return str(path)


def test_run_config_turns_flow_parameters_into_overrides(config_path, tmp_path):
    cfg = run_config(config_path, ["train.epochs=3"], None, variants=["film", "full"], cache_root=str(tmp_path),
                     dask_address="tcp://scheduler:8786")
    assert list(cfg.train.variants) == ["film", "full"] and cfg.train.epochs == 3
    assert cfg.cache.root == str(tmp_path) and cfg.dask.address == "tcp://scheduler:8786"
    assert run_config(config_path, None, None).train.variants == run_config(config_path, [], None).train.variants
    with pytest.raises(ConfigError, match="bogus"):  # an unknown variant fails as train.variants would
        run_config(config_path, None, None, variants=["baseline", "bogus"])


def test_user_errors_propagate_outside_a_flow_run():
    @fail_run_on_user_error
    def bad(kind):
        raise kind("the message")

    with pytest.raises(ConfigError, match="the message"):
        bad(ConfigError)
    with pytest.raises(KeyError):  # not a user error: a bug keeps its type and traceback
        bad(KeyError)


def test_extract_flow_refuses_unknown_splits_and_a_bad_scheduler_address(config_path):
    with pytest.raises(ConfigError, match=r"unknown splits \['bogus'\]"):
        extract_flow.extract_features.fn(config=config_path, splits=["train", "bogus"])
    with pytest.raises(ConfigError, match="not a scheduler address"):
        extract_flow.extract_features.fn(config=config_path, dask_address="http://localhost:1")


def test_train_flow_runs_the_fingerprint_guard_before_training(config_path):
    # Another view seed is another cache: the flow refuses it, naming the split, instead of training on stale features.
    with pytest.raises(StoreError, match="no feature store for this config's train split"):
        train_flow.train_decoders.fn(config=config_path, overrides=["views.seed=7"], variants=["baseline"])


def test_evaluate_and_paper_table_flows_check_variants_and_protocol_first(config_path):
    with pytest.raises(EvaluationError, match="'structural'"):  # nothing trained in this sweep
        evaluate_flow.evaluate.fn(config=config_path, variants=["structural"])
    with pytest.raises(ConfigError, match="eval.crop 'nyu'"):
        evaluate_flow.evaluate.fn(config=config_path, overrides=["eval.crop=nyu"], variants=["baseline"])
    # paper-table fails on a protocol that cannot apply before it extracts or trains anything
    with pytest.raises(ConfigError, match="eval.crop 'nyu'"):
        paper_table_flow.paper_table.fn(config=config_path, overrides=["eval.crop=nyu"], variants=["baseline"])
