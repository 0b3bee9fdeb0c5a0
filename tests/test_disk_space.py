"""Room on the disk (issue 27, item 2): every store's bytes estimated from its spec before extraction starts,
printed, and a refusal that writes nothing when the file system of cache.root lacks the room."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from flows.cli import main as cli
from pipeline import synth
from pipeline.config import config_from_dict, dump_config, load_config
from pipeline.diskspace import BLOCK, DiskSpaceError, estimate_bytes, space_needed
from pipeline.extract import extract_chunks, extract_splits, prepare_store
from pipeline.layout import RunContext
from pipeline.store import FeatureStore
from tests.conftest import write_config

Usage = namedtuple("Usage", "total used free")


def allocated(folder: Path) -> int:
    """Bytes a folder takes on its file system: the blocks of every file and folder in it, itself included."""
    return sum(os.lstat(p).st_blocks * 512 for p in [folder, *folder.rglob("*")])


def apparent(folder: Path, prefixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.name != "zarr.json" and str(p.relative_to(folder)).startswith(prefixes))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("space")
    cfg = load_config(write_config(tmp, cache={"chunk_size": 4, "layers": [0, 2, 12], "target_size": [22, 44]},
                                   views={"views_per_image": 2}))
    synth.ensure(cfg.data)
    return cfg


@pytest.mark.slow
def test_the_estimate_bounds_the_bytes_on_disk_and_the_features_are_exact(cfg):
    """The estimate made before extraction against what lands on disk: the uncompressed features to the byte (file
    sizes), the whole store (file-system blocks of every file and folder) between `low` and `high`, which differ
    only by how the compressed arrays (targets, flags, index) compress."""
    need, plans = space_needed(cfg, ("train", "test"))
    assert set(plans) == {"train", "test"} and need.free is not None and need.fits
    extract_splits(cfg, ("train", "test"))
    ctx = RunContext.of(cfg)
    for split in ("train", "test"):
        est, what = need.splits[split]
        store = FeatureStore.open(ctx.store_url(split))
        assert what.startswith(f"new: {store.n} samples")
        folder = Path(store.url)
        g, c = int(store.attrs["grid"]), int(store.attrs["width"])
        raw = store.n_chunks * (3 * (store.chunk_size * g * g * c * 2 + 4) + store.chunk_size * c * 2 + 4)
        assert apparent(folder, ("tokens/", "cls/")) == raw  # every chunk file a whole chunk + its CRC
        on_disk = allocated(folder)
        assert est.low <= on_disk <= est.high, (split, est.low, on_disk, est.high, est.parts)
        lo, hi = est.parts["features"]
        assert lo == hi  # uncompressed: exact, folders included
        assert hi >= 0.7 * est.high  # the features are the bulk: the bounds are close
        assert est.high <= 1.25 * on_disk and est.low >= 0.75 * on_disk
        print(f"{split}: estimated {est.low} to {est.high} B, on disk {on_disk} B")
    # a complete store needs nothing more
    again, plans = space_needed(cfg, ("train", "test"))
    assert again.total.high == 0 and plans == {}
    assert [line.split(":")[0] for line in again.lines()] == ["cache train", "cache test", "cache total"]


def elsewhere(cfg, tmp_path, *overrides):
    """The module's config (its rendered dataset) with a cache root of this test's own."""
    return config_from_dict(dump_config(cfg), overrides=[f"cache.root={tmp_path / 'cache'}", *overrides])


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_partial_store_counts_only_its_pending_chunks(cfg, tmp_path):
    cfg = elsewhere(cfg, tmp_path, "cache.chunk_size=2", "cache.layers=[0,12]")
    store, _ = prepare_store(cfg, "train")
    extract_chunks(cfg, store.url, [0])
    need, plans = space_needed(cfg, ("train",))
    est, what = need.splits["train"]
    assert plans == {} and what == f"{store.n_chunks - 1} of {store.n_chunks} chunks to go"
    whole = estimate_bytes(store.spec(), chunks=store.n_chunks)
    one = estimate_bytes(store.spec(), chunks=1)
    assert est.high == whole.high - one.high and est.low == whole.low - one.low
    g, c = int(store.attrs["grid"]), int(store.attrs["width"])
    blocks = lambda n: -(-n // BLOCK) * BLOCK  # noqa: E731
    per_chunk = 2 * (blocks(2 * g * g * c * 2 + 4) + 3 * BLOCK) + blocks(2 * c * 2 + 4) + BLOCK  # 2 layers + cls
    assert est.parts["features"] == ((store.n_chunks - 1) * per_chunk,) * 2


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_no_room_is_refused_before_anything_is_written_with_the_numbers_and_the_knobs(cfg, tmp_path, monkeypatch):
    """Free space a hundredth of what the stores need (monkeypatched): refused with one message naming the bytes,
    the free space and the knobs; the cache root holds nothing (today's code wrote chunk files until ENOSPC)."""
    cfg = elsewhere(cfg, tmp_path, "cache.chunk_size=2")
    need, _ = space_needed(cfg)
    asked = []

    def usage(path):
        asked.append(Path(path))
        return Usage(10**12, 10**12, need.total.low // 100)

    import pipeline.diskspace

    monkeypatch.setattr(pipeline.diskspace.shutil, "disk_usage", usage)
    with pytest.raises(DiskSpaceError) as err:
        extract_splits(cfg)
    message = str(err.value)
    for knob in ("cache.root", "views.views_per_image (now 2)", "cache.layers (now [", "cache.dtype (float16)",
                 "--ignore-disk-space", "cache.check_space=false"):
        assert knob in message, knob
    assert "\n" not in message and f"{need.total.low // 100 / 1e6:.2f} MB free" in message
    assert str(asked[0]) in message and asked[0].exists()  # the nearest existing folder above cache.root
    assert "train" in message and "test" in message
    root = Path(cfg.cache.root)
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()]  # not one file written

    # the flag goes on anyway
    cfg.cache.check_space = False
    extract_splits(cfg)
    assert all(FeatureStore.open(RunContext.of(cfg).store_url(s)).complete for s in ("train", "val", "test"))


def test_the_flags_are_config_overrides(monkeypatch):
    """`--ignore-disk-space` / `--verify-cache` reach the flow as the `--set`s they stand for, after the `--set`s."""
    import contextlib
    import sys
    from types import SimpleNamespace

    import flows.cli

    calls = []
    monkeypatch.setattr(flows.cli, "prefect_api", contextlib.nullcontext)
    monkeypatch.setattr(flows.cli, "print_results", lambda paths: None)
    # The flows as stand-ins that record what the command passes (no Prefect import, no run).
    record = lambda **kw: calls.append(kw) or {}  # noqa: E731
    monkeypatch.setitem(sys.modules, "flows.extract", SimpleNamespace(extract_features=record))
    monkeypatch.setitem(sys.modules, "flows.paper_table", SimpleNamespace(paper_table=record))
    assert cli(["extract", "--ignore-disk-space", "--verify-cache", "--set", "train.epochs=3"]) == 0
    assert calls[-1]["overrides"] == ["train.epochs=3", "cache.check_space=false", "cache.verify=full"]
    assert cli(["run", "--verify-cache"]) == 0
    assert calls[-1]["overrides"] == ["cache.verify=full"] and calls[-1]["config"] == "demo"
    cfg = load_config("demo", ["cache.check_space=false", "cache.verify=full"])
    assert cfg.cache.check_space is False and cfg.cache.verify == "full"


def test_data_check_prints_the_estimate_and_fails_when_it_cannot_fit(cfg, tmp_path, capsys, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dump_config(elsewhere(cfg, tmp_path, f"cache.root={tmp_path / 'other-cache'}"))))
    assert cli(["data", "check", "--config", str(path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "cache train:" in out and "to write (new:" in out and "free on" in out, out

    import pipeline.diskspace

    monkeypatch.setattr(pipeline.diskspace.shutil, "disk_usage", lambda p: Usage(1, 1, 4096))
    assert cli(["data", "check", "--config", str(path), "--quick"]) == 1
    out = capsys.readouterr().out
    assert "not enough disk space for the feature cache" in out and "0.00 MB free" in out
    assert not (tmp_path / "other-cache").exists()
