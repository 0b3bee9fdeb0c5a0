"""Nothing lost under faults and races (issue 15): concurrent runs, damaged files, a full disk.

- claims: a chunk or a run folder has one live holder; a dead holder's claim is taken over at once
- concurrent extraction: two runs of one config share the chunks (each chunk written once) and leave the bytes of
  a single run; two creators of one store share it
- damage: `verify` names the array, the chunk and its samples for any array; extraction rewrites exactly the damaged
  chunks, after which the bytes equal a clean run's; a damaged checkpoint or training state is refused by path
- a full disk (simulated ENOSPC; and for real on a small tmpfs where this runs as root): one line naming the path,
  nothing half-written kept, and the same command resumes once there is space
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import claims, synth
from pipeline.config import load_config
from pipeline.errors import DiskFullError
from pipeline.extract import extract_splits, prepare_store
from pipeline.layout import RunError, finalize_store, locked_run_dirs, replaced_atomically
from pipeline.store import FeatureStore, StoreError, StoreSpec
from tests.conftest import seed_home, store_files, write_config

ROOT = Path(__file__).resolve().parent.parent


def holder_process(path: Path, what: str) -> subprocess.Popen:
    """A separate process that claims `path` and keeps it until killed (prints "held" once it holds it)."""
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline import claims
        claim = claims.try_claim({str(path)!r}, {what!r})
        print("held" if claim.acquired else "refused", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---- claims ------------------------------------------------------------------------------------------------------
def test_a_claim_has_one_holder_and_a_dead_holders_claim_is_taken_over(tmp_path):
    path = tmp_path / "claims" / "3"
    first = claims.try_claim(path, "extracting chunk 3")
    assert first.acquired
    second = claims.try_claim(path, "extracting chunk 3")  # another open file: threads exclude each other too
    assert not second.acquired and second.holder["pid"] == os.getpid()
    assert f"pid {os.getpid()}" in second.describe_holder() and "extracting chunk 3" in second.describe_holder()
    first.release()
    assert not path.exists()  # released: the file is gone
    with claims.claimed(path, "again") as third:
        assert third.acquired

    proc = holder_process(path, "a holder that crashes")
    try:
        refused = claims.try_claim(path, "me")
        assert not refused.acquired and refused.holder["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    taken = claims.try_claim(path, "me")  # no timeout to wait out: the kernel dropped the dead holder's lock
    assert taken.acquired and taken.holder["pid"] == os.getpid()
    taken.release()
    claims.sweep(path.parent)
    assert not path.parent.exists()


def test_a_run_folder_lock_has_one_holder_and_a_crashed_holder_never_blocks(tmp_path):
    folder = tmp_path / "runs" / "demo" / "full"
    folder.mkdir(parents=True)
    proc = holder_process(folder / ".lock", "training full")
    try:
        with pytest.raises(RunError) as err:
            with locked_run_dirs([folder]):
                pass
        message = str(err.value)
        assert message.startswith(f"{folder} is in use: another training writes it (pid {proc.pid} on ")
        assert "training full" in message and f"lock {folder / '.lock'}" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with locked_run_dirs([folder]):  # the crashed holder does not block the next training
        assert (folder / ".lock").exists()
    assert not (folder / ".lock").exists()


def test_a_second_training_into_a_run_folder_is_refused_naming_folder_and_holder(tmp_path):
    from pipeline.train import train_variant

    cfg = load_config(write_config(tmp_path))
    cfg.train.out_dir = str(tmp_path / "runs")
    folder = Path(cfg.train.out_dir) / cfg.sweep / "baseline"
    folder.mkdir(parents=True)
    proc = holder_process(folder / ".lock", "training baseline")
    try:
        with pytest.raises(RunError) as err:
            train_variant(cfg, "baseline")  # refused before it reads a store or touches the folder
        message = str(err.value)
        assert str(folder) in message and f"pid {proc.pid}" in message and "training baseline" in message
        assert list(folder.iterdir()) == [folder / ".lock"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# ---- concurrent extraction ---------------------------------------------------------------------------------------
def _spec(n=10, cs=2, fp="f" * 16, flipped=False):
    return StoreSpec(n=n, layers=(0, 3), grid=2, width=4, chunk_size=cs, target_hw=(3, 5), flipped=flipped,
                     attrs={"fingerprint": fp})


def _index(n=10):
    return dict(
        id=np.array([f"s{i}" for i in range(n)]), image_path=np.array([f"/img/{i}.png" for i in range(n)]),
        depth_path=np.array([""] * n), focal=np.full(n, 721.5), orig_hw=np.tile([375, 1242], (n, 1)).astype(np.int32),
        view=np.zeros((n, 5), np.int32), group=np.array(["g"] * n), line=np.arange(1, n + 1, dtype=np.int32),
    )


def _chunk_data(store: FeatureStore, c: int) -> dict:
    a, b = store.chunk_range(c)
    gen = torch.Generator().manual_seed(c)
    grid, width = store.attrs["grid"], store.attrs["width"]
    data = dict(tokens={k: torch.randn(b - a, grid, grid, width, generator=gen) for k in store.layers},
                cls=torch.randn(b - a, width, generator=gen),
                depth=np.random.default_rng(c).uniform(0, 80, (b - a, 3, 5)).astype(np.float32))
    if store.has_flipped:
        data["flipped"] = ({k: -v for k, v in data["tokens"].items()}, -data["cls"])
    return data


def _write_all(store: FeatureStore) -> None:
    for c in store.pending_chunks():
        store.write_chunk(c, **_chunk_data(store, c))
    store.mark_complete()


def test_two_creators_of_one_store_share_it(tmp_path):
    url = str(tmp_path / "cache" / "train-ffff.zarr")
    barrier, made = threading.Barrier(4), []

    def create():
        barrier.wait()
        made.append(FeatureStore.create(url, _spec(), _index()))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s.created for s in made) == [False, False, False, True]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["train-ffff.zarr"]  # no temporary folder left
    _write_all(made[0])
    assert FeatureStore.open(url).verify()["ok"]
    # a later creator never overwrites it; one with another fingerprint is refused, naming both
    assert not FeatureStore.create(url, _spec(), _index()).created and FeatureStore.open(url).complete
    with pytest.raises(StoreError, match="already holds a store with fingerprint f{16}, not 0{16}"):
        FeatureStore.create(url, _spec(fp="0" * 16), _index())


def test_a_creator_killed_before_its_rename_leaves_nothing_behind(tmp_path):
    """A creator killed mid-creation leaves only its hidden folder; the next creator on that host removes it when
    its process is gone (and leaves a live creator's alone)."""
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache, host = tmp_path / "cache", socket.gethostname()
    left = cache / f".train-ffff.zarr.creating-{host}-{int(dead.stdout)}-0123abcd"
    live = cache / f".train-ffff.zarr.creating-{host}-{os.getpid()}-4567cdef"
    for folder in (left, live):
        (folder / "index").mkdir(parents=True)
    FeatureStore.create(str(cache / "train-ffff.zarr"), _spec(), _index())
    assert sorted(p.name for p in cache.iterdir()) == sorted([live.name, "train-ffff.zarr"])


def test_concurrent_writers_write_each_chunk_once_and_the_bytes_of_one(tmp_path):
    """Four writer threads over one store, each claiming chunks as the extraction tasks do: every chunk is written
    exactly once and the files equal a single writer's."""
    single = FeatureStore.create(str(tmp_path / "single.zarr"), _spec(n=23, cs=2), _index(23))
    _write_all(single)
    shared = FeatureStore.create(str(tmp_path / "shared.zarr"), _spec(n=23, cs=2), _index(23))
    writes, barrier = [], threading.Barrier(4)

    def writer():
        barrier.wait()
        store = FeatureStore.open(shared.url, mode="r+")
        for c in range(store.n_chunks):
            with store.claim_chunk(c) as claim:
                if claim.acquired and not store.chunk_done(c):
                    store.write_chunk(c, **_chunk_data(store, c))
                    writes.append(c)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(writes) == list(range(shared.n_chunks))
    finalize_store(shared.url)
    assert store_files(shared.url) == store_files(single.url)
    assert not shared.claims_dir.exists()  # released claims leave nothing behind


CONCURRENT_RUN = """
import sys
from pipeline import extract
from pipeline.config import load_config
from pipeline.store import FeatureStore
written = open(sys.argv[2], "a")
inner = FeatureStore.write_chunk
def counted(self, c, *args, **kwargs):
    inner(self, c, *args, **kwargs)
    written.write(f"{self.url.rsplit('/', 1)[1].split('-')[0]} {c}\\n")
    written.flush()
FeatureStore.write_chunk = counted
cfg = load_config(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
extract.extract_splits(cfg, ("train", "test"))
"""


@pytest.mark.slow
def test_two_extraction_processes_of_one_config_share_the_chunks(tmp_path):
    """Two processes extract the same config at once (started together, from no store at all): both succeed,
    every chunk of each split is extracted by exactly one of them, and the stores equal a single run's."""
    cfg_path = write_config(tmp_path, cache={"chunk_size": 1})
    cfg = load_config(cfg_path)
    synth.ensure(cfg.data)
    log = tmp_path / "written.txt"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(cfg_path), str(log)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # go: both plan, both try to create the stores
        p.stdin.write("\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    lines = log.read_text().split()
    written = list(zip(lines[::2], map(int, lines[1::2])))
    assert len(written) == len(set(written))  # nobody redid a chunk
    fresh = cfg.model_copy(deep=True)
    fresh.cache.root = str(tmp_path / "fresh")
    extract_splits(fresh, ("train", "test"))
    for split in ("train", "test"):
        shared, _ = prepare_store(cfg, split)
        single, _ = prepare_store(fresh, split)
        assert shared.complete and shared.verify()["ok"]
        assert sorted(c for s, c in written if s == split) == list(range(shared.n_chunks))
        assert store_files(shared.url) == store_files(single.url)


@pytest.mark.slow
def test_two_spaceclip_extract_commands_at_once(tmp_path, prefect_db):
    """The issue's own reproduction: two `spaceclip extract` of one config started together both exit 0, and the
    store is a single run's, byte for byte."""
    cfg_path = write_config(tmp_path, cache={"chunk_size": 2})
    cfg = load_config(cfg_path)
    synth.ensure(cfg.data)
    env = dict(os.environ, PREFECT_HOME=str(seed_home(tmp_path / "prefect", prefect_db)),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1")
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "extract", "--config", str(cfg_path), "--splits", "train,val"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    import re

    # each chunk task logs what it did: extracted it ("N samples"), or left it to the other run
    per_run = [re.findall(r"(train|val) chunk (\d+): \d+ samples", out) for out in outputs]
    written = [m for run in per_run for m in run]
    print(f"chunks extracted by each run: {[len(run) for run in per_run]}")
    assert len(written) == len(set(written))  # none twice
    fresh = cfg.model_copy(deep=True)
    fresh.cache.root = str(tmp_path / "fresh")
    extract_splits(fresh, ("train", "val"))
    for split in ("train", "val"):
        shared, single = prepare_store(cfg, split)[0], prepare_store(fresh, split)[0]
        assert shared.complete and shared.verify()["ok"]
        assert store_files(shared.url) == store_files(single.url)
        assert sorted(int(c) for s, c in written if s == split) == list(range(shared.n_chunks))


# ---- damage ------------------------------------------------------------------------------------------------------
DAMAGEABLE = ["tokens/L0", "tokens/L3", "cls", "depth", "flipped/tokens/L3", "flipped/cls", "skipped", "skip_reason",
              "done"]


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory) -> Path:
    """A small complete store with the mirrored arrays, written once for the module; each test damages a copy."""
    url = tmp_path_factory.mktemp("complete") / "s.zarr"
    _write_all(FeatureStore.create(str(url), _spec(n=8, cs=4, flipped=True), _index(8)))  # two chunks a data array
    return url


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("name", DAMAGEABLE + ["index/id", "index/focal", "index/view"])
def test_verify_names_the_array_the_chunk_and_its_samples(tmp_path, name, how, capsys, complete_store):
    from flows.cli import main as cli

    url = str(tmp_path / "s.zarr")
    shutil.copytree(complete_store, url)
    store = FeatureStore.open(url)
    c = 0 if name.startswith("index/") else 1
    path = store.chunk_path(name, c)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else bytes(255 - b for b in data))
    report = FeatureStore.open(url).verify()
    assert not report["ok"]
    problem = " | ".join(report["problems"])
    if name.startswith("index/"):
        assert report["damaged_index"] == [name.removeprefix("index/")] and report["damaged_chunks"] == []
        assert f"{name}: does not decode (samples (0, 8)" in problem
    else:
        assert report["damaged_chunks"] == [1]
        assert f"{name}: chunk 1 does not decode (samples (4, 8): s4 .. s7" in problem
    if how == "garbage":  # the command's report, once an array (how the chunk was damaged is the report's above)
        assert cli(["cache", "verify", url]) == 1
        out = capsys.readouterr().out
        assert "FAILED" in out and name in out and "`spaceclip extract` with the store's config extracts" in out


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A small real extraction (tiny-clip, chunks of 2, `views.flip=extract` so the mirrored arrays exist) and the
    bytes of its clean train and test stores."""
    tmp = tmp_path_factory.mktemp("damage")
    cfg = load_config(write_config(tmp, cache={"chunk_size": 2}, views={"flip": "extract"}))
    extract_splits(cfg, ("train", "test"))
    stores = {split: prepare_store(cfg, split)[0] for split in ("train", "test")}
    return cfg, stores, {split: store_files(s.url) for split, s in stores.items()}


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_extraction_rewrites_exactly_the_damaged_chunks(extracted, monkeypatch):
    cfg, stores, clean = extracted
    train = stores["train"]
    last = train.n_chunks - 1
    assert last >= 3
    damage = {"tokens/L0": 1, "flipped/cls": 2, "depth": last, "done": 0, "skip_reason": last}
    for name, c in damage.items():
        path = train.chunk_path(name, c)
        path.write_bytes(path.read_bytes()[:7])
    train.chunk_path("index/focal", 0).write_bytes(b"\x00" * 5)
    train.chunk_path("cls", 2).unlink()
    assert FeatureStore.open(train.url).verify()["damaged_chunks"] == [0, 1, 2, last]

    extracted_chunks = []
    inner = FeatureStore.write_chunk

    def counted(self, c, *args, **kwargs):
        extracted_chunks.append((Path(self.url).name.split("-")[0], c))
        return inner(self, c, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", counted)
    extract_splits(cfg, ("train", "test"))
    assert sorted(extracted_chunks) == [("train", c) for c in (0, 1, 2, last)]  # nothing else, no test chunk
    for split, store in stores.items():
        repaired = FeatureStore.open(store.url)
        assert repaired.complete and repaired.verify()["ok"]
        assert store_files(store.url) == clean[split]


def test_a_damaged_checkpoint_or_training_state_is_refused_by_path(tmp_path, capsys):
    from pipeline.train import load_state, save_state
    from spaceclip.decoder import SpaceClipDecoder

    folder = tmp_path / "best"
    SpaceClipDecoder("baseline", width=32, channels=(16, 8, 8, 8)).save_pretrained(folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    for damaged in (good[: len(good) // 2], b"\x00" * 16, good[:7]):
        weights.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"{weights}: damaged checkpoint"):
            SpaceClipDecoder.from_pretrained(folder)
    from flows.cli import main as cli

    image = tmp_path / "frame.png"
    from PIL import Image

    Image.new("RGB", (32, 24)).save(image)
    assert cli(["predict", str(image), "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {weights}: damaged checkpoint" in capsys.readouterr().err
    state = tmp_path / "train_state.pt"
    save_state(state, {"epoch": 1, "model": {"w": torch.zeros(1000)}})
    state.write_bytes(state.read_bytes()[:300])
    with pytest.raises(RunError, match=f"{state} cannot be read, it is damaged"):
        load_state(state)


# ---- a full disk (simulated) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kept_write", [True, False], ids=["features-by-O_DIRECT", "all-by-zarr"])
def test_a_full_disk_while_writing_chunks_keeps_nothing_half_written_and_resumes(tmp_path, monkeypatch, kept_write):
    """ENOSPC from the file system after a few chunk files (simulated: Zarr's own writer, and the store's O_DIRECT
    write of feature chunks, raise it after writing part of the file): one line naming the store and what to do;
    the chunk stays pending, no partial file stays; the next run finishes it and the bytes equal a run that never
    failed."""
    import zarr.storage._local as local

    import pipeline.store as store_module

    reference = FeatureStore.create(str(tmp_path / "ref.zarr"), _spec(n=20, cs=4, flipped=True), _index(20))
    _write_all(reference)
    store = FeatureStore.create(str(tmp_path / "s.zarr"), _spec(n=20, cs=4, flipped=True), _index(20))
    real_open, real_os_write, opened = Path.open, os.write, []

    def full_after_ten(self, mode="r", *args, **kwargs):
        if "w" in mode and self.name.endswith(".partial"):
            opened.append(self)
            if len(opened) > 10:
                f = real_open(self, mode, *args, **kwargs)
                f.write(b"half a chunk")
                f.close()
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    def short_after_ten(fd, data):  # a direct write that stops where the disk filled
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):
            opened.append(fd)
            if len(opened) > 10:
                return real_os_write(fd, memoryview(data)[:4096])
        return real_os_write(fd, data)

    monkeypatch.setattr(local.Path, "open", full_after_ten)
    if kept_write:
        monkeypatch.setattr(store_module.os, "write", short_after_ten)
    else:
        monkeypatch.setattr(FeatureStore, "_put_raw", lambda *a: False)
    with pytest.raises(DiskFullError) as err:
        _write_all(store)
    message = str(err.value)
    assert "disk full while writing chunk 1 in" in message and store.url in message and "\n" not in message
    assert "run the same command again" in message
    monkeypatch.undo()
    assert store.pending_chunks() == [1, 2, 3, 4] and not list(Path(store.url).rglob("*.partial"))
    assert FeatureStore.open(store.url).verify()["problems"] == []  # what is done is sound
    _write_all(store)
    assert store_files(store.url) == store_files(reference.url)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
    target = tmp_path / "last"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"epoch 1")
    with pytest.raises(DiskFullError) as err:
        with replaced_atomically(target) as tmp:
            tmp.mkdir()
            (tmp / "model.safetensors").write_bytes(b"half of epoch 2")
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert f"disk full while writing {target}" in str(err.value) and "resumes" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # the half-written copy is gone
    assert (target / "model.safetensors").read_bytes() == b"epoch 1"


# ---- a full disk (a real one: a small tmpfs) ---------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk, resized with `resize(bytes)`; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    import shutil

    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the simulated-ENOSPC tests above cover the logic)")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={max(size, 4096)}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _tree_bytes(folder: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file()) + 4096 * sum(
        1 for p in folder.rglob("*") if p.is_dir())


@pytest.mark.slow
def test_extraction_on_a_full_tmpfs_fails_in_one_line_and_resumes(tmp_path, small_disk, prefect_harness):
    mount, resize = small_disk
    cfg_path = write_config(tmp_path, cache={"chunk_size": 2})
    cfg = load_config(cfg_path)
    synth.ensure(cfg.data)
    clean = cfg.model_copy(deep=True)
    clean.cache.root = str(tmp_path / "clean")
    extract_splits(clean, ("train",))
    clean_store = prepare_store(clean, "train")[0]
    need = _tree_bytes(Path(clean_store.url))
    resize(need // 2)  # room for about half the store

    cfg_path.write_text(cfg_path.read_text().replace(str(tmp_path / "cache"), str(mount / "cache")))
    # the session's Prefect server, not a temporary one per command (its database is not on the full disk)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", PREFECT_API_URL=prefect_harness)
    cmd = [sys.executable, "-m", "flows.cli", "extract", "--config", str(cfg_path), "--splits", "train"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 2 and "error: not enough disk space" in result.stderr, result.stderr[-3000:]
    assert not [p for p in mount.rglob("*") if p.is_file()]  # refused before writing (issue 27)
    cmd.append("--ignore-disk-space")  # goes on: the real ENOSPC
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "disk full while" in errors[0] and str(mount / "cache") in errors[0]
    assert "run the same command again" in errors[0]
    (url,) = [str(p) for p in (mount / "cache" / "kitti").glob("train-*.zarr")]
    partial = FeatureStore.open(url)
    assert not partial.complete and 0 < len(partial.pending_chunks())
    assert partial.verify()["problems"] == [] and not list(Path(url).rglob("*.partial"))

    resize(4 * need)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert FeatureStore.open(url).complete and store_files(url) == store_files(clean_store.url)


@pytest.mark.slow
def test_training_on_a_full_tmpfs_fails_in_one_line_and_resumes(fast_cfg, tmp_path, small_disk):
    from pipeline.config import config_from_dict, dump_config
    from pipeline.train import train_variant

    mount, resize = small_disk
    clean_cfg = config_from_dict(dump_config(fast_cfg), overrides=[f"train.out_dir={tmp_path / 'clean'}",
                                                                    "train.epochs=2"])
    one = config_from_dict(dump_config(clean_cfg), overrides=["train.epochs=1", f"train.out_dir={tmp_path / 'one'}"])
    train_variant(one, "baseline")
    epoch_bytes = _tree_bytes(tmp_path / "one")
    train_variant(clean_cfg, "baseline")

    cfg = config_from_dict(dump_config(clean_cfg), overrides=[f"train.out_dir={mount / 'runs'}"])
    state_bytes = (tmp_path / "one" / clean_cfg.sweep / "baseline" / "train_state.pt").stat().st_size
    resize(epoch_bytes + 65536 + state_bytes // 2)  # epoch 1 fits; epoch 2's new state beside the old one does not
    with pytest.raises(DiskFullError) as err:
        train_variant(cfg, "baseline")
    message = str(err.value)
    assert "disk full while writing" in message and str(mount / "runs") in message and "\n" not in message
    run = mount / "runs" / cfg.sweep / "baseline"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # nothing half-written beside the files
    from pipeline.train import load_state

    assert load_state(run / "train_state.pt")["epoch"] == 1  # the last complete epoch
    resize(epoch_bytes * 6)
    result = train_variant(cfg, "baseline")
    assert result.epochs_done == 2
    clean_run = tmp_path / "clean" / cfg.sweep / "baseline"
    for name in ("last/model.safetensors", "best/model.safetensors"):
        assert (run / name).read_bytes() == (clean_run / name).read_bytes(), name


def test_claims_stay_outside_the_zarr_hierarchy(tmp_path):
    """While a chunk is claimed, Zarr sees nothing new in the store: no member, no warning, no extra file."""
    store = FeatureStore.create(str(tmp_path / "s.zarr"), _spec(), _index())
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "s.zarr").rglob("*"))
    with store.claim_chunk(2) as claim:
        assert claim.acquired and claim.path.parent == tmp_path / ".s.zarr.claims"
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "s.zarr").rglob("*")) == before
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            members = sorted(name for name, _ in zarr.open_group(store.url, mode="r").members(max_depth=None))
        assert ".s.zarr.claims" not in members and all("claims" not in m for m in members)
    store.release_claims()
    assert not (tmp_path / ".s.zarr.claims").exists()
