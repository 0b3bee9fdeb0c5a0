"""The Zarr feature store on its own: layout, dtypes, chunk ownership, verification."""

import json
import os

import numpy as np
import pytest
import torch

from pipeline.store import FeatureStore, StoreError, StoreSpec
from flows.cli import main as cli


def _index(n):
    return dict(
        id=np.array([f"s{i}" for i in range(n)]), image_path=np.array([f"/img/{i}.png" for i in range(n)]),
        depth_path=np.array([""] * n), focal=np.full(n, 721.5), orig_hw=np.tile([375, 1242], (n, 1)).astype(np.int32),
        view=np.zeros((n, 5), np.int32), group=np.array(["g"] * n), line=np.arange(1, n + 1, dtype=np.int32),
    )


def _filled(url, dtype="float16", n=10, cs=4, target=(6, 8)):
    spec = StoreSpec(n=n, layers=(0, 12), grid=14, width=8, dtype=dtype, chunk_size=cs, target_hw=target)
    store = FeatureStore.create(url, spec, _index(n))
    gen = torch.Generator().manual_seed(0)
    data = {k: torch.randn(n, 14, 14, 8, generator=gen) for k in (0, 12)}
    cls = torch.randn(n, 8, generator=gen)
    depth = np.random.default_rng(0).uniform(0, 80, (n, *target)).astype(np.float32)
    for c in store.pending_chunks():
        a, b = store.chunk_range(c)
        store.write_chunk(c, {k: v[a:b] for k, v in data.items()}, cls[a:b], depth[a:b])
    store.mark_complete()
    return FeatureStore.open(url), data, cls, depth


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_in_store_dtype(tmp_path, dtype):
    store, data, cls, depth = _filled(str(tmp_path / "s.zarr"), dtype)
    batch = store.read(slice(2, 7), layers=[12])
    want = getattr(torch, dtype)
    assert set(batch["tokens"]) == {12}
    assert batch["tokens"][12].dtype == want and batch["tokens"][12].shape == (5, 14, 14, 8)
    torch.testing.assert_close(batch["tokens"][12], data[12][2:7].to(want))
    torch.testing.assert_close(batch["global"], cls[2:7].to(want))
    # depth is uint16 metres x 256 on disk: exact to half a quantisation step
    assert np.abs(batch["depth"].numpy() - depth[2:7]).max() <= 0.5 / 256 + 1e-6
    picked = store.read([1, 5, 9], layers=[0])
    torch.testing.assert_close(picked["tokens"][0], data[0][[1, 5, 9]].to(want))
    # bfloat16 has no zarr dtype: its bits are stored as uint16 with an attribute saying so
    arr = store.group["tokens/L0"]
    assert str(arr.dtype) == ("uint16" if dtype == "bfloat16" else "float16")
    assert arr.attrs["bfloat16_bits"] is (dtype == "bfloat16")


def test_chunks_along_n_only_and_files_on_disk(tmp_path):
    url = str(tmp_path / "s.zarr")
    store, *_ = _filled(url, n=10, cs=4)
    assert store.group["tokens/L12"].chunks == (4, 14, 14, 8)
    assert store.group["depth"].chunks == (4, 6, 8)
    assert store.n_chunks == 3 and store.chunk_range(2) == (8, 10)
    # one file per chunk along N, nothing else
    assert sorted(os.listdir(tmp_path / "s.zarr/tokens/L12/c")) == ["0", "1", "2"]
    # the features raw by default (fp16 activations are near-incompressible), the sparse targets zstd-compressed
    meta = json.loads((tmp_path / "s.zarr/tokens/L12/zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"]
    meta = json.loads((tmp_path / "s.zarr/depth/zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd", "crc32c"]


def test_done_flags_follow_data_and_pending_chunks(tmp_path):
    spec = StoreSpec(n=10, layers=(0,), grid=14, width=8, chunk_size=4, target_hw=None)
    store = FeatureStore.create(str(tmp_path / "s.zarr"), spec, _index(10))
    assert store.pending_chunks() == [0, 1, 2]
    store.write_chunk(1, {0: torch.ones(4, 14, 14, 8)}, torch.ones(4, 8))
    assert store.pending_chunks() == [0, 2]
    assert store.done_flags().tolist() == [0] * 4 + [1] * 4 + [0] * 2
    with pytest.raises(StoreError, match="not done"):
        store.mark_complete()
    with pytest.raises(StoreError, match="rows, expected 4"):
        store.write_chunk(0, {0: torch.ones(3, 14, 14, 8)}, torch.ones(3, 8))


def test_index_without_the_skip_records_is_the_index_less_those_columns(tmp_path):
    url = str(tmp_path / "s.zarr")
    _filled(url, n=10, cs=4)
    store = FeatureStore.open(url, mode="r+")
    a, b = store.chunk_range(1)
    store.write_chunk(1, {k: torch.zeros(b - a, 14, 14, 8) for k in (0, 12)}, torch.zeros(b - a, 8),
                      np.zeros((b - a, 6, 8), np.float32), np.array([False, True, False, False]), ["", "bad", "", ""])
    full, lean = store.index(), store.index(skips=False)
    assert full.skipped.tolist() == [i == 5 for i in range(10)] and full.skip_reason[5] == "bad"
    assert list(lean.columns) == [c for c in full.columns if c not in ("skipped", "skip_reason")]
    assert lean.equals(full[lean.columns])
    assert lean.image_path.tolist() == [f"/img/{i}.png" for i in range(10)]


def test_verify_catches_a_deleted_chunk(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    _filled(url)
    assert cli(["cache", "verify", url]) == 0
    assert "ok" in capsys.readouterr().out
    os.remove(tmp_path / "s.zarr/tokens/L0/c/1/0/0/0")
    report = FeatureStore.open(url).verify()
    assert not report["ok"]
    assert report["problems"] == ["tokens/L0: chunk 1 (samples (4, 8)) is missing (tokens/L0/c/1/0/0/0)"]
    assert cli(["cache", "verify", url]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "tokens/L0: chunk 1" in out


def test_verify_catches_a_corrupt_chunk(tmp_path):
    url = str(tmp_path / "s.zarr")
    _filled(url)
    (tmp_path / "s.zarr/cls/c/2/0").write_bytes(b"not zstd")
    problems = FeatureStore.open(url).verify()["problems"]
    assert len(problems) == 1 and problems[0].startswith("cls: chunk 2 does not decode")


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(StoreError, match="no feature store at .*missing.zarr"):
        FeatureStore.open(str(tmp_path / "missing.zarr"))
    with pytest.raises(StoreError, match="layers \\[3\\] are not in"):
        _filled(str(tmp_path / "s.zarr"))[0].read(slice(0, 2), layers=[3])


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc-zstd"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_whole_chunk_reads_from_the_files_equal_zarr_reads(tmp_path, compressor, dtype):
    """`read_chunk` decodes chunk files itself (numcodecs), bypassing Zarr's event loop: every array of every chunk,
    the short last one included, must equal what Zarr reads, for each codec and dtype."""
    n, cs, target = 10, 4, (6, 8)
    spec = StoreSpec(n=n, layers=(0, 12), grid=14, width=8, dtype=dtype, chunk_size=cs, target_hw=target,
                     compressor=compressor)
    store = FeatureStore.create(str(tmp_path / "s.zarr"), spec, _index(n))
    gen = torch.Generator().manual_seed(1)
    depth = np.random.default_rng(1).uniform(0, 80, (n, *target)).astype(np.float32)
    depth[:, ::2] = 0  # sparse, as LiDAR targets are
    for c in range(store.n_chunks):
        a, b = store.chunk_range(c)
        store.write_chunk(c, {k: torch.randn(b - a, 14, 14, 8, generator=gen) for k in (0, 12)},
                          torch.randn(b - a, 8, generator=gen), depth[a:b])
    store = FeatureStore.open(store.url)
    for name in ("tokens/L0", "tokens/L12", "cls", "depth"):
        assert store._chunk_files(name) is not None, name  # the fast path is the one under test
    # the targets are compressed even when the features are not
    assert store.group["depth"].metadata.codecs[-2].to_dict()["name"] in ("zstd", "blosc")
    for c in range(store.n_chunks):
        a, b = store.chunk_range(c)
        got = store.read_chunk(c)
        raw = store.read_chunk(c, raw_depth=True)["depth"]
        for k in (0, 12):
            want = store.group[f"tokens/L{k}"][a:b]  # through Zarr
            assert np.array_equal(got["tokens"][k].view(torch.int16).numpy().view(want.dtype), want)
        assert np.array_equal(got["global"].view(torch.int16).numpy().view(np.uint16),
                              store.group["cls"][a:b].view(np.uint16))
        stored = store.group["depth"][a:b]
        assert raw.dtype == torch.int16 and np.array_equal(raw.numpy().view(np.uint16), stored)
        assert np.array_equal(got["depth"].numpy(), stored.astype(np.float32) / 256.0)


def test_a_chunk_file_that_does_not_decode_is_named(tmp_path):
    store, *_ = _filled(str(tmp_path / "s.zarr"), n=10, cs=4)
    path = store._chunk_file("tokens/L12", 1)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(StoreError, match=r"chunk 1 of tokens/L12 does not decode") as err:
        store.read_chunk(1)
    assert str(path) in str(err.value)
    store.read_chunk(0)  # the other chunks still read


def test_a_missing_chunk_file_reads_as_the_fill_value_as_in_zarr(tmp_path):
    store, *_ = _filled(str(tmp_path / "s.zarr"), n=10, cs=4)
    store._chunk_file("cls", 2).unlink()
    got = store.read_chunk(2)["global"]
    assert got.shape == (2, 8) and not got.any()
    assert not store.group["cls"][8:10].any()


def test_depth_metres_is_the_division_bit_for_bit():
    from pipeline.store import depth_metres

    every = np.arange(65536, dtype=np.uint16)
    for scale in (256.0, 1000.0):  # KITTI, NYU
        want = every.astype(np.float32) / scale
        assert np.array_equal(depth_metres(every, scale).view(np.uint32), want.view(np.uint32))
        assert np.array_equal(depth_metres(every.view(np.int16), scale).view(np.uint32), want.view(np.uint32))


def test_a_changed_byte_is_found_by_the_checksum(tmp_path):
    """A flipped bit of an uncompressed chunk still has the right length; the CRC-32C every data chunk carries
    finds it, in `verify` (through Zarr) and in the direct reads of training."""
    store, *_ = _filled(str(tmp_path / "s.zarr"), n=10, cs=4)
    path = store._chunk_file("tokens/L0", 1)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x10
    path.write_bytes(bytes(data))
    report = FeatureStore.open(store.url).verify()
    assert report["damaged_chunks"] == [1]
    assert report["problems"][0].startswith("tokens/L0: chunk 1 does not decode")
    with pytest.raises(StoreError, match="CRC-32C does not match"):
        FeatureStore.open(store.url).read_chunk(1)


@pytest.mark.parametrize("compressor", ["none", "zstd", "blosc-zstd"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_direct_chunk_writes_are_the_bytes_zarr_writes(tmp_path, compressor, dtype, monkeypatch):
    """`write_chunk` writes chunk files itself (not through Zarr's event loop); every file of the store, the padded
    last chunk, the flags and the targets included, must be the bytes Zarr writes for the same values."""
    import pipeline.store as store_module

    n, cs, target = 10, 4, (6, 8)
    gen = torch.Generator().manual_seed(2)
    tokens = {k: torch.randn(n, 14, 14, 8, generator=gen) for k in (0, 12)}
    cls = torch.randn(n, 8, generator=gen)
    depth = np.random.default_rng(2).uniform(0, 80, (n, *target)).astype(np.float32)
    skipped = np.zeros(n, bool)
    skipped[5] = True

    def build(url):
        spec = StoreSpec(n=n, layers=(0, 12), grid=14, width=8, dtype=dtype, chunk_size=cs, target_hw=target,
                         compressor=compressor)
        store = FeatureStore.create(url, spec, _index(n))
        for c in range(store.n_chunks):
            a, b = store.chunk_range(c)
            store.write_chunk(c, {k: t[a:b] for k, t in tokens.items()}, cls[a:b], depth[a:b], skipped[a:b],
                              ["unreadable" if s else "" for s in skipped[a:b]])
        return tmp_path / url

    direct = build(str(tmp_path / "direct.zarr"))
    wrote = []
    real_write = store_module._ChunkFiles.write
    monkeypatch.setattr(store_module._ChunkFiles, "write", lambda self, c, v: wrote.append(self.name) or False)
    through_zarr = build(str(tmp_path / "zarr.zarr"))
    monkeypatch.setattr(store_module._ChunkFiles, "write", real_write)
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    a, b = files(direct), files(through_zarr)
    assert sorted(a) == sorted(b)
    assert {"tokens/L0", "cls", "depth", "skipped", "done"} <= set(wrote)  # the direct path was the one replaced
    for name in sorted(a):
        if name != "zarr.json":  # the root group's attributes hold no chunk data
            assert a[name] == b[name], name
    assert FeatureStore.open(str(direct)).verify()["problems"] == []


@pytest.mark.parametrize("size", [1000, (1 << 20) - 1, 1 << 20, (1 << 20) + 4096 * 3, (1 << 20) + 4096 * 3 + 777])
def test_write_file_gives_the_same_bytes_direct_or_not(tmp_path, size, monkeypatch):
    """`write_file` writes `data` then `tail`, whether the bulk goes through O_DIRECT (from 1 MiB on, where the
    filesystem takes it) or not; the staging buffer is reused by the next, smaller file without leaking into it."""
    import pipeline.store as store

    flags = []
    real_open = os.open
    monkeypatch.setattr(store.os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    rng = np.random.default_rng(size)
    for n in (size, size - 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        path = tmp_path / f"file-{n}"
        store.write_file(path, data, b"tail")
        assert path.read_bytes() == data.tobytes() + b"tail"
    direct = [bool(f & os.O_DIRECT) for f in flags]
    if size - size % 4096 >= store.DIRECT_WRITE_BYTES:
        # tried direct (the test folder's filesystem may refuse it: then a plain open follows)
        assert direct and direct[0]
    else:
        assert not any(direct)
