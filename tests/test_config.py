"""Typed configs: defaults reproduce the paper, YAML states what differs, bad keys and types are named with
their source, `--set` overrides reach every section, and the `spaceclip` entry point answers --help/version."""

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import CONFIG_DIR, ConfigError, config_from_dict, dump_config, load_config


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_the_papers():
    cfg = config_from_dict({})
    assert cfg.encoder.name == "openai/clip-vit-base-patch16"
    assert cfg.train.variants == ["baseline", "film", "structural", "full"]
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip, cfg.train.seed) == (1e-4, 0.01, 1.0, 42)
    assert (cfg.train.schedule, cfg.train.step_every, cfg.train.step_gamma) == ("step", 2, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.recipe) == (10, 64, "paper")
    assert (cfg.train.silog_weight, cfg.train.ssim_weight, cfg.train.aux_weights) == (0.5, 0.5, (0.10, 0.05, 0.0))
    assert cfg.data.depth_range == (1e-3, 80.0) and cfg.eval_crop == "garg"
    nyu = config_from_dict({"data": {"layout": "nyu"}})
    assert nyu.data.depth_range == (1e-3, 10.0) and nyu.eval_crop == "nyu"
    assert not cfg.eval.median_scaling and not cfg.eval.flip_tta  # options, never silent defaults


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert dump_config(config_from_dict(dump_config(cfg))) == dump_config(cfg)  # round-trips


def test_shipped_sweeps_load():
    assert load_config("demo", sweep="table2").train.variants == ["baseline", "film", "structural", "full"]
    assert load_config("demo", sweep="quick").train.variants == ["baseline", "full"]
    with pytest.raises(ConfigError, match="no sweep named 'nope'"):
        load_config("demo", sweep="nope")


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown key 'train.epoch'" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_the_key_the_file_and_the_value(tmp_path):
    path = write(tmp_path, {"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'train.epochs'" in message and str(path) in message and "'ten'" in message


def test_out_of_range_and_bad_literal_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'data.val_fraction'"):
        load_config(write(tmp_path, {"data": {"val_fraction": 1.5}}))
    with pytest.raises(ConfigError, match="'eval.crop'"):
        load_config(write(tmp_path, {"eval": {"crop": "middle"}}))


def test_set_overrides_nested_values_with_yaml_types(tmp_path):
    cfg = load_config("demo", ["train.epochs=3", "train.ema=0.996", "cache.layers=[0, 12]", "dask.address=null",
                               "encoder.name=tiny-clip", "views.crop_size=[100, 200]"])
    assert cfg.train.epochs == 3 and cfg.train.ema == 0.996
    assert cfg.cache.layers == (0, 12) and cfg.dask.address is None and cfg.views.crop_size == (100, 200)


def test_bad_override_is_named_as_the_override():
    with pytest.raises(ConfigError) as err:
        load_config("demo", ["train.epoch=3"])
    assert "--set train.epoch=3" in str(err.value)
    with pytest.raises(ConfigError, match="--set train.epochs=x"):
        load_config("demo", ["train.epochs=x"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config("demo", ["train.epochs"])
    with pytest.raises(ConfigError, match="'train' is a value, not a section"):
        load_config("demo", ["train=3", "train.epochs=2"])


def test_missing_config_names_what_exists(tmp_path):
    with pytest.raises(ConfigError, match="no config named 'kiti'.*demo"):
        load_config("kiti")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_variants_are_the_decoders_and_each_is_named_once():
    from typing import get_args

    from pipeline.config import Variant
    from spaceclip.decoder import VARIANTS

    assert set(get_args(Variant)) == set(VARIANTS)
    cfg = config_from_dict({}, overrides=["train.variants=[full, baseline, full]"])
    assert cfg.train.variants == ["full", "baseline"]
    with pytest.raises(ConfigError, match=r"'train\.variants\.1' in --set train\.variants=\[baseline, bogus\].*'bogus'"):
        config_from_dict({}, overrides=["train.variants=[baseline, bogus]"])
    with pytest.raises(ConfigError, match="train.variants"):
        config_from_dict({}, overrides=["train.variants=[]"])


def test_user_errors_share_one_base():
    from pipeline.datasets import DatasetError
    from pipeline.errors import SpaceClipError
    from pipeline.evaluate import EvaluationError
    from pipeline.export import ExportError
    from pipeline.importer import CheckpointImportError
    from pipeline.layout import RunError
    from pipeline.store import StoreError

    for error in (ConfigError, DatasetError, StoreError, RunError, EvaluationError, ExportError,
                  CheckpointImportError):
        assert issubclass(error, SpaceClipError), error


def spaceclip(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("spaceclip")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_help_version_and_config_error():
    out = spaceclip("--help")
    assert out.returncode == 0
    for command in ("extract", "train", "cache", "data", "predict", "export", "version"):
        assert command in out.stdout
    out = spaceclip("version", "-v")
    assert out.returncode == 0 and out.stdout.startswith("spaceclip 0.1.0")
    assert f"torch {md.version('torch')}" in out.stdout and f"zarr {md.version('zarr')}" in out.stdout
    out = spaceclip("train", "--config", "demo", "--set", "train.epoch=3")
    assert out.returncode == 2 and "unknown key 'train.epoch' in --set train.epoch=3" in out.stderr
