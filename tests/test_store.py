"""The Zarr feature store on its own: layout, dtypes, chunk ownership, verification."""

import errno
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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_kept_feature_write_gives_the_bytes_zarr_writes(tmp_path, monkeypatch, dtype):
    """`_put_raw` (O_DIRECT from an aligned buffer) writes every uncompressed feature chunk, the short last one
    included, byte for byte as Zarr's own writer does; where the file system refuses O_DIRECT (EINVAL), Zarr
    writes them, the same bytes again."""
    import pipeline.store as store_module
    from tests.conftest import store_files

    real_put, real_open, written = FeatureStore._put_raw, os.open, []

    def counted(self, name, c, values):
        ok = real_put(self, name, c, values)
        written.extend([(name, c)] if ok else [])
        return ok

    monkeypatch.setattr(FeatureStore, "_put_raw", counted)
    ours = _filled(str(tmp_path / "raw.zarr"), dtype, n=10, cs=4)[0]
    assert sorted(written) == sorted((name, c) for name in ("tokens/L0", "tokens/L12", "cls") for c in range(3))
    monkeypatch.setattr(FeatureStore, "_put_raw", lambda *a: False)
    zarrs_own = _filled(str(tmp_path / "zarr.zarr"), dtype, n=10, cs=4)[0]
    monkeypatch.setattr(FeatureStore, "_put_raw", counted)
    written.clear()

    def no_direct(path, flags, *args, **kwargs):  # as Linux refuses it: the file is created, then EINVAL
        if flags & os.O_DIRECT:
            os.close(real_open(path, flags & ~os.O_DIRECT, *args, **kwargs))
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(store_module.os, "open", no_direct)
    refused = _filled(str(tmp_path / "refused.zarr"), dtype, n=10, cs=4)[0]
    monkeypatch.undo()
    assert written == []  # every feature chunk fell back to Zarr
    assert store_files(ours.url) == store_files(zarrs_own.url) == store_files(refused.url)
    assert (tmp_path / "raw.zarr/tokens/L12/c/2/0/0/0").stat().st_size == 4 * 14 * 14 * 8 * 2 + 4
    assert not list(tmp_path.rglob("*.partial")) and ours.verify()["ok"]


@pytest.mark.parametrize("compressor, dtype", [("none", "bfloat16"), ("zstd", "float16"), ("blosc-zstd", "float16")])
def test_every_store_reads_with_plain_zarr_open_as_the_store_reads_it(tmp_path, compressor, dtype):
    """The store is plain Zarr v3: `zarr.open` alone (no project code) gives every array of every chunk, the
    short last one included, with the values the store's reads give: the bfloat16 bits as uint16, the targets
    as `round(metres x scale)`, the flags and the index as written."""
    import zarr

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
                          torch.randn(b - a, 8, generator=gen), depth[a:b], np.arange(a, b) == 5,
                          ["bad" if i == 5 else "" for i in range(a, b)])
    store = FeatureStore.open(store.url)
    plain = zarr.open(str(tmp_path / "s.zarr"), mode="r")
    ours = store.read(slice(0, n))  # through Zarr
    chunks = [store.read_chunk(c) for c in range(store.n_chunks)]  # whole chunks: uncompressed ones by `_raw_chunk`
    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)
    for k in (0, 12):
        assert np.array_equal(plain[f"tokens/L{k}"][:].view(np.uint16), bits(ours["tokens"][k]))
        assert np.array_equal(plain[f"tokens/L{k}"][:].view(np.uint16),
                              np.concatenate([bits(c["tokens"][k]) for c in chunks]))
    assert np.array_equal(plain["cls"][:].view(np.uint16), bits(ours["global"]))
    assert np.array_equal(plain["cls"][:].view(np.uint16), np.concatenate([bits(c["global"]) for c in chunks]))
    assert np.array_equal(ours["depth"].numpy(), np.concatenate([c["depth"].numpy() for c in chunks]))
    assert np.array_equal(plain["depth"][:], np.clip(np.rint(depth.astype(np.float64) * 256), 0, 65535))
    assert np.array_equal(ours["depth"].numpy(), plain["depth"][:].astype(np.float32) / np.float32(256))
    assert plain["done"][:].tolist() == [1] * n and plain["skipped"][:].tolist() == [int(i == 5) for i in range(n)]
    assert plain["skip_reason"][5] == "bad" and plain["index/id"][:].tolist() == [f"s{i}" for i in range(n)]
    # the targets are compressed even when the features are not; every data chunk ends in a CRC-32C
    assert plain["depth"].metadata.codecs[-2].to_dict()["name"] in ("zstd", "blosc")
    assert all(plain[a].metadata.codecs[-1].to_dict()["name"] == "crc32c" for a in ("tokens/L0", "cls", "depth"))


def test_a_chunk_file_that_does_not_decode_is_named(tmp_path):
    store, *_ = _filled(str(tmp_path / "s.zarr"), n=10, cs=4)
    path = store.chunk_path("tokens/L12", 1)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(StoreError, match=r"chunk 1 of tokens/L12 does not decode") as err:
        store.read_chunk(1)
    assert str(path) in str(err.value)
    store.read_chunk(0)  # the other chunks still read


def test_a_missing_chunk_file_reads_as_the_fill_value_as_in_zarr(tmp_path):
    store, *_ = _filled(str(tmp_path / "s.zarr"), n=10, cs=4)
    store.chunk_path("cls", 2).unlink()
    got = store.read_chunk(2)["global"]
    assert got.shape == (2, 8) and not got.any()
    assert not store.group["cls"][8:10].any()


def test_one_depth_encoding_whose_bytes_are_the_earlier_stores():
    """Targets are stored by `datasets.encode_depth` (float64 product) and read by `decode_depth`, the pair depth
    PNGs use. Every value a target can hold (a PNG's uint16 decoded to metres, at each layout's scale) is stored
    as the same uint16 the float32 rounding of earlier stores gave, and reads back bit for bit as
    `stored / scale` in float32: the demo's stored targets do not change."""
    from pipeline.datasets import decode_depth, encode_depth

    every = np.arange(65536, dtype=np.uint16)
    for scale in (256.0, 1000.0):  # KITTI, NYU
        metres = decode_depth(every, scale)
        assert np.array_equal(metres.view(np.uint32), (every.astype(np.float32) / scale).view(np.uint32))
        assert np.array_equal(encode_depth(metres, scale), every)
        earlier = np.clip(np.round(metres * scale), 0, 65535).astype(np.uint16)  # float32, as store.py wrote
        assert np.array_equal(encode_depth(metres, scale), earlier)


def test_a_changed_byte_is_found_by_the_checksum(tmp_path):
    """A flipped bit of an uncompressed chunk still has the right length; the CRC-32C every data chunk carries
    finds it, in `verify` (Zarr's crc32c codec) and in the whole-chunk reads of training (`_raw_chunk`)."""
    store, *_ = _filled(str(tmp_path / "s.zarr"), n=10, cs=4)
    path = store.chunk_path("tokens/L0", 1)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x10
    path.write_bytes(bytes(data))
    report = FeatureStore.open(store.url).verify()
    assert report["damaged_chunks"] == [1]
    assert report["problems"][0].startswith("tokens/L0: chunk 1 does not decode")
    with pytest.raises(StoreError, match=f"{path}: chunk 1 of tokens/L0 does not decode.*(checksum|CRC-32C)"):
        FeatureStore.open(store.url).read_chunk(1)
