"""Shared fixtures: a tiny demo dataset with its feature caches built once per session, and a Prefect harness."""

import contextlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

# The suite never needs the network, and both settings are read when their libraries are imported: set them
# before anything imports huggingface_hub or Prefect, so that the README's plain `pytest` behaves as `.ci/run` does
# (which exports them). Without HF_HUB_OFFLINE at import, a lookup of the Hub happens even under
# local_files_only=True and the offline test of the encoder fails.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# One intra-op thread per process (the test process and every process it starts), read by torch when it is
# imported. The suite's tensors are small, and on a busy 2-core machine two OpenMP threads of one process spin-wait
# on each other: tiny-clip's forward at 224 px measured 55 ms on one thread against 80-700 ms on two. The pipeline
# still sets its own counts where a config asks (train.num_threads, extraction's per-worker threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Bytecode is cached (in the __pycache__ folders git ignores) even where the environment says not to
# (PYTHONDONTWRITEBYTECODE=1, as on this project's CI machines): otherwise each test process compiles the project and
# rewrites every test module's asserts again on every run. The fast tier's collection from a fresh clone: 14.4-15.6 s
# without the caches, 9.6-9.8 s with them (BENCHMARKS.md).
sys.dont_write_bytecode = False

import pytest  # noqa: E402
import yaml  # noqa: E402


# The files that take longest, longest first (`--dist loadfile` gives each file to one of the two test processes as
# they free up): the Prefect-server tests take the longest, and started last they would run alone at the end.
LONGEST_FIRST = ("test_serve.py", "test_faults.py", "test_learning.py", "test_gpu_check.py", "test_export.py",
                 "test_train.py", "test_extract.py", "test_seeds.py", "test_evaluate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def synth_kitti_data(root: Path, train: int, test: int, seed: int, val_fraction: float) -> dict:
    """The `data:` section of a synthetic KITTI-layout dataset rooted in `root` (rendered on first use)."""
    return {"layout": "kitti", "image_root": str(root / "raw"), "depth_root": str(root / "gt"),
            "train_split": str(root / "splits/eigen_train_files_with_gt.txt"),
            "test_split": str(root / "splits/eigen_test_files_with_gt.txt"),
            "val_fraction": val_fraction, "synth": {"train": train, "test": test, "seed": seed}}


def tiny_demo_config(root: Path) -> dict:
    """The demo setting shrunk for tests: 24 + 8 synthetic KITTI frames, tiny-clip, small crops and targets,
    everything rooted in `root`."""
    data = root / "data"
    return {
        "name": "tiny-demo",
        "sweep": "test",
        "data": synth_kitti_data(data, train=24, test=8, seed=0, val_fraction=0.2),
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


TIMING = ("seconds", "val_seconds", "images_per_s")  # wall-clock history columns: the only ones allowed to differ


def assert_same_run(got: Path, want: Path) -> None:
    """Checkpoint bytes, train state tensors (weights, optimiser, EMA, RNG) and history (timing aside) equal."""
    import json
    import math

    import torch

    from pipeline.train import HISTORY_NAME, STATE_NAME, load_state, read_history

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
    same = lambda a, b: a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))  # noqa: E731
    for ra, rb in zip(ha, hb):
        assert all(same(ra[k], rb[k]) for k in rb if k not in TIMING), (ra, rb)


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


# The decoder the tests train: the paper's four stages (and its semantic layers, which the demo's three-stage decoder
# does not read all of) at a quarter of its channels and more in the last stage ([64, 32, 16, 8] stalled on a
# handful of frames for some seeds). On the 64-px encoder an epoch of 36 views
# costs about a fifth of the paper decoder's (0.8 against 4.5 s of CPU), and 10 epochs still beat a constant depth
# predictor (val AbsRel 0.37 against 0.66). What the tests prove of training (bit-identity, resume, parallel equal
# to serial) does not depend on the decoder's size.
TEST_DECODER = ["decoder.channels=[64,32,16,16]", "decoder.semantic_layers=[12,9,6,3]"]


def derive(cfg, *overrides: str):
    """`cfg` with `--set`-style overrides applied (a new, validated `Config`)."""
    from pipeline.config import config_from_dict, dump_config

    return config_from_dict(dump_config(cfg), overrides=list(overrides))


def open_for(cfg, split: str):
    """The feature store of `cfg`'s `split`."""
    from pipeline.layout import RunContext

    return RunContext.of(cfg).open_store(split)


@pytest.fixture(scope="session")
def fast_cfg(demo_cfg, tmp_path_factory):
    """`demo_cfg`'s data on `tiny-clip-64` (tiny-clip's sizes at 64 px input: a 4 x 4 token grid) with
    `TEST_DECODER`, and its caches. The decoder then predicts at 64 x 64 instead of 224 x 224: for tests that train
    for several epochs. Trains at lr 1e-2 with a cosine schedule, which lowers validation AbsRel within a few epochs
    of 36 samples."""
    root = tmp_path_factory.mktemp("fast")
    cfg = derive(demo_cfg, "name=tiny-demo-64px", "sweep=fast", "encoder.name=tiny-clip-64",
                 f"train.out_dir={root / 'runs'}", "train.lr=1e-2", "train.schedule=cosine_warmup",
                 "train.batch_size=4", "train.num_threads=1", *TEST_DECODER)
    build_caches(cfg)
    return cfg


PROJECT_DB = Path(__file__).resolve().parents[1] / ".prefect" / "prefect.db"  # made by scripts/setup.sh


def _empty_database(db: Path) -> bool:
    """`db` holds Prefect's tables and no flow, flow run or deployment (as `scripts/setup.sh` leaves it)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return all(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
                       for table in ("flow", "flow_run", "deployment"))
    except sqlite3.Error:
        return False


@pytest.fixture(scope="session")
def prefect_db(tmp_path_factory) -> Path:
    """An empty Prefect database at the installed Prefect's schema, copied into each test server's home
    (`seed_home`): a server started on a fresh home first runs every migration, 14 s of CPU on 2 cores against 7 s
    on a migrated copy (BENCHMARKS.md). The one setup made if nothing ran on it yet, else one made once for the
    session (its test processes share it)."""
    if PROJECT_DB.is_file() and _empty_database(PROJECT_DB):
        return PROJECT_DB
    import subprocess

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every xdist worker of the session
    home = shared / "prefect-db"
    with FileLock(str(shared / "prefect-db.lock")):
        if not (home / "prefect.db").is_file():
            env = {**os.environ, "PREFECT_HOME": str(home)}
            env.pop("PREFECT_API_URL", None)
            subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                           check=True, capture_output=True, timeout=300)
    return home / "prefect.db"


def seed_home(home: Path, db: Path) -> Path:
    """`home` (a PREFECT_HOME) holding a copy of the migrated, empty database `db`."""
    import shutil

    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(db, home / "prefect.db")
    return home


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory, prefect_db):
    """A throwaway Prefect server + database for tests that run flows (started only when a test asks), as
    `prefect.testing.utilities.prefect_test_harness` starts one, on a copy of `prefect_db`. Yields its API URL: a
    test's `spaceclip` subprocesses given it as PREFECT_API_URL run against this server instead of starting a
    temporary one each (~15 s apiece on 2 cores)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    from flows.serve import free_port

    db = seed_home(tmp_path_factory.mktemp("prefect-harness"), prefect_db) / "prefect.db"
    with temporary_database_interface(), temporary_settings(
            {PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
        server = SubprocessASGIServer(port=free_port())
        server.start(timeout=60)
        try:
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield server.api_url
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=5)  # the last log lines, before the server goes away
        finally:
            server.stop()


# ---- helpers shared by several test modules --------------------------------------------------------------------
def write_config(tmp: Path, **sections) -> Path:
    """A tiny KITTI-layout config rooted in `tmp` (synthetic data, tiny-clip, small chunks)."""
    data = tmp / "data"
    cfg = {
        "data": synth_kitti_data(data, train=12, test=6, seed=3, val_fraction=0.25),
        "encoder": {"name": "tiny-clip", "batch_size": 3},
        "views": {"crop_size": [176, 352], "views_per_image": 1},
        "cache": {"root": str(tmp / "cache"), "chunk_size": 4, "layers": [0, 2, 12]},
        "dask": {"processes": False},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def store_files(url) -> dict[str, bytes]:
    """Every file of a store but its metadata (zarr.json holds the creation time of nothing, but the run's config
    and versions), by relative path."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def keep_main_env(monkeypatch) -> None:
    """main() sets Prefect/Dask defaults in os.environ: undo them after the test."""
    for key in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_LOGGING_EXTRA_LOGGERS",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "DASK_LOGGING__DISTRIBUTED"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:  # setenv records that it was unset, so main()'s value is removed afterwards
            monkeypatch.setenv(key, "")
            monkeypatch.delenv(key)


@pytest.fixture
def flow_calls(monkeypatch):
    """The flows as stand-ins: each call's keyword arguments, in order."""
    import flows.cli

    calls = []

    def record(**kw):
        calls.append(kw)
        return {}

    monkeypatch.setattr(flows.cli, "prefect_api", contextlib.nullcontext)
    monkeypatch.setattr(flows.cli, "print_results", lambda paths: None)
    for module, name in (("flows.extract", "extract_features"), ("flows.train", "train_decoders"),
                         ("flows.evaluate", "evaluate"), ("flows.paper_table", "paper_table")):
        monkeypatch.setitem(sys.modules, module, SimpleNamespace(**{name: record}))
    keep_main_env(monkeypatch)
    return calls


# ---- synthetic datasets rendered once a session ---------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def render_each_dataset_once(tmp_path_factory):
    """`synthesize_to` (what `synth.ensure` and `synth.synthesize` call) renders each (layout, train, test, seed)
    once a session into a cache folder and copies its files where a test asks: many tests ask for the same few
    datasets, and ray casting them was the costliest part of their set-up (BENCHMARKS.md). Copies, not links: some
    tests damage the files they are given. The generator's own tests (`tests/test_synth.py`) render for real
    (`real_rendering`); its output is byte-deterministic for a seed (`test_same_seed_same_bytes`).

    Under pytest-xdist the cache folder is the run's, shared by its test processes (the folder above each one's
    base temp), and a file lock per dataset makes one process render it while another that wants it waits: the
    demo's 24 + 8 frames are then rendered once a run, not once a process."""
    import shutil

    from filelock import FileLock

    from pipeline.synth import write

    real = write.synthesize_to
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "rendered"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("rendered")

    def copy_of_render(layout, *, image_root, depth_root, train_split, test_split, train, test, seed, workers=None):
        src = cache / f"{layout}-{train}-{test}-{seed}"
        with FileLock(f"{src}.lock"):
            if not (src / "done").exists():
                shutil.rmtree(src, ignore_errors=True)  # what a process that failed mid-render left
                real(layout, image_root=src / "images", depth_root=src / "depth", train_split=src / "train.txt",
                     test_split=src / "test.txt", train=train, test=test, seed=seed, workers=workers)
                (src / "done").touch()
        shutil.copytree(src / "images", image_root, dirs_exist_ok=True)
        shutil.copytree(src / "depth", depth_root, dirs_exist_ok=True)
        for got, want in ((src / "train.txt", train_split), (src / "test.txt", test_split),
                          (src / write.STAMP_NAME, Path(train_split).parent / write.STAMP_NAME)):
            write._write_text_atomic(Path(want), got.read_text())  # split files last: they mark a complete dataset
        return {"image_root": Path(image_root), "depth_root": Path(depth_root), "train_split": Path(train_split),
                "test_split": Path(test_split)}

    copy_of_render.real = real
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(write, "synthesize_to", copy_of_render)
        mp.setattr("pipeline.synth.synthesize_to", copy_of_render)
        yield


@pytest.fixture
def real_rendering(monkeypatch):
    """The generator itself, not the session's copies (for the tests of the generator)."""
    from pipeline.synth import write

    real = getattr(write.synthesize_to, "real", write.synthesize_to)
    monkeypatch.setattr(write, "synthesize_to", real)
    monkeypatch.setattr("pipeline.synth.synthesize_to", real)
