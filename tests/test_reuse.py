"""Reusing a store (issue 27, item 4): the check of a complete store reads a small part of it, the full decode is
an option; the files the store was extracted from are compared with those there now, and what changed is said and
extracted again."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import datasets, synth
from pipeline.config import config_from_dict, dump_config, load_config
from pipeline.extract import extract_splits, prepare_store
from pipeline.layout import RunContext
from pipeline.loader import CachedBatches
from pipeline.store import FeatureStore, StoreError
from tests.conftest import store_files, write_config


def read_bytes() -> int:
    """Bytes this process has read through read()-like calls so far (page cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def data_bytes(url: str) -> int:
    return sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A complete train store of every tiny-clip layer, two views a frame (~6 MB), and its config's run context."""
    tmp = tmp_path_factory.mktemp("reuse")
    cfg = load_config(write_config(tmp, cache={"chunk_size": 2, "layers": list(range(13))},
                                   views={"views_per_image": 2}))
    extract_splits(cfg, ("train",))
    ctx = RunContext.of(cfg)
    return ctx, FeatureStore.open(ctx.store_url("train"))


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts the bytes read in /proc/self/io")
def test_reusing_a_complete_store_reads_a_small_fraction_of_it(complete):
    ctx, store = complete
    size = data_bytes(store.url)
    assert size > 5_000_000
    before = read_bytes()
    reused, was_reused = prepare_store(ctx, "train")
    quick = read_bytes() - before
    assert was_reused and reused.complete and reused.pending_chunks() == []
    assert reused.verified == set(range(reused.n_chunks))  # nothing to decode again when it is finalized
    assert quick < 0.05 * size, (quick, size)
    before = read_bytes()
    extract_splits(ctx.cfg, ("train",))  # the whole second extraction: room check, reuse, finalize
    second = read_bytes() - before
    assert second < 0.05 * size, (second, size)

    full_ctx = RunContext(config_from_dict(dump_config(ctx.cfg), overrides=["cache.verify=full"]),
                          ctx.encoder_identity)
    before = read_bytes()
    prepare_store(full_ctx, "train")
    full = read_bytes() - before
    assert full > 0.9 * size  # what every reuse read before (the measured 485 MB of a 258 MB cache)
    print(f"reuse of a complete {size} B store read {quick} B quick ({second} B the whole second extraction), "
          f"{full} B full")


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_changed_byte_is_left_to_the_readers_and_found_and_repaired_by_the_full_check(tmp_path):
    """The quick check looks at file sizes: a changed byte passes it, then the first reader fails on the chunk's
    CRC naming the file and the way to repair; `cache.verify=full` (--verify-cache) finds and rewrites the chunk,
    after which the store's bytes are a clean run's."""
    cfg = load_config(write_config(tmp_path, cache={"chunk_size": 2}))
    extract_splits(cfg, ("train",))
    url = RunContext.of(cfg).store_url("train")
    clean = store_files(url)
    path = FeatureStore.open(url).chunk_path("tokens/L2", 1)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))

    store, _ = prepare_store(cfg, "train")
    assert store.pending_chunks() == [] and store.complete
    with pytest.raises(StoreError, match="chunk 1 of tokens/L2 does not decode .*--verify-cache"):
        list(CachedBatches(store, [2], batch_size=4, train=False, cache_device="stream").epoch(0))

    full = config_from_dict(dump_config(cfg), overrides=["cache.verify=full"])
    store, _ = prepare_store(full, "train")
    assert store.pending_chunks() == [1] and not store.complete
    extract_splits(full, ("train",))
    assert store_files(url) == clean


def _setup_skip(tmp_path):
    cfg = load_config(write_config(tmp_path, data={"on_error": "skip"}, cache={"chunk_size": 2}))
    synth.ensure(cfg.data)
    return cfg


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_skipped_samples_file_that_arrives_is_extracted_and_nothing_else_is_touched(tmp_path, caplog):
    """on_error=skip with a depth map missing: the sample is stored as skipped. The file arrives; the next run says
    so, extracts that sample's chunk again (it is no longer skipped, its features those of a run that had the file
    from the start), and every other chunk keeps its bytes."""
    cfg = _setup_skip(tmp_path)
    samples = datasets.read_split(cfg.data, "train")
    missing = samples[3].depth_path
    aside = missing.with_name(missing.name + ".aside")
    os.rename(missing, aside)
    extract_splits(cfg, ("train",))
    url = RunContext.of(cfg).store_url("train")
    store = FeatureStore.open(url)
    index = store.index()
    row = int(np.flatnonzero(index["id"] == samples[3].id)[0])
    assert index["skipped"].tolist() == [i == row for i in range(store.n)]
    before = store_files(url)

    os.rename(aside, missing)  # arrives (its old modification time kept: a restored download)
    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        extract_splits(cfg, ("train",))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"1 of its {store.n} samples' files changed" in said and f"{missing}: now there" in said
    store = FeatureStore.open(url)
    assert store.complete and not store.index()["skipped"].any()
    after = store_files(url)
    chunk = row // store.chunk_size
    differ = {k for k in before if before[k] != after[k]}
    assert differ and all(f"/c/{chunk}" in k or k.startswith(("skip", "sources/")) for k in differ), differ

    reference = config_from_dict(dump_config(cfg), overrides=[f"cache.root={tmp_path / 'reference'}"])
    extract_splits(reference, ("train",))
    ref = FeatureStore.open(RunContext.of(reference).store_url("train"))
    for k in store.layers:
        got = store.read(slice(row, row + 1), layers=[k])["tokens"][k]
        want = ref.read(slice(row, row + 1), layers=[k])["tokens"][k]
        assert np.array_equal(got.numpy(), want.numpy())

    # once extracted, a further run changes nothing
    extract_splits(cfg, ("train",))
    assert store_files(url) == after


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_changed_file_is_said_and_its_chunk_extracted_again(tmp_path, caplog):
    cfg = _setup_skip(tmp_path)
    extract_splits(cfg, ("train",))
    url = RunContext.of(cfg).store_url("train")
    before = store_files(url)
    sample = datasets.read_split(cfg.data, "train")[0]
    st = sample.image_path.stat()
    os.utime(sample.image_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-download, same bytes
    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        store, _ = prepare_store(cfg, "train")
    assert store.pending_chunks() == [0] and not store.complete
    assert f"{sample.image_path}: modified (same size" in caplog.text
    extract_splits(cfg, ("train",))
    assert store_files(url) == {**before, **{k: v for k, v in store_files(url).items() if k.startswith("sources/")}}


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_another_data_root_is_refused_naming_it_or_kept_on_request(tmp_path, caplog):
    cfg = _setup_skip(tmp_path)
    extract_splits(cfg, ("train",))
    copy = tmp_path / "gt-copy"
    shutil.copytree(cfg.data.depth_root, copy)
    moved = config_from_dict(dump_config(cfg), overrides=[f"data.depth_root={copy}"])
    with pytest.raises(StoreError) as err:
        prepare_store(moved, "train")
    message = str(err.value)
    assert f"data.depth_root was {os.path.abspath(cfg.data.depth_root)} and is now {copy}" in message
    assert "cache.on_data_change=keep" in message and "delete" in message

    kept = config_from_dict(dump_config(moved), overrides=["cache.on_data_change=keep"])
    with caplog.at_level(logging.WARNING, logger="pipeline.extract"):
        store, reused = prepare_store(kept, "train")
    assert reused and store.complete and "cache.on_data_change is keep" in caplog.text


def test_a_store_from_before_the_signatures_is_reused_and_gets_them(complete):
    """A store written before `sources/` existed (they and `data_roots` removed here) is reused as it is, nothing
    extracted again, and records its files then."""
    ctx, store = complete
    recorded = store.sources()
    shutil.rmtree(Path(store.url) / "sources")
    group = FeatureStore.open(store.url, mode="r+").group
    del group.attrs["data_roots"]
    old = FeatureStore.open(store.url)
    assert old.sources() is None and "data_roots" not in old.attrs
    reused, _ = prepare_store(ctx, "train")
    assert reused.complete and reused.pending_chunks() == []
    again = FeatureStore.open(store.url)
    assert all(np.array_equal(again.sources()[k], recorded[k]) for k in recorded)
    assert again.attrs["data_roots"] == store.attrs["data_roots"]
