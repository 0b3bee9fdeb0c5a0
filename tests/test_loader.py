"""The cached-batch loader: chunk-aligned shuffling, feature-space flips, cache residency, prefetch."""

import threading

import numpy as np
import pytest
import torch
import zarr

from pipeline.loader import CachedBatches, _prefetched, epoch_plan
from pipeline.memory import resolve_cache_device, store_bytes
from pipeline.store import FeatureStore, StoreError, StoreSpec

N, CS, G, C, HW = 23, 4, 14, 8, (6, 10)
LAYERS = (0, 2, 3, 12)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small store written through the store API: random tokens, distinct targets, sample 5 skipped."""
    url = str(tmp_path_factory.mktemp("loader") / "train.zarr")
    index = {
        "id": np.array([f"s{i}" for i in range(N)]), "image_path": np.array([""] * N), "depth_path": np.array([""] * N),
        "focal": np.ones(N), "orig_hw": np.ones((N, 2), np.int32), "view": np.zeros((N, 5), np.int32),
        "group": np.array(["g"] * N), "line": np.arange(N, dtype=np.int32),
    }
    spec = StoreSpec(n=N, layers=LAYERS, grid=G, width=C, chunk_size=CS, target_hw=HW, depth_scale=256.0)
    st = FeatureStore.create(url, spec, index)
    gen = torch.Generator().manual_seed(0)
    for c in range(st.n_chunks):
        a, b = st.chunk_range(c)
        tokens = {k: torch.randn(b - a, G, G, C, generator=gen) for k in LAYERS}
        depth = np.random.default_rng(c).uniform(1, 80, (b - a, *HW)).astype(np.float32)
        skipped = np.array([a + i == 5 for i in range(b - a)])
        st.write_chunk(c, tokens, torch.randn(b - a, C, generator=gen), depth, skipped, [""] * (b - a))
    st.mark_complete()
    return FeatureStore.open(url)


def collect(loader, epoch=0):
    return list(loader.epoch(epoch))


def test_epoch_plan_is_chunk_aligned_seeded_and_complete():
    usable = np.ones(N, bool)
    usable[5] = False
    plan = epoch_plan(N, CS, 3, seed=7, shuffle=True, shuffle_window=2, flip_p=0.5, usable=usable)
    assert sorted(plan.order.tolist()) == [i for i in range(N) if i != 5]  # every usable sample exactly once
    # Each window's samples come from exactly its chunks, and windows are visited in order.
    start = 0
    for win in plan.windows:
        members = {p for c in win for p in range(c * CS, min((c + 1) * CS, N)) if p != 5}
        assert set(plan.order[start:start + len(members)].tolist()) == members
        start += len(members)
    again = epoch_plan(N, CS, 3, seed=7, shuffle=True, shuffle_window=2, flip_p=0.5, usable=usable)
    assert np.array_equal(plan.order, again.order) and np.array_equal(plan.flips, again.flips)
    other = epoch_plan(N, CS, 4, seed=7, shuffle=True, shuffle_window=2, flip_p=0.5, usable=usable)
    assert not np.array_equal(plan.order, other.order)
    assert 0 < plan.flips.sum() < len(plan.flips)


@pytest.mark.parametrize("mode", ["stream", "cpu"])
def test_flipped_batch_equals_hand_flipped_stored_arrays(store, mode):
    loader = CachedBatches(store, (2, 12), batch_size=5, flip_p=0.5, seed=1, shuffle_window=2, cache_device=mode)
    assert loader.mode == mode
    group = zarr.open_group(store.url, mode="r")
    scale = group["depth"].attrs["scale"]
    seen, flipped = [], 0
    for batch in collect(loader, epoch=2):
        assert set(batch.features["tokens"]) == {2, 12}  # only the layers asked for
        pos = batch.index
        for j, p in enumerate(pos):
            flip = bool(batch.flipped[j])
            flipped += flip
            for k in (2, 12):
                stored = group[f"tokens/L{k}"][p]  # (g, g, C) straight from zarr
                expected = stored[:, ::-1] if flip else stored  # width is axis 1 of one sample's grid
                np.testing.assert_array_equal(batch.features["tokens"][k][j].numpy(), expected)
            depth = group["depth"][p].astype(np.float32) / scale
            np.testing.assert_array_equal(batch.depth[j].numpy(), depth[:, ::-1] if flip else depth)
            np.testing.assert_array_equal(batch.features["global"][j].numpy(), group["cls"][p])  # never flipped
        seen += pos.tolist()
    assert sorted(seen) == [i for i in range(N) if i != 5]  # the skipped sample is left out
    assert 0 < flipped < len(seen)
    assert len(loader) == -(-(N - 1) // 5)


def test_stream_and_resident_give_identical_batches(store):
    kw = dict(batch_size=6, flip_p=0.5, seed=3, shuffle_window=3)
    a = collect(CachedBatches(store, LAYERS, cache_device="stream", **kw), 1)
    b = collect(CachedBatches(store, LAYERS, cache_device="cpu", **kw), 1)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.index, y.index)
        for k in LAYERS:
            assert torch.equal(x.features["tokens"][k], y.features["tokens"][k])
        assert torch.equal(x.depth, y.depth) and torch.equal(x.features["global"], y.features["global"])


def test_validation_order_is_store_order_without_flips(store):
    loader = CachedBatches(store, (0,), batch_size=4, train=False, flip_p=1.0, cache_device="stream")
    batches = collect(loader)
    assert np.concatenate([b.index for b in batches]).tolist() == [i for i in range(N) if i != 5]
    assert not any(b.flipped.any() for b in batches)


def test_flip_p_one_flips_every_sample(store):
    batch = collect(CachedBatches(store, (3,), batch_size=4, flip_p=1.0, cache_device="cpu"))[0]
    assert batch.flipped.all()
    ref = store.read(np.sort(batch.index), (3,))
    order = np.argsort(np.argsort(batch.index))
    torch.testing.assert_close(batch.features["tokens"][3], ref["tokens"][3][order].flip(2), rtol=0, atol=0)


def test_missing_layer_and_cache_device_choice(store):
    with pytest.raises(StoreError, match=r"missing \[1\]"):
        CachedBatches(store, (1, 2), batch_size=4)
    need = store_bytes(store, (2, 12))
    assert need == N * ((2 * G * G * C + C) * 2 + HW[0] * HW[1] * 4)
    cpu = torch.device("cpu")
    assert resolve_cache_device("auto", need, cpu, budget=need) == "cpu"
    assert resolve_cache_device("auto", need, cpu, budget=need - 1) == "stream"
    assert resolve_cache_device("stream", need, cpu) == "stream"
    with pytest.raises(ValueError, match="cuda"):
        resolve_cache_device("cuda", need, cpu)
    assert CachedBatches(store, (2,), batch_size=4, memory_budget=1).mode == "stream"


def test_prefetch_reraises_and_stops_early():
    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(_prefetched(failing(), 2))
    produced = []
    stopped = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            stopped.set()

    for item in _prefetched(endless(), 2):
        if item == 3:
            break
    assert stopped.wait(5) and len(produced) <= 3 + 2 + 1  # the producer was closed, at most `depth` ahead


def test_exact_flips_take_the_mirrored_images_features(tmp_path):
    """`views.flip = extract`: a flipped sample gets the stored features of its mirrored image (tokens and global
    vector), never a feature-space flip; its target is still mirrored."""
    n = 9
    index = {
        "id": np.array([f"s{i}" for i in range(n)]), "image_path": np.array([""] * n),
        "depth_path": np.array([""] * n), "focal": np.ones(n), "orig_hw": np.ones((n, 2), np.int32),
        "view": np.zeros((n, 5), np.int32), "group": np.array(["g"] * n), "line": np.arange(n, dtype=np.int32),
    }
    spec = StoreSpec(n=n, layers=(1, 3), grid=4, width=C, chunk_size=4, target_hw=HW, flipped=True)
    st = FeatureStore.create(str(tmp_path / "f.zarr"), spec, index)
    gen = torch.Generator().manual_seed(3)
    for c in range(st.n_chunks):
        a, b = st.chunk_range(c)
        plain = {k: torch.randn(b - a, 4, 4, C, generator=gen) for k in (1, 3)}
        mirrored = {k: torch.randn(b - a, 4, 4, C, generator=gen) for k in (1, 3)}
        depth = np.random.default_rng(c).uniform(1, 80, (b - a, *HW)).astype(np.float32)
        with pytest.raises(StoreError, match="mirrored"):
            st.write_chunk(c, plain, torch.randn(b - a, C), depth)
        st.write_chunk(c, plain, torch.randn(b - a, C, generator=gen), depth,
                       flipped=(mirrored, torch.randn(b - a, C, generator=gen)))
    st.mark_complete()
    st = FeatureStore.open(st.url)
    assert st.has_flipped and "flipped/tokens/L3" in st.data_arrays() and st.verify()["ok"]
    group = zarr.open_group(st.url, mode="r")
    for mode in ("stream", "cpu"):
        loader = CachedBatches(st, (1, 3), batch_size=4, flip_p=0.5, seed=0, cache_device=mode)
        assert loader.exact_flips
        n_flipped = 0
        for batch in loader.epoch(0):
            assert set(batch.features) == {"tokens", "global"}  # all the decoder receives
            for j, p in enumerate(batch.index):
                flip = bool(batch.flipped[j])
                n_flipped += flip
                src = "flipped/" if flip else ""
                for k in (1, 3):
                    np.testing.assert_array_equal(batch.features["tokens"][k][j].numpy(), group[f"{src}tokens/L{k}"][p])
                np.testing.assert_array_equal(batch.features["global"][j].numpy(), group[f"{src}cls"][p])
                depth = group["depth"][p].astype(np.float32) / group["depth"].attrs["scale"]
                np.testing.assert_array_equal(batch.depth[j].numpy(), depth[:, ::-1] if flip else depth)
        assert 0 < n_flipped < n
    # Validation never flips, so it never reads the mirrored copies.
    assert not CachedBatches(st, (1, 3), batch_size=4, train=False).exact_flips
    # Evaluation: chosen positions in split order, batches across chunk borders, each with the mirrored images'
    # features beside the plain ones (pixel flip TTA), unflipped.
    for mode in ("stream", "cpu"):
        chosen = np.array([0, 2, 3, 4, 7, 8])
        batches = collect(CachedBatches(st, (3,), batch_size=4, train=False, cache_device=mode, positions=chosen,
                                        mirrored=True))
        assert [b.index.tolist() for b in batches] == [[0, 2, 3, 4], [7, 8]]
        for batch in batches:
            assert not batch.flipped.any()
            for j, p in enumerate(batch.index):
                np.testing.assert_array_equal(batch.features["tokens"][3][j].numpy(), group["tokens/L3"][p])
                np.testing.assert_array_equal(batch.mirrored["tokens"][3][j].numpy(), group["flipped/tokens/L3"][p])
                np.testing.assert_array_equal(batch.mirrored["global"][j].numpy(), group["flipped/cls"][p])


@pytest.mark.parametrize("workers, ahead", [(1, 0), (3, 1), (4, 50)])
def test_streaming_pool_gives_the_resident_batches(store, workers, ahead):
    """Reads, decompression and batch assembly in a pool, any number of chunks ahead: the same batches, in the
    same order, as the resident cache."""
    kw = dict(batch_size=5, flip_p=0.5, seed=4, shuffle_window=2)
    streamed = CachedBatches(store, LAYERS, cache_device="stream", read_workers=workers, read_ahead=ahead, **kw)
    a, b = collect(streamed, 2), collect(CachedBatches(store, LAYERS, cache_device="cpu", **kw), 2)
    assert len(a) == len(b) == len(streamed)
    for x, y in zip(a, b):
        assert np.array_equal(x.index, y.index) and torch.equal(x.flipped, y.flipped)
        assert all(torch.equal(x.features["tokens"][k], y.features["tokens"][k]) for k in LAYERS)
        assert torch.equal(x.depth, y.depth) and torch.equal(x.features["global"], y.features["global"])


def test_streaming_stops_early_and_reraises_a_read_error(store, monkeypatch):
    loader = CachedBatches(store, (2,), batch_size=2, cache_device="stream", read_workers=2, read_ahead=2)
    it = loader.epoch(0)
    next(it)
    it.close()  # leaving early: the producer and its pool wind down (no hang)
    calls = []

    def broken(c, *args, **kwargs):
        calls.append(c)
        if len(calls) == 3:
            raise OSError("chunk file unreadable")
        return FeatureStore.read_chunk(store, c, *args, **kwargs)

    monkeypatch.setattr(store, "read_chunk", broken)
    with pytest.raises(OSError, match="chunk file unreadable"):
        collect(loader)


def small_store(path, compressor="none", dtype="float16"):
    """Another store of the module's shape, with a chosen feature codec and dtype."""
    index = {
        "id": np.array([f"s{i}" for i in range(N)]), "image_path": np.array([""] * N), "depth_path": np.array([""] * N),
        "focal": np.ones(N), "orig_hw": np.ones((N, 2), np.int32), "view": np.zeros((N, 5), np.int32),
        "group": np.array(["g"] * N), "line": np.arange(N, dtype=np.int32),
    }
    spec = StoreSpec(n=N, layers=LAYERS, grid=G, width=C, chunk_size=CS, target_hw=HW, compressor=compressor,
                     dtype=dtype)
    st = FeatureStore.create(str(path), spec, index)
    gen = torch.Generator().manual_seed(1)
    for c in range(st.n_chunks):
        a, b = st.chunk_range(c)
        # up to 200 m: above 128 m the stored uint16 has its high bit set (negative as the int16 bits)
        depth = np.random.default_rng(c).uniform(1, 200, (b - a, *HW)).astype(np.float32)
        st.write_chunk(c, {k: torch.randn(b - a, G, G, C, generator=gen) for k in LAYERS},
                       torch.randn(b - a, C, generator=gen), depth, np.array([a + i == 5 for i in range(b - a)]),
                       [""] * (b - a))
    st.mark_complete()
    return FeatureStore.open(str(path))


@pytest.mark.parametrize("compressor, dtype", [("none", "float16"), ("none", "bfloat16"), ("zstd", "float16")])
def test_streaming_gives_the_resident_batches_for_each_codec_and_dtype(tmp_path, compressor, dtype):
    """Streamed batches (whole chunks read, rows gathered) are the resident cache's bit for bit: mirrored rows,
    targets above 128 m (the stored uint16's high bit set), CLS vectors, bfloat16 bits."""
    st = small_store(tmp_path / "s.zarr", compressor, dtype)
    assert st.group["depth"][:].max() > 32767  # high-bit targets are in the test
    kw = dict(batch_size=5, flip_p=0.5, seed=2, shuffle_window=2, read_workers=2)
    streamed = CachedBatches(st, LAYERS, cache_device="stream", **kw)
    a, b = collect(streamed, 1), collect(CachedBatches(st, LAYERS, cache_device="cpu", **kw), 1)
    assert len(a) == len(b) == len(streamed) and any(x.flipped.any() for x in a)
    for x, y in zip(a, b):
        assert np.array_equal(x.index, y.index) and torch.equal(x.flipped, y.flipped)
        for k in LAYERS:
            assert x.features["tokens"][k].dtype == getattr(torch, dtype)
            assert torch.equal(x.features["tokens"][k].view(torch.int16), y.features["tokens"][k].view(torch.int16))
        assert torch.equal(x.depth, y.depth) and torch.equal(x.features["global"], y.features["global"])


@pytest.mark.parametrize("where", ["visited", "skipped", "padding"])
def test_a_changed_byte_stops_streaming_before_its_chunk_reaches_a_batch(tmp_path, where):
    """One byte changed in a token chunk file: the streaming loader raises an error naming the file, and no
    batch holding a sample of that chunk was handed out. Bytes no batch takes (the skipped sample 5, the padding
    of the last chunk) are checked as well: the CRC-32C covers the whole chunk, checked as it is read."""
    st = small_store(tmp_path / "s.zarr")
    chunk, row = {"visited": (2, 1), "skipped": (1, 1), "padding": (st.n_chunks - 1, CS - 1)}[where]
    assert where != "padding" or N % CS and N % CS <= row  # a row past the last sample
    path = st.chunk_path("tokens/L2", chunk)
    data = bytearray(path.read_bytes())
    data[row * G * G * C * 2 + 11] ^= 0x10
    path.write_bytes(bytes(data))
    assert not FeatureStore.open(st.url).verify()["ok"]
    loader = CachedBatches(FeatureStore.open(st.url), LAYERS, batch_size=3, flip_p=0.5, seed=0, shuffle_window=2,
                           cache_device="stream", read_workers=2)
    seen = []
    with pytest.raises(StoreError, match=f"{path}: chunk {chunk} of tokens/L2 does not decode.*(checksum|CRC-32C)"):
        for batch in loader.epoch(0):
            seen += batch.index.tolist()
    assert not {p // CS for p in seen} & {chunk}
