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
    meta = json.loads((tmp_path / "s.zarr/tokens/L12/zarr.json").read_text())
    assert meta["codecs"][-1]["name"] == "zstd"


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
