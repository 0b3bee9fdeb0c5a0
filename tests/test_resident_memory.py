"""A cache held in memory (issue 27, item 6): loaded into tensors allocated once and filled chunk by chunk (peak:
the cache and a chunk, not twice the cache), after a check of host RAM and, on CUDA, of the device's memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import loader
from pipeline.loader import CachedBatches
from pipeline.memory import CacheMemoryError, check_resident_memory, store_bytes
from pipeline.store import FeatureStore, StoreSpec

ROOT = Path(__file__).resolve().parent.parent
LAYERS = tuple(range(13))


def make_store(url: str, n: int, chunk_size: int = 16, target_hw=(8, 16)) -> FeatureStore:
    spec = StoreSpec(n=n, layers=LAYERS, grid=14, width=64, chunk_size=chunk_size, target_hw=target_hw,
                     attrs={"fingerprint": "f" * 16})
    index = {"id": np.array([f"s{i}" for i in range(n)]), "image_path": np.array(["x.png"] * n),
             "depth_path": np.array(["d.png"] * n), "focal": np.ones(n), "orig_hw": np.ones((n, 2), np.int32),
             "view": np.zeros((n, 5), np.int32), "group": np.array(["g"] * n), "line": np.arange(n, dtype=np.int32)}
    store = FeatureStore.create(url, spec, index)
    gen = torch.Generator().manual_seed(0)
    for c in range(store.n_chunks):
        a, b = store.chunk_range(c)
        store.write_chunk(c, {k: torch.randn(b - a, 14, 14, 64, generator=gen) for k in LAYERS},
                          torch.randn(b - a, 64, generator=gen), depth=np.full((b - a, *target_hw), 5.0, np.float32))
    store.mark_complete()
    return FeatureStore.open(url)


PEAK = textwrap.dedent("""
    import json, resource, sys
    import torch
    from pipeline.loader import CachedBatches
    from pipeline.store import FeatureStore

    store = FeatureStore.open(sys.argv[1])
    store.read_chunk(0)  # the readers' own first-use allocations, before the measure
    rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    loaded = CachedBatches(store, list(range(13)), batch_size=8, train=False, cache_device="cpu")
    # VmHWM, the peak resident memory of this process's own address space. Not ru_maxrss: exec keeps the parent's
    # high-water mark in it (vfork), so a child of a large pytest process would report the parent's peak.
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024
    total = sum(t.nbytes for v in loaded._resident.values() for t in (v.values() if isinstance(v, dict) else [v]))
    print(json.dumps({"rss_before": rss, "peak": peak, "resident": total}))
""")


@pytest.mark.slow
def test_loading_into_ram_peaks_at_the_cache_and_a_chunk_not_twice_it(tmp_path):
    """Measured in a fresh process (VmHWM, its peak resident memory): the rise from the resident memory before
    the load to the peak is under 1.3x the bytes loaded (1.13x measured, a 105 MB cache); concatenating
    every chunk took 2.02x."""
    store = make_store(str(tmp_path / "s.zarr"), n=320)
    need = store_bytes(store, LAYERS)
    assert need > 100e6
    out = subprocess.run([sys.executable, "-c", PEAK, store.url], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["resident"] == need
    rise = (m["peak"] - m["rss_before"]) / need
    print(f"resident load of {need / 1e6:.0f} MB: peak rise {rise:.2f}x")
    assert rise < 1.3, m


def test_resident_rows_are_the_stores(tmp_path):
    store = make_store(str(tmp_path / "s.zarr"), n=37, chunk_size=8)
    resident = CachedBatches(store, [0, 5], batch_size=8, train=False, cache_device="cpu")._resident
    want = store.read(slice(0, store.n), layers=[0, 5])
    for k in (0, 5):
        assert torch.equal(resident[f"tokens/{k}"], want["tokens"][k])
    assert torch.equal(resident["global"], want["global"]) and torch.equal(resident["depth"], want["depth"])


Memory = namedtuple("Memory", "available")


def test_a_cache_larger_than_the_ram_is_refused_with_the_sizes_and_the_knob(tmp_path, monkeypatch):
    import psutil

    store = make_store(str(tmp_path / "s.zarr"), n=20, chunk_size=8)
    need = store_bytes(store, LAYERS)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(need // 2))
    with pytest.raises(CacheMemoryError) as err:
        CachedBatches(store, LAYERS, batch_size=8, train=False, cache_device="cpu")
    message = str(err.value)
    assert f"needs {(need + -(-need // 3)) / 1e9:.2f} GB" in message and f"{need // 2 / 1e9:.2f} GB is available" \
        in message and "train.cache_device: stream" in message and store.url in message
    # streaming needs no such room
    assert CachedBatches(store, LAYERS, batch_size=8, train=False, cache_device="stream").mode == "stream"


def test_on_cuda_the_device_memory_is_checked_and_the_host_holds_only_a_chunk(monkeypatch):
    """No GPU here: the check itself, with the device's free memory and the host's RAM monkeypatched."""
    import psutil

    gpu = torch.device("cuda")
    need, chunk = 64 * 10**9, 10**8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(3 * chunk))  # far less RAM than the cache
    check_resident_memory("s.zarr", need, gpu, chunk)  # fits: only a chunk and its pinned copy pass the host
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(chunk))
    with pytest.raises(CacheMemoryError, match="host RAM needs 0.20 GB"):
        check_resident_memory("s.zarr", need, gpu, chunk)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (32 * 10**9, 80 * 10**9))
    with pytest.raises(CacheMemoryError, match=r"onto cuda needs 64.00 GB of GPU memory, 32.00 GB is free: set "
                                               r"train.cache_device: stream"):
        check_resident_memory("s.zarr", need, gpu, chunk)


def test_the_cuda_load_goes_through_one_pinned_chunk(tmp_path, monkeypatch):
    """`_load_all` on 'cuda' with the device copies played by CPU tensors (what this machine cannot have: a GPU,
    pinned memory, a CUDA stream): every row lands once, through a staging chunk of chunk_size rows."""
    store = make_store(str(tmp_path / "s.zarr"), n=21, chunk_size=8)
    batches = CachedBatches(store, [0, 12], batch_size=8, train=False, cache_device="stream")
    staged = []
    real_empty = torch.empty

    def empty(*shape, device=None, pin_memory=False, **kwargs):
        if pin_memory:
            staged.append(shape[0][0])
        return real_empty(*shape, **kwargs)

    class Stream:
        def synchronize(self):
            pass

    monkeypatch.setattr(loader.torch, "empty", empty)
    monkeypatch.setattr(loader.torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(loader, "check_resident_memory", lambda *a: None)
    data = batches._load_all(torch.device("cuda"))
    assert staged and set(staged) == {8}
    want = store.read(slice(0, store.n), layers=[0, 12])
    assert torch.equal(data["tokens/12"], want["tokens"][12]) and torch.equal(data["depth"], want["depth"])
