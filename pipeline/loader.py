"""Batches for decoder training: from the feature cache (the fast path) or from images (the reference path).

    CachedBatches   Zarr store -> Batch(features={"tokens": {k: (B, g, g, C)}, "global": (B, C)},
                    depth (B, H, W), index, flipped): only the layers the variant reads; the whole cache
                    resident in RAM or on the GPU (`train.cache_device`), or streamed by a pool of threads:
                    uncompressed features a sample row at a time straight from the chunk files into the batch
                    (one copy; each chunk's CRC-32C checked from its row CRCs before any of its rows is handed
                    out), compressed ones as whole chunks decompressed, read ahead and copied into batches;
                    batches pinned and copied to the GPU on a side stream.
    ImageBatches    the same batches, but images are decoded and the frozen encoder runs on every step. It is
                    the honest baseline the cache is measured against, and the place where pixel-space
                    augmentation (colour, rotation) could go.

Both are `Batches` and follow one `epoch_plan`, so for a seed they visit the same samples in the same order with
the same flips. A `Batch`'s `features` are all the decoder receives; its targets, positions and flip flags travel
beside them.

Shuffling is chunk-aligned: whole chunks in a random order, then samples shuffled within a window of
`shuffle_window` consecutive chunks. Reads stay whole chunks (the store's unit of compression) while batches
still mix several drives.

Horizontal flip is done in *feature space* (docs/design.md): the (g, g) token grid of every layer and the target are
flipped along their width; the global vector is unchanged. ViT features are not exactly flip-equivariant, so
this approximates flipping the image, which is what `ImageBatches` does.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from pipeline.devices import usable_cores
from pipeline.store import ChunkRows, FeatureStore, StoreError, byte_view, depth_metres, layer_key
from spaceclip.features import Features

log = logging.getLogger(__name__)

CPU_BUDGET_FRACTION = 0.5  # of the RAM available now, for a resident cache
GPU_BUDGET_FRACTION = 0.5  # of the free GPU memory, leaving the rest to the decoder's activations


# ---- the epoch plan -----------------------------------------------------------------------------------------
@dataclass
class EpochPlan:
    order: np.ndarray  # (M,) sample positions in visiting order (skipped samples left out)
    flips: np.ndarray  # (M,) bool, aligned with `order`
    windows: list[np.ndarray]  # chunk ids read together, in visiting order


def epoch_plan(
    n: int, chunk_size: int, epoch: int, *, seed: int, shuffle: bool, shuffle_window: int, flip_p: float,
    usable: np.ndarray | None = None,
) -> EpochPlan:
    """Which samples an epoch visits, in which order, and which of them are flipped. A pure function of its
    arguments: a resumed run replays exactly the epochs an uninterrupted one would have."""
    rng = np.random.default_rng([seed, epoch])
    n_chunks = -(-n // chunk_size)
    chunks = rng.permutation(n_chunks) if shuffle else np.arange(n_chunks)
    windows = [chunks[i:i + shuffle_window] for i in range(0, n_chunks, shuffle_window)]
    parts = []
    for win in windows:
        pos = np.concatenate([np.arange(c * chunk_size, min((c + 1) * chunk_size, n)) for c in win])
        if usable is not None:
            pos = pos[usable[pos]]
        parts.append(rng.permutation(pos) if shuffle else pos)
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    flips = rng.random(len(order)) < flip_p if flip_p > 0 else np.zeros(len(order), bool)
    return EpochPlan(order.astype(np.int64), flips, windows)


class Batch(NamedTuple):
    """One batch. `features` come first: torch's `update_bn` forwards `batch[0]` of a tuple."""

    features: Features  # what the decoder reads
    depth: torch.Tensor | None  # (B, H, W) training targets in metres, 0 = invalid; None without targets
    index: np.ndarray  # (B,) positions of the samples in their split
    flipped: torch.Tensor  # (B,) bool: the sample is mirrored (features and target)

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        move = lambda t: (t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True)
        features = {"tokens": {k: move(t) for k, t in self.features["tokens"].items()},
                    "global": None if self.features["global"] is None else move(self.features["global"])}
        return Batch(features, None if self.depth is None else move(self.depth), self.index, move(self.flipped))


def flip_features(features: Features, flips: torch.Tensor, mirrored: Features | None = None) -> Features:
    """The selected samples mirrored horizontally. In feature space every token grid is flipped along its width
    (dim 2 of (B, g, g, C)) and the global vector is unchanged; with `mirrored`, the mirrored images' own features
    (`views.flip = extract`, pixel flip TTA), those are taken instead."""
    if not bool(flips.any()):
        return features
    m = flips.to(device=features["global"].device)
    if mirrored is not None:
        return {"tokens": {k: torch.where(m[:, None, None, None], mirrored["tokens"][k], t)
                           for k, t in features["tokens"].items()},
                "global": torch.where(m[:, None], mirrored["global"], features["global"])}
    return {"tokens": {k: torch.where(m[:, None, None, None], t.flip(2), t) for k, t in features["tokens"].items()},
            "global": features["global"]}


def flip_targets(depth: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B, H, W) targets of the selected samples mirrored along their width."""
    if not bool(flips.any()):
        return depth
    m = flips.to(device=depth.device)
    return torch.where(m[:, None, None], depth.flip(2), depth)


def _prefetched(produce: Callable[[Callable[[object], bool]], None], depth: int) -> Iterator:
    """Run `produce(put)` in a background thread and yield what it puts, at most `depth` items ahead.
    An exception in the producer is re-raised here; leaving the loop early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            produce(put)
            put(done)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=run, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


# ---- from the cache -----------------------------------------------------------------------------------------
def store_bytes(store: FeatureStore, layers: Sequence[int], flipped: bool = False) -> int:
    """Bytes a resident copy of these layers + global vector + float32 targets takes (`flipped`: and the mirrored
    images' layers and global vector)."""
    g, c = int(store.attrs["grid"]), int(store.attrs["width"])
    per = (len(layers) * g * g * c + c) * 2 * (2 if flipped else 1)
    if store.has_depth:
        h, w = store.group["depth"].shape[1:]
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
    import psutil

    ram_budget = budget if budget is not None else int(psutil.virtual_memory().available * CPU_BUDGET_FRACTION / share)
    return "cpu" if need <= ram_budget else "stream"


class CacheMemoryError(StoreError):
    """A cache held resident (`train.cache_device: cpu / cuda`) does not fit in the memory it would be loaded into."""


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_resident_memory(url: str, need: int, device: torch.device, chunk: int) -> None:
    """Before a cache of `need` bytes is loaded onto `device` (a chunk at a time, `chunk` bytes): host RAM for it
    (the RAM available now, `psutil.virtual_memory().available`; on CUDA only a chunk and its pinned copy pass
    through the host) and, on CUDA, the device's free memory. A `CacheMemoryError` with the sizes and the knob."""
    import psutil

    advice = ("set train.cache_device: stream (reads it from disk batch by batch, any size), or train on fewer "
              "layers (cache.layers) or a smaller split")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise CacheMemoryError(f"loading {url} onto {device} needs {_gb(need)} of GPU memory, {_gb(free)} is "
                                   f"free: {advice}")
    host = 2 * chunk if device.type == "cuda" else need + chunk
    available = psutil.virtual_memory().available
    if host > available:
        raise CacheMemoryError(f"loading {url} into host RAM needs {_gb(host)} (the cache {_gb(need)}), "
                               f"{_gb(available)} is available: {advice}")


# ---- one base for both sources ------------------------------------------------------------------------------
class Batches(ABC):
    """The batches of one split for the layers one decoder reads: `len(loader)` steps an epoch, `loader.epoch(e)`
    the batches of epoch e (0-based), in the order and with the flips of `loader.plan(e)`.

    `train=False` visits samples in split order without flips (validation). `mode` says where the features come
    from: `cpu` / `cuda` (the cache held resident), `stream` (the cache read chunk by chunk) or `images`."""

    mode: str

    def __init__(
        self, n: int, chunk_size: int, layers: Sequence[int], batch_size: int, *, train: bool, flip_p: float,
        seed: int, shuffle_window: int, device: torch.device | str, prefetch: int, drop_last: bool,
        target_hw: tuple[int, int] | None, usable: np.ndarray | None = None,
    ):
        self.n, self.chunk_size = n, chunk_size
        self.layers = tuple(sorted(int(k) for k in layers))
        self.batch_size = int(batch_size)
        self.train = train
        self.flip_p = flip_p if train else 0.0
        self.seed, self.shuffle_window = seed, shuffle_window
        self.device = torch.device(device)
        self.prefetch, self.drop_last = prefetch, drop_last
        self.target_hw = None if target_hw is None else tuple(target_hw)
        self.usable = usable  # (n,) bool, False for samples that could not be read; None: all usable
        self.n_usable = n if usable is None else int(usable.sum())

    def __len__(self) -> int:
        full, rest = divmod(self.n_usable, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.n, self.chunk_size, epoch, seed=self.seed, shuffle=self.train,
                          shuffle_window=self.shuffle_window, flip_p=self.flip_p, usable=self.usable)

    def _batches(self, plan: EpochPlan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, flips) of each batch of the plan."""
        bs = self.batch_size
        for start in range(0, len(plan.order), bs):
            pos = plan.order[start:start + bs]
            if len(pos) < bs and self.drop_last:
                return
            yield pos, plan.flips[start:start + bs]

    @abstractmethod
    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch, prefetched in a background thread."""

    @abstractmethod
    def targets(self, max_samples: int) -> np.ndarray:
        """(n, H, W) training targets in metres of the split's first `max_samples` samples."""


# ---- from the cache -----------------------------------------------------------------------------------------
class CachedBatches(Batches):
    """Training (or validation) batches over one feature store.

        loader = CachedBatches(store, decoder.layers, batch_size=8, flip_p=0.5, seed=42)
        for batch in loader.epoch(e): decoder(batch.features) ...

    Batches arrive on `device`; tokens keep the store's dtype (float16/bfloat16) and the decoder casts them.
    """

    def __init__(
        self,
        store: FeatureStore,
        layers: Sequence[int],
        batch_size: int,
        *,
        train: bool = True,
        flip_p: float = 0.5,
        seed: int = 42,
        shuffle_window: int = 4,
        cache_device: str = "auto",
        device: torch.device | str = "cpu",
        prefetch: int = 4,
        memory_budget: int | None = None,
        memory_share: int = 1,
        device_share: int = 1,
        drop_last: bool = False,
        read_workers: int | None = None,
        read_ahead: int | None = None,
        device_finish: bool | None = None,
    ):
        usable = ~store.group["skipped"][:].astype(bool) if store.n else np.zeros(0, bool)
        super().__init__(store.n, store.chunk_size, layers, batch_size, train=train, flip_p=flip_p, seed=seed,
                         shuffle_window=shuffle_window, device=device, prefetch=prefetch, drop_last=drop_last,
                         target_hw=tuple(store.group["depth"].shape[1:]) if store.has_depth else None, usable=usable)
        self.store = store
        missing = sorted(set(self.layers) - set(store.layers))
        if missing:
            raise StoreError(f"the decoder reads layers {list(self.layers)}, but {store.url} holds only "
                             f"{list(store.layers)} (missing {missing}); add them to cache.layers and extract again")
        # A store extracted with views.flip = extract holds the mirrored images' features: flips use those.
        self.exact_flips = bool(train and self.flip_p > 0 and store.has_flipped)
        self.mode = resolve_cache_device(cache_device, store_bytes(store, self.layers), self.device, memory_budget,
                                         memory_share, device_share)
        # Streaming: threads that read (+ decompress) and assemble batches (preadv, zstd and the copies release the
        # GIL); compressed chunks are read `read_ahead` chunks ahead of the batch being assembled (default: a
        # window more than the threads), row reads assemble up to `prefetch` batches ahead.
        self.read_workers = read_workers or usable_cores()
        self.read_ahead = read_ahead if read_ahead is not None else self.read_workers + shuffle_window
        # Uncompressed features are streamed a sample row at a time straight from the chunk files into the batch
        # (one copy); compressed ones (and exact flips, which read the mirrored arrays for some rows only) chunk
        # by chunk, decompressed, then copied into batches.
        self.row_reads = (self.mode == "stream" and not self.exact_flips
                          and all(store.reads_rows(layer_key(k)) for k in self.layers))
        # Row reads for a GPU (default: when training on CUDA) hand over the rows as stored, unflipped, with the
        # targets as stored (2 bytes a pixel, not 4); the feature-space flip and the conversion to metres run on
        # the device after the copy (`_finish_on_device`), where they cost microseconds, not host time.
        self.device_finish = bool(self.row_reads and (self.device.type == "cuda" if device_finish is None
                                                      else device_finish))
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._resident: dict | None = None
        if self.mode in ("cpu", "cuda"):
            self._resident = self._load_all(torch.device(self.mode))
        log.info("%s: %d samples, layers %s, cache %s", store.url, self.n_usable, list(self.layers), self.mode)

    def targets(self, max_samples: int) -> np.ndarray:
        return self.store.read(slice(0, max_samples), layers=())["depth"].numpy()  # the store's own decode

    # Chunks are read into plain dicts of the store's arrays ("tokens", "global", "depth", and with exact flips
    # "flipped_tokens", "flipped_global"); `_finish` turns a batch's rows of them into a `Batch`.
    def _read_chunks(self, chunks: Sequence[int]) -> dict:
        """Whole chunks, concatenated in the given order (the store's unit of compression: large reads)."""
        parts = [self.store.read_chunk(int(c), self.layers, flipped=self.exact_flips) for c in chunks]
        if not parts:  # an empty store (a train split of one drive has no validation drive): 0-row arrays
            parts = [self.store.read(slice(0, 0), self.layers, flipped=self.exact_flips)]
        return _concat(parts, self.layers)

    def _load_all(self, device: torch.device) -> dict:
        """The whole store (these layers) in tensors on `device`, position p at row p: allocated once, at their
        full size, and filled chunk by chunk (on CUDA through one pinned chunk), so the memory it takes is the
        cache's plus a chunk, not twice the cache's as reading every chunk and concatenating them would be.
        Checked first (`check_resident_memory`): a cache that cannot fit fails with the sizes, not by the kernel's
        out-of-memory killer."""
        store, cuda = self.store, device.type == "cuda"
        need = store_bytes(store, self.layers, self.exact_flips)
        check_resident_memory(store.url, need, device, -(-need // max(1, store.n_chunks)))
        data = staging = None

        def alike(part: dict, rows: int, **kwargs) -> dict:
            return {k: ({j: torch.empty((rows, *t.shape[1:]), dtype=t.dtype, **kwargs) for j, t in v.items()}
                        if isinstance(v, dict) else torch.empty((rows, *v.shape[1:]), dtype=v.dtype, **kwargs))
                    for k, v in part.items()}

        def pairs(dst: dict, src: dict):
            for k, v in src.items():
                yield from ((dst[k][j], t) for j, t in v.items()) if isinstance(v, dict) else [(dst[k], v)]

        for c in range(store.n_chunks):
            part = store.read_chunk(c, self.layers, flipped=self.exact_flips)
            del part["index"]
            if data is None:
                data = alike(part, store.n, device=device)
                staging = alike(part, store.chunk_size, pin_memory=True) if cuda else None
            a, b = store.chunk_range(c)
            if cuda:  # host chunk -> pinned chunk -> its rows on the device; the pinned chunk is reused after the wait
                for (dst, src), (pinned, _) in zip(pairs(data, part), pairs(staging, part)):
                    pinned[:b - a].copy_(src)
                    dst[a:b].copy_(pinned[:b - a], non_blocking=True)
                torch.cuda.current_stream(device).synchronize()
            else:
                for dst, src in pairs(data, part):
                    np.copyto(byte_view(dst[a:b]), byte_view(src.contiguous()))  # numpy's copy, as `_put_rows`
        return data if data is not None else {}

    @staticmethod
    def _gather(data: dict, rows: torch.Tensor) -> dict:
        rows = rows.to(data["global"].device)
        return {k: ({j: t.index_select(0, rows) for j, t in v.items()} if isinstance(v, dict)
                    else v.index_select(0, rows)) for k, v in data.items()}  # (B, g, g, C), (B, C), (B, H, W)

    def _finish(self, parts: list[dict], pos: np.ndarray, flips: np.ndarray) -> Batch:
        data = parts[0] if len(parts) == 1 else _concat(parts, self.layers)
        flipped = torch.from_numpy(flips.copy())
        mirrored = ({"tokens": data["flipped_tokens"], "global": data["flipped_global"]} if self.exact_flips
                    else None)
        features = flip_features({"tokens": data["tokens"], "global": data["global"]}, flipped, mirrored)
        depth = flip_targets(data["depth"], flipped) if "depth" in data else None
        return self._to_device(Batch(features, depth, pos, flipped))

    def _produce(self, plan: EpochPlan, put) -> None:
        if self._resident is not None:
            for pos, flips in self._batches(plan):
                if not put(self._finish([self._gather(self._resident, torch.from_numpy(pos))], pos, flips)):
                    return
            return
        self._stream(plan, put)

    def _stream(self, plan: EpochPlan, put) -> None:
        if self.row_reads:
            return self._stream_rows(plan, put)
        return self._stream_chunks(plan, put)

    def host_batches(self, epoch: int, recycle: bool = False) -> Iterator[Batch]:
        """The streamed batches of an epoch as the host hands them to the device copy, before `_to_device`: with
        `device_finish`, rows as stored and unflipped, `depth` the stored targets' int16 bits (`flipped` says which
        samples the device mirrors). What bench/train.py times as the loader's host work for a GPU.

        `recycle=True`: a batch's buffers are reused for a later batch as soon as the next one is asked for (copy
        what you keep first), as CUDA's caching host allocator reuses a pinned batch once its copy to the device
        is done. On a CPU, without it, every batch is assembled in memory the kernel maps in afresh."""
        if not self.row_reads:
            raise ValueError("host_batches: only row streaming (mode stream, uncompressed features) hands batches "
                             "over before the device")
        plan = self.plan(epoch)
        buffers = _Buffers(pin=self.device.type == "cuda") if recycle else None
        items = _prefetched(lambda put: self._stream_rows(plan, put, to_device=False, buffers=buffers),
                            self.prefetch)
        return _given_back(items, buffers) if recycle else items

    def _stream_rows(self, plan: EpochPlan, put, to_device: bool = True, buffers: "_Buffers | None" = None) -> None:
        """Uncompressed features: each batch assembled by a pool thread reading its samples' token rows straight
        from the chunk files into the batch (`ChunkRows`; a mirrored row through a one-row scratch buffer and a copy
        of its reversed columns), the small arrays (CLS vectors, targets) read a whole chunk at a
        time. A chunk's CRC-32C is checked when the last batch that uses it is assembled (its row CRCs combined),
        and a batch is handed out only once every chunk it touches has passed, so a damaged chunk stops training
        before any of its rows reach the decoder. Up to `prefetch` batches are assembled ahead, and as many more as
        that check needs (the rest of a shuffle window). A chunk's small arrays are read (the targets decompressed)
        by a pool task of their own, queued ahead of the first batch that needs them, so that the threads
        assembling batches over the same chunks do not wait on one another's decompression."""
        cs = self.store.chunk_size
        batches = list(self._batches(plan))
        chunks_of = [[int(c) for c in np.unique(pos // cs)] for pos, _ in batches]
        users: dict[int, list[int]] = {}  # chunk -> the batches that read it
        for b, need in enumerate(chunks_of):
            for c in need:
                users.setdefault(c, []).append(b)
        pending = {c: len(bs) for c, bs in users.items()}  # of those, the ones still to be assembled
        opened: dict[int, _OpenChunk] = {}
        lock = threading.Lock()
        local = threading.local()  # each pool thread's one-row scratch buffer (mirrored rows, unread rows)

        def chunk(c: int) -> "_OpenChunk":
            with lock:
                if c not in opened:
                    opened[c] = _OpenChunk(self.store, c, self.layers)
                return opened[c]

        def assemble(b: int):
            pos, flips = batches[b]
            parts = {c: chunk(c) for c in chunks_of[b]}
            batch = self._assemble_rows(parts, pos, flips, local, to_device, buffers)
            for c, part in parts.items():
                with lock:
                    pending[c] -= 1
                    last = pending[c] == 0
                    if last:
                        del opened[c]
                if last:  # every row of this chunk that the epoch reads is in: check its CRC, then let it go
                    part.finish(local)
            return batch

        assembled: dict[int, Future] = {}
        submitted = 0
        small_read: set[int] = set()
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="row-read")
        try:
            for b in range(len(batches)):
                # b goes out once every batch that reads one of its chunks is assembled (so those chunks are checked)
                wait = sorted({j for c in chunks_of[b] for j in users[c]})
                horizon = min(max(b + 1 + self.prefetch, wait[-1] + 1), len(batches))
                for j in range(submitted, horizon):
                    for c in chunks_of[j]:
                        if c not in small_read:  # first use of the chunk: its small arrays, ahead of the batch
                            small_read.add(c)
                            pool.submit(chunk(c).small)
                    assembled[j] = pool.submit(assemble, j)
                submitted = max(submitted, horizon)
                for j in wait:
                    if j >= b:  # (earlier ones were handed out already)
                        assembled[j].result()  # re-raises a read error or a failed CRC check
                if not put(assembled.pop(b).result()):
                    return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for part in opened.values():
                part.close()

    def _assemble_rows(self, parts: dict[int, "_OpenChunk"], pos: np.ndarray, flips: np.ndarray, local,
                       to_device: bool = True, buffers: "_Buffers | None" = None):
        """One streamed batch read row by row (`_stream_rows`): the values `_finish` gives a resident batch, bit
        for bit (with `device_finish`, once `_finish_on_device` has run). `buffers`: recycled batch memory
        (`host_batches(recycle=True)`)."""
        pin = self.device.type == "cuda"
        empty = buffers.take if buffers is not None else (lambda shape, dtype: torch.empty(shape, dtype=dtype,
                                                                                             pin_memory=pin))
        on_host = not self.device_finish  # flip and convert here; else copy the rows as stored
        first = next(iter(parts.values())).small()
        g, c_width = int(self.store.attrs["grid"]), int(self.store.attrs["width"])
        dtype = first["global"].dtype
        tokens = {k: empty((len(pos), g, g, c_width), dtype) for k in self.layers}
        glob = empty((len(pos), c_width), dtype)
        depth = None
        if "depth" in first:
            depth = empty((len(pos), *first["depth"].shape[1:]), torch.float32 if on_host else first["depth"].dtype)
        scale = self.store.depth_scale if depth is not None else None
        scratch = getattr(local, "row", None)
        if scratch is None or scratch.dtype != dtype or scratch.shape != (g, g, c_width):
            scratch = local.row = torch.empty((g, g, c_width), dtype=dtype)
        # Every copy here is numpy's on byte views: one thread, the GIL released. torch's copy_ and index_select
        # split a large copy over its intra-op OpenMP threads, and two pool threads doing that on two cores spent
        # more time spinning in OpenMP than copying (BENCHMARKS.md, issue 14).
        into = {k: byte_view(t) for k, t in tokens.items()}  # (B, g, g, 2C) uint8 views: rows are read into these
        glob_bytes, depth_np = byte_view(glob), (depth.numpy() if depth is not None else None)
        scratch_bytes = byte_view(scratch)
        cs = self.store.chunk_size
        smalls = {c: part.small() for c, part in parts.items()}
        small_np = {c: (byte_view(sm["global"]), sm["depth"].numpy() if depth is not None else None)
                    for c, sm in smalls.items()}
        for j, (p, flip) in enumerate(zip(pos, flips)):
            c, r = divmod(int(p), cs)
            part, (small_glob, small_depth) = parts[c], small_np[c]
            mirror = flip and on_host
            for k in self.layers:
                if mirror:  # the feature-space flip: the grid along its width (whole channel vectors move)
                    part.rows[k].read_into(r, scratch_bytes)
                    np.copyto(into[k][j], scratch_bytes[:, ::-1])
                else:
                    part.rows[k].read_into(r, into[k][j])
            np.copyto(glob_bytes[j], small_glob[r])
            if depth is not None and not on_host:
                np.copyto(depth_np[j], small_depth[r])
            elif depth is not None:  # stored -> metres straight into the batch row, mirrored on the way
                stored = small_depth[r]
                depth_metres(stored[:, ::-1] if flip else stored, scale, out=depth_np[j])
        batch = Batch({"tokens": tokens, "global": glob}, depth, pos, torch.from_numpy(flips.copy()))
        if not to_device:
            return batch
        return self._to_device(batch, finish=self.device_finish)

    def _stream_chunks(self, plan: EpochPlan, put) -> None:
        """The epoch's chunks, in visiting order, read and decompressed by `read_workers` threads, up to
        `read_ahead` chunks beyond those the current batch needs; each batch assembled in the same pool once its
        chunks are in, handed out in order; a chunk dropped after the last batch that uses it."""
        cs = self.store.chunk_size
        batches = list(self._batches(plan))
        last_use = {int(c): b for b, (pos, _) in enumerate(batches) for c in np.unique(pos // cs)}
        order = [int(c) for win in plan.windows for c in win if int(c) in last_use]  # chunks with a usable sample
        rank = {c: i for i, c in enumerate(order)}
        reads: dict[int, Future] = {}
        assembled: deque[Future] = deque()
        submitted = 0
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="chunk-read")
        try:
            for b, (pos, flips) in enumerate(batches):
                need = [int(c) for c in np.unique(pos // cs)]
                horizon = min(max(rank[c] for c in need) + 1 + self.read_ahead, len(order))
                for c in order[submitted:horizon]:
                    reads[c] = pool.submit(self.store.read_chunk, c, self.layers, flipped=self.exact_flips,
                                           raw_depth=True)
                submitted = max(submitted, horizon)
                parts = {c: reads[c].result() for c in need}
                for c in need:
                    if last_use[c] == b:
                        del reads[c]
                assembled.append(pool.submit(self._assemble, parts, pos, flips))
                while assembled and (assembled[0].done() or len(assembled) > self.prefetch):
                    if not put(assembled.popleft().result()):
                        return
            while assembled:
                if not put(assembled.popleft().result()):
                    return
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _assemble(self, parts: dict[int, dict], pos: np.ndarray, flips: np.ndarray):
        """One streamed batch from its chunks' reads (`raw_depth`): each sample's rows copied once into the batch
        (pinned when training on CUDA), mirrored on the way where flipped (tokens by a copy of the reversed
        columns straight into the batch row: one pass), the targets converted to metres once for the
        whole batch: the values `_finish` gives a resident batch, bit for bit."""
        pin = self.device.type == "cuda"
        first = next(iter(parts.values()))
        rows = lambda t, dtype=None: torch.empty((len(pos), *t.shape[1:]), dtype=dtype or t.dtype, pin_memory=pin)
        tokens = {k: rows(first["tokens"][k]) for k in self.layers}  # (B, g, g, C)
        glob = rows(first["global"])  # (B, C)
        raw = torch.empty((len(pos), *first["depth"].shape[1:]), dtype=torch.int16) if "depth" in first else None
        into = {k: byte_view(t) for k, t in tokens.items()}  # byte views, copied by numpy (see `_assemble_rows`)
        glob_bytes, raw_np = byte_view(glob), (raw.numpy() if raw is not None else None)
        cs = self.store.chunk_size
        for j, (p, flip) in enumerate(zip(pos, flips)):
            data, r = parts[int(p) // cs], int(p) % cs
            mirror = flip and not self.exact_flips  # a feature-space flip: the grid along its width
            source = "flipped_" if flip and self.exact_flips else ""  # the mirrored image's own features
            for k in self.layers:
                row = byte_view(data[source + "tokens"][k][r])  # (g, g, 2C) bytes
                np.copyto(into[k][j], row[:, ::-1] if mirror else row)
            np.copyto(glob_bytes[j], byte_view(data[source + "global"][r]))
            if raw_np is not None:
                stored = data["depth"][r].numpy()
                np.copyto(raw_np[j], stored[:, ::-1] if flip else stored)
        depth = None
        if raw is not None:  # (B, H, W) metres
            depth = rows(raw, torch.float32)
            depth_metres(raw.numpy(), self.store.depth_scale, out=depth.numpy())
        return self._to_device(Batch({"tokens": tokens, "global": glob}, depth, pos, torch.from_numpy(flips.copy())))

    def _to_device(self, batch: Batch, finish: bool = False):
        """On CUDA the copy runs on a side stream, so it overlaps the training step; `epoch` makes the consumer's
        stream wait for it. `finish`: the batch is as stored (`device_finish`); flip and convert it after the copy."""
        if self._copy_stream is None:
            moved = batch.to(self.device)
            return self._finish_on_device(moved, bool(batch.flipped.any())) if finish else moved
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device)
            if finish:
                moved = self._finish_on_device(moved, bool(batch.flipped.any()))
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return moved, event

    def _finish_on_device(self, batch: Batch, any_flip: bool) -> Batch:
        """A batch handed over as stored (`device_finish`) made what the host would have made, bit for bit: the
        flipped samples' token grids mirrored along their width, the targets' uint16 bits to float32 metres
        (`/ depth_scale`) and mirrored. Runs where the batch is; `any_flip` comes from the host's flags, so no
        host sync."""
        m = batch.flipped
        tokens = batch.features["tokens"]
        if any_flip:
            tokens = {k: torch.where(m[:, None, None, None], t.flip(2), t) for k, t in tokens.items()}
        depth = batch.depth
        if depth is not None:
            metres = (depth.to(torch.int32) & 0xFFFF).to(torch.float32)
            # A divisor tensor, not a Python scalar: CUDA turns a scalar divisor into a multiply by its reciprocal,
            # which is not bit-identical to the host's float32 division.
            metres = torch.div(metres, torch.full((), self.store.depth_scale, dtype=torch.float32,
                                                  device=metres.device))
            depth = torch.where(m[:, None, None], metres.flip(2), metres) if any_flip else metres
        return Batch({"tokens": tokens, "global": batch.features["global"]}, depth, batch.index, batch.flipped)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        plan = self.plan(epoch)
        items = _prefetched(lambda put: self._produce(plan, put), self.prefetch)
        if self._copy_stream is None:
            return items
        return self._on_current_stream(items)

    def _on_current_stream(self, items) -> Iterator[Batch]:
        for item in items:
            if isinstance(item, Batch):  # made on the default stream (resident on the GPU)
                yield item
                continue
            batch, event = item
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in [*batch.features["tokens"].values(), batch.features["global"], batch.depth, batch.flipped]:
                if t is not None and t.is_cuda:
                    t.record_stream(stream)  # the allocator must not reuse them while this stream reads them
            yield batch


class _OpenChunk:
    """One chunk being streamed row by row: its token arrays' files open (`ChunkRows`), its small arrays (CLS
    vectors, raw targets) read whole on first use by whichever thread needs them first."""

    def __init__(self, store: FeatureStore, c: int, layers: Sequence[int]):
        self.store, self.c, self.layers = store, c, layers
        self.rows: dict[int, ChunkRows] = {}
        try:
            for k in layers:
                self.rows[k] = store.chunk_rows(layer_key(k), c)
        except BaseException:
            self.close()
            raise
        self._small: dict | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.closed = False

    def small(self) -> dict:
        """Read once (by the pool task queued ahead, or whichever thread comes first); a failed read fails every
        later call the same way, so the batch that needs it re-raises what the read raised."""
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._small is None:
                try:
                    small = self.store.read_chunk(self.c, layers=(), raw_depth=True)
                except BaseException as err:
                    self._error = err
                    raise
                if self.closed:  # a read queued ahead that ran after the epoch stopped: keep nothing
                    return small
                self._small = small
            return self._small

    def finish(self, local) -> None:
        """Check every token array's CRC for this chunk (`ChunkRows.finish`), then release it (`close`)."""
        scratch = getattr(local, "row", None)
        try:
            for rows in self.rows.values():
                rows.finish(None if scratch is None else byte_view(scratch))
        finally:
            self.close()

    def close(self) -> None:
        """Close the files and drop the small arrays: an epoch holds only the chunks its batches in flight read."""
        for rows in self.rows.values():
            rows.close()
        self.closed = True
        self._small = None


class _Buffers:
    """Batch memory handed back and taken again (`host_batches(recycle=True)`): free tensors by shape and dtype.
    Memory a process keeps mapped costs nothing to write again; fresh memory costs the kernel a page fault per
    4 KiB on first touch, which on this VM made the streaming loader's kernel time twice its reads' (BENCHMARKS.md,
    issue 14)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def give(self, batch: Batch) -> None:
        with self._lock:
            for t in [*batch.features["tokens"].values(), batch.features["global"], batch.depth]:
                if t is not None:
                    self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


def _given_back(items: Iterator[Batch], buffers: _Buffers) -> Iterator[Batch]:
    """Yield each batch, and hand its memory back once the consumer asks for the next."""
    for batch in items:
        yield batch
        buffers.give(batch)


def _concat(parts: list[dict], layers: Sequence[int]) -> dict:
    """Store reads (or row selections of them) concatenated along the batch, without their "index"."""
    out = {}
    for key in parts[0]:
        if key == "index":
            continue
        if isinstance(parts[0][key], dict):
            out[key] = {k: torch.cat([p[key][k] for p in parts]) for k in layers}
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


# ---- from images (the reference approach) --------------------------------------------------------------------
class ImageBatches(Batches):
    """`feature_source: images`: the same batches as `CachedBatches`, computed on every step by decoding the
    images and running the frozen encoder. Flips happen on the pixels (the reference way).

    `index` is a planned split (`pipeline.extract.plan_split(...).index`): the same samples and views the cache
    holds, read by the same `pipeline.extract.load_view`, visited in the same order (`chunk_size` only shapes the
    shuffle, as for the cache)."""

    mode = "images"

    def __init__(
        self,
        index: dict,
        encoder,
        layers: Sequence[int],
        batch_size: int,
        *,
        split_file: str,
        layout: str,
        target_hw: tuple[int, int],
        chunk_size: int,
        train: bool = True,
        flip_p: float = 0.5,
        seed: int = 42,
        shuffle_window: int = 4,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        prefetch: int = 2,
        workers: int = 2,
        drop_last: bool = False,
    ):
        super().__init__(len(index["id"]), chunk_size, layers, batch_size, train=train, flip_p=flip_p, seed=seed,
                         shuffle_window=shuffle_window, device=device, prefetch=prefetch, drop_last=drop_last,
                         target_hw=target_hw)
        self.index = index
        self.encoder = encoder
        self.split_file, self.layout = split_file, layout
        self.autocast_dtype = autocast_dtype
        self.workers = workers

    def _view(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's view as uint8 RGB (h, w, 3) and its target (H, W) in metres, exactly as extraction builds
        them. Pixel augmentation per iteration would go after this."""
        from pipeline import datasets
        from pipeline.extract import load_view

        row = {k: v[i] for k, v in self.index.items()}
        view = datasets.View.from_record(row["view"], row["view_aug"])
        return load_view(datasets.sample_from_row(row, self.split_file), view, tuple(row["orig_hw"]), self.layout,
                         self.target_hw)

    def targets(self, max_samples: int) -> np.ndarray:
        return np.stack([self._view(i)[1] for i in range(min(self.n, max_samples))])

    def _load(self, pos: np.ndarray, flips: np.ndarray, pool: ThreadPoolExecutor) -> dict:
        images, depths = [], []
        for (image, depth), flip in zip(pool.map(lambda i: self._view(int(i)), pos), flips):
            if flip:
                image, depth = image[:, ::-1], depth[:, ::-1]
            images.append(np.ascontiguousarray(image))
            depths.append(np.ascontiguousarray(depth))
        return {
            "pixels": self.encoder.preprocess(images),  # (B, 3, S, S)
            "depth": torch.from_numpy(np.stack(depths)),  # (B, H, W)
            "index": pos, "flipped": torch.from_numpy(flips.copy()),
        }

    def _produce(self, plan: EpochPlan, put) -> None:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for pos, flips in self._batches(plan):
                if not put(self._load(pos, flips, pool)):
                    return

    def epoch(self, epoch: int) -> Iterator[Batch]:
        plan = self.plan(epoch)
        for raw in _prefetched(lambda put: self._produce(plan, put), self.prefetch):
            # The encoder runs here, in the training thread, on every step: this is the cost the cache removes.
            feats = self.encoder(raw["pixels"].to(self.device), self.layers, autocast_dtype=self.autocast_dtype)
            # The encoder runs under inference_mode; clone to ordinary tensors that autograd may save.
            features = {"tokens": {k: t.clone() for k, t in feats["tokens"].items()}, "global": feats["global"].clone()}
            yield Batch(features, raw["depth"].to(self.device), raw["index"], raw["flipped"])
