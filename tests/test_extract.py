"""Extraction into the feature store: values, fingerprints, bad input, and kill-and-resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import datasets, synth
from pipeline.config import load_config
from pipeline.datasets import DatasetError
from pipeline.extract import extract_chunks, plan_split, prepare_store
from pipeline.layout import RunContext, encoder_for, finalize_store
from pipeline.store import FeatureStore, StoreError
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parent.parent


def extract_all(cfg, split):
    store, reused = prepare_store(cfg, split)
    for c in store.pending_chunks():
        extract_chunks(cfg, store.url, [c])
    finalize_store(store.url)
    return FeatureStore.open(store.url), reused


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    cfg = load_config(write_config(tmp))
    synth.ensure(cfg.data)
    return cfg


def test_stored_features_equal_a_direct_encoder_forward(small):
    store, _ = extract_all(small, "train")
    encoder = encoder_for(small)
    rows = store.index()
    view = datasets.View(*[int(rows.iloc[5][f"view_{p}"]) for p in ("k", "top", "left", "h", "w")])
    sample = next(s for s in datasets.read_split(small.data, "train") if s.id == rows.iloc[5].id)
    image = datasets.apply_view(datasets.load_image(sample), view)
    ref = encoder(encoder.preprocess(image), [0, 2, 12])
    got = store.read([5])
    for k in (0, 2, 12):
        torch.testing.assert_close(got["tokens"][k].float(), ref["tokens"][k], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got["global"].float(), ref["global"], atol=2e-3, rtol=2e-3)
    # the target is the same view of the GT, at the view's own size (no target_size set)
    gt = datasets.apply_view(datasets.load_depth(sample, "kitti"), view)
    assert got["depth"].shape == (1, 176, 352)
    assert np.abs(got["depth"][0].numpy() - gt).max() <= 0.5 / 256 + 1e-6
    assert (rows.view_h == 176).all() and (rows.view_w == 352).all()


def test_test_split_counts_and_full_frames(small):
    store, _ = extract_all(small, "test")
    rows = store.index()
    samples = datasets.read_split(small.data, "test")
    assert store.n == len(samples) and not store.has_depth
    # full-frame views of the native size; GT-less lines are kept (evaluation counts and skips them)
    assert ((rows.view_top == 0) & (rows.view_h == rows.orig_h) & (rows.view_w == rows.orig_w)).all()
    assert (rows.depth_path == "").sum() == sum(s.depth_path is None for s in samples)


def test_same_config_reuses_and_changed_config_makes_a_new_store(small, tmp_path):
    first, _ = extract_all(small, "val")
    again, reused = prepare_store(small, "val")
    assert reused and again.url == first.url and again.complete
    changed = small.model_copy(deep=True)
    changed.cache.layers = (0, 12)
    other, reused = prepare_store(changed, "val")
    assert not reused and other.url != first.url
    with pytest.raises(StoreError) as err:
        RunContext.of(changed).open_store("val")  # exists but unfinished
    assert "incomplete" in str(err.value)
    changed.views.seed = 7  # a store that does not exist: the message says what differs from the ones that do
    with pytest.raises(StoreError) as err:
        RunContext.of(changed).open_store("val")
    assert "views.seed: config has 7, store has 42" in str(err.value)


@pytest.mark.slow
def test_missing_and_corrupt_files_are_named(tmp_path):
    cfg = load_config(write_config(tmp_path))
    synth.ensure(cfg.data)
    samples = datasets.read_split(cfg.data, "train")
    image_bytes = samples[2].image_path.read_bytes()
    samples[2].image_path.unlink()
    with pytest.raises(DatasetError) as err:
        prepare_store(cfg, "train")
    assert str(samples[2].image_path) in str(err.value) and f"line {samples[2].line}" in str(err.value)
    # on_error: skip records the planning-time skip in the store's attrs and goes on
    cfg.data.on_error = "skip"
    store, _ = extract_all(cfg, "train")
    assert [s["id"] for s in store.attrs["skipped_at_planning"]] == [samples[2].id]
    # a depth PNG that is corrupt only shows when decoded: the chunk records it per sample
    samples[2].image_path.write_bytes(image_bytes)
    cfg.data.on_error = "raise"
    samples[4].depth_path.write_bytes(b"garbage")
    cfg.cache.chunk_size = 3  # new fingerprint -> new store
    with pytest.raises(DatasetError, match=f"line {samples[4].line}"):
        extract_all(cfg, "train")
    cfg.data.on_error = "skip"
    cfg.cache.chunk_size = 5
    store, _ = extract_all(cfg, "train")
    rows = store.index()
    assert rows.skipped.sum() == 1
    bad = rows[rows.skipped].iloc[0]
    assert bad.id == samples[4].id and str(samples[4].depth_path) in bad.skip_reason


def _chunk_files(url):
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
@pytest.mark.parametrize("flip", ["features", "extract"])
def test_one_pipeline_over_many_chunks_writes_what_chunk_by_chunk_writes(tmp_path, flip):
    """`extract_chunks` gathers the chunks of one call in two sets of buffers used in turn (`_ChunkEncoder`). The
    store it writes is byte-identical, file by file, to one written a chunk per call (fresh buffers each), and a
    sample skipped in a chunk whose buffers held an earlier chunk's features is all zeros."""
    cfg = load_config(write_config(tmp_path, data={"on_error": "skip"}, views={"flip": flip},
                                   cache={"chunk_size": 2}))
    synth.ensure(cfg.data)
    plan = plan_split(cfg, "train")
    bad = 7  # in chunk 3, whose buffers held chunk 1's rows
    Path(plan.index["depth_path"][bad]).write_bytes(b"garbage")  # readable header, fails only when decoded
    urls = []
    for run in ("one-pipeline", "chunk-by-chunk"):
        cfg.cache.root = str(tmp_path / run)
        store, _ = prepare_store(cfg, "train")
        if run == "one-pipeline":
            extract_chunks(cfg, store.url, store.pending_chunks())
        else:
            for c in store.pending_chunks():
                extract_chunks(cfg, store.url, [c])
        urls.append(store.url)
    assert store.n_chunks >= 5
    assert _chunk_files(urls[0]) == _chunk_files(urls[1])
    store = FeatureStore.open(urls[0])
    assert store.index().skipped.tolist() == [i == bad for i in range(store.n)]
    got = store.read([bad - 4, bad], flipped=store.has_flipped)
    assert store.has_flipped == (flip == "extract")
    for name in ("tokens", "global", "depth", *(("flipped_tokens", "flipped_global") if store.has_flipped else ())):
        values = got[name].values() if isinstance(got[name], dict) else [got[name]]
        for t in values:
            assert (t[1] == 0).all() and (t[0] != 0).any()  # the skipped sample; the same slot two chunks before


@pytest.mark.slow
def test_sigkill_mid_extraction_then_resume_is_byte_identical(tmp_path, prefect_harness):
    """A real `spaceclip extract` process is SIGKILLed after some chunks are done; a second run finishes only the
    missing chunks and the store ends byte-identical, chunk file by chunk file, to an uninterrupted one. (Both runs
    report to the session's Prefect server; `test_two_spaceclip_extract_commands_at_once` covers the temporary
    server a bare command starts.)"""
    cfg_path = write_config(tmp_path, cache={"chunk_size": 2})
    cfg = load_config(cfg_path)
    synth.ensure(cfg.data)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=prefect_harness)
    cmd = [sys.executable, "-m", "flows.cli", "extract", "--config", str(cfg_path), "--splits", "train"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store, _ = prepare_store(cfg, "train")  # same fingerprint -> the url the subprocess writes to
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = FeatureStore.open(store.url).done_flags() if Path(store.url, "done").exists() else np.zeros(1)
            if done.sum() >= 2:
                break
            assert proc.poll() is None, "extraction finished before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = FeatureStore.open(store.url)
    pending = killed.pending_chunks()
    assert 0 < len(pending) < killed.n_chunks, "the kill should land mid-run"
    assert not killed.complete

    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    resumed = FeatureStore.open(store.url)
    assert resumed.complete and resumed.verify()["ok"]

    fresh_cfg = cfg.model_copy(deep=True)
    fresh_cfg.cache.root = str(tmp_path / "fresh")
    fresh, _ = extract_all(fresh_cfg, "train")
    a, b = _chunk_files(resumed.url), _chunk_files(fresh.url)
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if a[k] != b[k]] == []


def test_the_flow_hands_each_worker_runs_of_chunks():
    """Tasks of several chunks (so a worker overlaps one chunk's write with the next one's decode), never across
    stores, a few per worker (tests/test_devices.py has their sizes)."""
    from pipeline.devices import chunk_jobs

    pending = [("train", "a", c) for c in range(10)] + [("val", "b", 0), ("val", "b", 3)]
    jobs = chunk_jobs(pending, n_workers=1)
    assert [s[2] for s in jobs] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0], [3]]
    assert [s[:2] for s in jobs] == [("train", "a")] * 2 + [("val", "b")] * 2
    assert [len(s[2]) for s in chunk_jobs(pending, n_workers=2)] == [3, 3, 3, 1, 1, 1]
    assert [len(s[2]) for s in chunk_jobs(pending[:3], n_workers=8)] == [1, 1, 1]
    assert sorted((u, c) for _, u, cs in chunk_jobs(pending, 5) for c in cs) == sorted((u, c) for _, u, c in pending)
