"""Shared fixtures: a tiny demo dataset with its feature caches built once per session, and a Prefect harness."""

import os
from pathlib import Path

# The suite never needs the network, and both settings are read when their libraries are imported: set them
# before anything imports huggingface_hub or Prefect, so that the README's plain `pytest` behaves as `.ci/run` does
# (which exports them). Without HF_HUB_OFFLINE at import, a lookup of the Hub happens even under
# local_files_only=True and the offline test of the encoder fails.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402


def tiny_demo_config(root: Path) -> dict:
    """The demo setting shrunk for tests: 24 + 8 synthetic KITTI frames, tiny-clip, small crops and targets,
    everything rooted in `root`."""
    data = root / "data"
    return {
        "name": "tiny-demo",
        "sweep": "test",
        "data": {
            "layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
            "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
            "test_split": str(data / "splits/eigen_test_files_with_gt.txt"),
            "val_fraction": 0.2, "synth": {"train": 24, "test": 8, "seed": 0},
        },
        "encoder": {"name": "tiny-clip", "batch_size": 8},
        "views": {"crop_size": [176, 352], "views_per_image": 2},
        "cache": {"root": str(root / "cache"), "chunk_size": 8, "target_size": [44, 88]},
        "train": {"epochs": 2, "batch_size": 8, "out_dir": str(root / "runs"), "cache_device": "auto"},
        # efficiency and failure cases off: timing the paper-width decoder at 224 px and two more figures would add
        # ~10 s to every evaluate flow run of the suite (tests/test_cross_dataset.py runs them through the flow)
        "eval": {"out_dir": str(root / "results"), "batch_size": 8, "efficiency": False, "failure_cases": False},
        "dask": {"processes": False, "n_workers": 1},
    }


def build_caches(cfg, splits=("train", "val", "test")) -> None:
    """Render the dataset if needed and extract the given splits' stores (pipeline functions, no Prefect)."""
    from pipeline.extract import extract_splits

    extract_splits(cfg, splits)


@pytest.fixture(scope="session")
def demo_cfg(tmp_path_factory):
    """The tiny demo config with its dataset rendered and its train/val/test caches extracted (once per session,
    through the pipeline functions rather than the Prefect flow, to stay fast). Returns the `Config`; derive
    variants with `config_from_dict(dump_config(cfg), overrides=[...])`."""
    from pipeline.config import load_config

    root = tmp_path_factory.mktemp("demo")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_demo_config(root)))
    cfg = load_config(path)
    build_caches(cfg)
    return cfg


@pytest.fixture(scope="session")
def fast_cfg(demo_cfg, tmp_path_factory):
    """`demo_cfg`'s data with a CLIP encoder of tiny-clip's sizes at 64 px input (a 4 x 4 token grid, saved as a
    local model folder), and its caches. The decoder then predicts at 64 x 64 instead of 224 x 224, about 12x
    less compute per training step on the CPU: for tests that train for several epochs. Trains at lr 1e-2 with a
    cosine schedule, which lowers validation AbsRel within a few epochs of 36 samples."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pipeline.config import config_from_dict, dump_config
    from spaceclip.encoder import PRESETS

    root = tmp_path_factory.mktemp("fast")
    encoder_dir = root / "tiny-clip-64px"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**{**PRESETS["tiny-clip"], "image_size": 64})).save_pretrained(encoder_dir)
    cfg = config_from_dict(dump_config(demo_cfg), overrides=[
        "name=tiny-demo-64px", "sweep=fast", f"encoder.name={encoder_dir}", f"train.out_dir={root / 'runs'}",
        "train.lr=1e-2", "train.schedule=cosine_warmup", "train.batch_size=4", "train.num_threads=2",
    ])
    build_caches(cfg)
    return cfg


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect server + database for tests that run flows (started only when a test asks). Yields its
    API URL: a test's `spaceclip` subprocesses given it as PREFECT_API_URL run against this server instead of
    starting a temporary one each (~15 s apiece on 2 cores)."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield prefect.settings.PREFECT_API_URL.value()
