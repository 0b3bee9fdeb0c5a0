"""Batches for decoder training: from the feature cache (the fast path) or from images (the reference path).

    CachedBatches   Zarr store -> Batch(features={"tokens": {k: (B, g, g, C)}, "global": (B, C)},
                    depth (B, H, W), index, flipped): only the layers the variant reads; the whole cache
                    resident in RAM or on the GPU (`train.cache_device`), or streamed: whole chunks read by a pool
                    of threads (`FeatureStore.read_chunk`, Zarr's reads with their CRC-32C checks), a few chunks
                    ahead, and gathered into batches; batches pinned and copied to the GPU on a side stream.
                    Both build a batch the same way (`_finish`: one flip, the store's one depth decode).
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
from pipeline.store import FeatureStore, StoreError
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
    mirrored: Features | None = None  # the mirrored images' features (`CachedBatches(mirrored=True)`), unflipped

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        move = lambda t: (t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True)
        along = lambda f: None if f is None else {"tokens": {k: move(t) for k, t in f["tokens"].items()},
                                                  "global": None if f["global"] is None else move(f["global"])}
        return Batch(along(self.features), None if self.depth is None else move(self.depth), self.index,
                     move(self.flipped), along(self.mirrored))


def flip_features(features: Features, flips: torch.Tensor, mirrored: Features | None = None) -> Features:
    """The selected samples mirrored horizontally. In feature space every token grid is flipped along its width
    (dim 2 of (B, g, g, C)) and the global vector is unchanged; with `mirrored`, the mirrored images' own features
    (`views.flip = extract`, pixel flip TTA), those are taken instead. On the host by `_gather` (the loader's
    own path), on a device by `torch.where`."""
    if not bool(flips.any()):
        return features
    glob = features["global"]
    if glob.device.type == "cpu":
        rows = _flat({"tokens": features["tokens"], "global": glob})
        if mirrored is not None:
            rows.update(_flat({"flipped_tokens": mirrored["tokens"], "flipped_global": mirrored["global"]}))
        out = _gather(lambda p: (rows, p), np.arange(len(glob)), flips.numpy(), exact=mirrored is not None)
        return {"tokens": {k: out[f"tokens/{k}"] for k in features["tokens"]}, "global": out["global"]}
    m = flips.to(device=glob.device)
    if mirrored is not None:
        return {"tokens": {k: torch.where(m[:, None, None, None], mirrored["tokens"][k], t)
                           for k, t in features["tokens"].items()},
                "global": torch.where(m[:, None], mirrored["global"], glob)}
    return {"tokens": {k: torch.where(m[:, None, None, None], t.flip(2), t) for k, t in features["tokens"].items()},
            "global": glob}


def flip_targets(depth: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B, H, W) targets of the selected samples mirrored along their width."""
    if not bool(flips.any()):
        return depth
    if depth.device.type == "cpu":
        return _gather(lambda p: ({"depth": depth}, p), np.arange(len(depth)), flips.numpy())["depth"]
    m = flips.to(device=depth.device)
    return torch.where(m[:, None, None], depth.flip(2), depth)


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy view of the same shape (bfloat16, which numpy lacks, as its int16 bits)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _gather(rows_of, pos: np.ndarray, flips: np.ndarray | None = None, exact: bool = False,
            mirrored: bool = False, pin: bool = False) -> dict[str, torch.Tensor]:
    """A host batch {key: (B, ...)} of the samples at `pos`, mirrored where `flips`, with one copy a row:
    `rows_of(p)` gives (a flat dict of arrays: "tokens/<k>", "global", "depth", "flipped_..."; the row of p in
    it). A flipped sample's token grids and target are copied reversed along their width (axis 1 of a row), or,
    `exact`, its features come from the mirrored image's arrays; `mirrored`: those arrays are in the batch too.
    The copies are numpy's, one thread each with the GIL released: torch's copies of the same rows, which it
    splits over OpenMP threads, measured 10-100x slower inside the loader's pool threads (BENCHMARKS.md)."""
    first, _ = rows_of(int(pos[0]))
    keys = [k for k in first if mirrored or not k.startswith("flipped_")]
    out = {k: torch.empty((len(pos), *first[k].shape[1:]), dtype=first[k].dtype, pin_memory=pin) for k in keys}
    dst = {k: _np(t) for k, t in out.items()}
    for j, p in enumerate(pos):
        part, r = rows_of(int(p))
        flip = flips is not None and bool(flips[j])
        for k in keys:
            features = k == "global" or k.startswith("tokens/")
            src = _np(part["flipped_" + k if flip and exact and features else k])[r]
            mirror = flip and (k == "depth" or (not exact and k.startswith("tokens/")))
            np.copyto(dst[k][j], src[:, ::-1] if mirror else src)
    return out


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
    """Training (or validation, or evaluation) batches over one feature store.

        loader = CachedBatches(store, decoder.layers, batch_size=8, flip_p=0.5, seed=42)
        for batch in loader.epoch(e): decoder(batch.features) ...

    Batches arrive on `device`; tokens keep the store's dtype (float16/bfloat16) and the decoder casts them.
    `positions`: visit only these samples (evaluation: the test frames with ground truth); `mirrored=True` adds
    the mirrored images' features to every batch (`Batch.mirrored`, pixel flip TTA; stores with them only).
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
        positions: np.ndarray | None = None,
        mirrored: bool = False,
    ):
        usable = store.usable()
        if positions is not None:
            usable &= np.isin(np.arange(store.n), positions)
        super().__init__(store.n, store.chunk_size, layers, batch_size, train=train, flip_p=flip_p, seed=seed,
                         shuffle_window=shuffle_window, device=device, prefetch=prefetch, drop_last=drop_last,
                         target_hw=store.target_hw, usable=usable)
        self.store = store
        missing = sorted(set(self.layers) - set(store.layers))
        if missing:
            raise StoreError(f"the decoder reads layers {list(self.layers)}, but {store.url} holds only "
                             f"{list(store.layers)} (missing {missing}); add them to cache.layers and extract again")
        # A store extracted with views.flip = extract holds the mirrored images' features: flips use those.
        self.exact_flips = bool(train and self.flip_p > 0 and store.has_flipped)
        self.mirrored = mirrored
        self.reads_mirrored = self.exact_flips or mirrored
        self.mode = resolve_cache_device(cache_device, store_bytes(store, self.layers, self.reads_mirrored),
                                         self.device, memory_budget, memory_share, device_share)
        # Streaming: threads that read whole chunks (Zarr's reads, CRC checks and decompression release the GIL)
        # `read_ahead` chunks ahead of the batch being assembled (default: a window more than the threads).
        self.read_workers = read_workers or usable_cores()
        self.read_ahead = read_ahead if read_ahead is not None else self.read_workers + shuffle_window
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._resident: dict | None = None
        if self.mode in ("cpu", "cuda"):
            self._resident = self._load_all(torch.device(self.mode))
        log.info("%s: %d samples, layers %s, cache %s", store.url, self.n_usable, list(self.layers), self.mode)

    def targets(self, max_samples: int) -> np.ndarray:
        return self.store.read(slice(0, max_samples), layers=())["depth"].numpy()

    def _read(self, c: int) -> dict:
        """Chunk c as a dict of tensors: "tokens", "global", "depth" (metres), with mirrored features also
        "flipped_tokens", "flipped_global"."""
        part = self.store.read_chunk(c, self.layers, flipped=self.reads_mirrored)
        del part["index"]
        return part

    def _load_all(self, device: torch.device) -> dict:
        """The whole store (these layers) in tensors on `device`, position p at row p: allocated once, at their
        full size, and filled chunk by chunk (on CUDA through one pinned chunk), so the memory it takes is the
        cache's plus a chunk, not twice the cache's as reading every chunk and concatenating them would be.
        Checked first (`check_resident_memory`): a cache that cannot fit fails with the sizes, not by the kernel's
        out-of-memory killer."""
        store, cuda = self.store, device.type == "cuda"
        need = store_bytes(store, self.layers, self.reads_mirrored)
        check_resident_memory(store.url, need, device, -(-need // max(1, store.n_chunks)))
        data = staging = None
        for c in range(store.n_chunks):
            part = _flat(self._read(c))
            if data is None:
                data = {k: torch.empty((store.n, *t.shape[1:]), dtype=t.dtype, device=device) for k, t in part.items()}
                staging = ({k: torch.empty((store.chunk_size, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                            for k, t in part.items()} if cuda else None)
            a, b = store.chunk_range(c)
            for k, t in part.items():
                if cuda:  # host chunk -> pinned chunk -> its rows on the device; the pinned chunk reused after the wait
                    staging[k][:b - a].copy_(t)
                    data[k][a:b].copy_(staging[k][:b - a], non_blocking=True)
                else:
                    data[k][a:b] = t
            if cuda:
                torch.cuda.current_stream(device).synchronize()
        return data if data is not None else {}

    def _finish(self, rows: dict, pos: np.ndarray, flips: np.ndarray) -> Batch:
        """A batch from its rows (flat keys, see `_flat`), flipped where `flips` (`flip_features`)."""
        flipped = torch.from_numpy(flips.copy())
        tokens = {k: rows[f"tokens/{k}"] for k in self.layers}
        mirrored = None
        if self.reads_mirrored:
            mirrored = {"tokens": {k: rows[f"flipped_tokens/{k}"] for k in self.layers},
                        "global": rows["flipped_global"]}
        features = flip_features({"tokens": tokens, "global": rows["global"]}, flipped,
                                 mirrored if self.exact_flips else None)
        depth = flip_targets(rows["depth"], flipped) if "depth" in rows else None
        return self._to_device(Batch(features, depth, pos, flipped, mirrored if self.mirrored else None))

    def _host_batch(self, rows_of, pos: np.ndarray, flips: np.ndarray) -> Batch:
        """A batch gathered on the host from `rows_of` (see `_gather`), flipped as it is gathered."""
        rows = _gather(rows_of, pos, flips, self.exact_flips, self.mirrored, pin=self.device.type == "cuda")
        tokens = {k: rows[f"tokens/{k}"] for k in self.layers}
        mirrored = None
        if self.mirrored:
            mirrored = {"tokens": {k: rows[f"flipped_tokens/{k}"] for k in self.layers},
                        "global": rows["flipped_global"]}
        batch = Batch({"tokens": tokens, "global": rows["global"]}, rows.get("depth"), pos,
                      torch.from_numpy(flips.copy()), mirrored)
        return self._to_device(batch)

    def _produce(self, plan: EpochPlan, put) -> None:
        if self._resident is not None:
            on_host = self.mode == "cpu"
            for pos, flips in self._batches(plan):
                if on_host:
                    batch = self._host_batch(lambda p: (self._resident, p), pos, flips)
                else:  # resident on the GPU: rows selected and flipped there
                    at = torch.from_numpy(pos).to(self._resident["global"].device)
                    batch = self._finish({k: t.index_select(0, at) for k, t in self._resident.items()}, pos, flips)
                if not put(batch):
                    return
            return
        self._stream(plan, put)

    def _stream(self, plan: EpochPlan, put) -> None:
        """The epoch's chunks, in visiting order, read by `read_workers` threads, up to `read_ahead` chunks beyond
        those the current batch needs; each batch assembled in the same pool once its chunks are in, handed out in
        order; a chunk dropped after the last batch that uses it."""
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
                    reads[c] = pool.submit(self._read, c)
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

    def _assemble(self, parts: dict[int, dict], pos: np.ndarray, flips: np.ndarray) -> Batch:
        """One streamed batch: each sample's rows gathered from its chunk (one copy), then `_finish`."""
        cs = self.store.chunk_size
        flat = {c: _flat(part) for c, part in parts.items()}
        return self._host_batch(lambda p: (flat[p // cs], p % cs), pos, flips)

    def _to_device(self, batch: Batch):
        """On CUDA the copy runs on a side stream, so it overlaps the training step; `epoch` makes the consumer's
        stream wait for it."""
        if self._copy_stream is None:
            return batch.to(self.device)
        with torch.cuda.stream(self._copy_stream):
            moved = batch.to(self.device)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return moved, event

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
            for t in _tensors(batch):
                if t.is_cuda:
                    t.record_stream(stream)  # the allocator must not reuse them while this stream reads them
            yield batch


def _flat(part: dict) -> dict[str, torch.Tensor]:
    """A store read as one level of tensors: "tokens/<k>", "global", "depth", "flipped_tokens/<k>", ..."""
    out = {}
    for key, value in part.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": t for k, t in value.items()})
        else:
            out[key] = value
    return out


def _tensors(batch: Batch) -> list[torch.Tensor]:
    feats = [batch.features] + ([batch.mirrored] if batch.mirrored is not None else [])
    return ([t for f in feats for t in [*f["tokens"].values(), f["global"]]]
            + [t for t in (batch.depth, batch.flipped) if t is not None])


# ---- from images (the reference approach) --------------------------------------------------------------------
class ImageBatches(Batches):
    """`feature_source: images`: the same batches as `CachedBatches`, computed on every step by decoding the
    images and running the frozen encoder. Flips happen on the pixels (the reference way).

    `index` is a planned split (`pipeline.planning.plan_split(...).index`): the same samples and views the cache
    holds, read by the same `pipeline.planning.load_view`, visited in the same order (`chunk_size` only shapes the
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
        from pipeline.planning import load_view

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
