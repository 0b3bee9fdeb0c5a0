"""Whether a feature cache held resident (`train.cache_device: cpu / cuda`) fits in the memory it would be loaded
into: `auto` picks the GPU, the host RAM or streaming from the sizes; an explicit choice that cannot fit fails
with the sizes before anything is loaded, not by the OOM killer.
"""

from __future__ import annotations

from typing import Sequence

import psutil
import torch

from pipeline.store import FeatureStore, StoreError

CPU_BUDGET_FRACTION = 0.5  # of the RAM available now, for a resident cache
GPU_BUDGET_FRACTION = 0.5  # of the free GPU memory, leaving the rest to the decoder's activations


def store_bytes(store: FeatureStore, layers: Sequence[int], flipped: bool = False) -> int:
    """Bytes a resident copy of these layers + global vector + float32 targets takes (`flipped`: and the mirrored
    images' layers and global vector)."""
    g, c = int(store.attrs["grid"]), int(store.attrs["width"])
    per = (len(layers) * g * g * c + c) * 2 * (2 if flipped else 1)
    if store.has_depth:
        h, w = store.target_hw
        per += h * w * 4
    return store.n * per


def resolve_cache_device(
    mode: str, need: int, device: torch.device, budget: int | None = None, share: int = 1, device_share: int = 1
) -> str:
    """`auto` -> `cuda` when the cache fits in the GPU budget (divided by `device_share`: the trainings on this GPU),
    else `cpu` when it fits in the RAM budget (divided by `share`: concurrent trainings in other processes hold
    their own copies), else `stream`. Explicit modes are checked for possibility only."""
    if mode == "cuda" and device.type != "cuda":
        raise ValueError("train.cache_device is 'cuda' but training runs on the CPU; use auto, cpu or stream")
    if mode != "auto":
        return mode
    if device.type == "cuda":
        gpu_budget = budget if budget is not None else int(
            torch.cuda.mem_get_info(device)[0] * GPU_BUDGET_FRACTION / device_share)
        if need <= gpu_budget:
            return "cuda"
    ram_budget = budget if budget is not None else int(psutil.virtual_memory().available * CPU_BUDGET_FRACTION / share)
    return "cpu" if need <= ram_budget else "stream"


class CacheMemoryError(StoreError):
    """A cache held resident (`train.cache_device: cpu / cuda`) does not fit in the memory it would be loaded into."""


def check_resident_memory(url: str, need: int, device: torch.device, chunk: int) -> None:
    """Room for a cache of `need` bytes loaded onto `device` a chunk (`chunk` bytes) at a time: in host RAM (on
    CUDA only a chunk and its pinned copy) and in the GPU's free memory; else a `CacheMemoryError` with the sizes."""
    gb = lambda n: f"{n / 1e9:.2f} GB"
    advice = ("set train.cache_device: stream (reads it from disk batch by batch, any size), or train on fewer "
              "layers (cache.layers) or a smaller split")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise CacheMemoryError(f"loading {url} onto {device} needs {gb(need)} of GPU memory, {gb(free)} is "
                                   f"free: {advice}")
    host = 2 * chunk if device.type == "cuda" else need + chunk
    available = psutil.virtual_memory().available
    if host > available:
        raise CacheMemoryError(f"loading {url} into host RAM needs {gb(host)} (the cache {gb(need)}), "
                               f"{gb(available)} is available: {advice}")
