"""Batches for decoder training from the feature cache: a feature store -> `Batch`es of the layers one decoder
reads, the cache resident in RAM or on the GPU (`train.cache_device`) or streamed (whole chunks read by a pool of
threads a few chunks ahead, copied to the GPU on a side stream). `pipeline.image_batches` shares `Batches`.

For a seed every source visits the same samples in the same order with the same flips. Shuffling is chunk-aligned
(whole chunks in a random order, then samples shuffled within `shuffle_window` consecutive chunks), so reads stay
whole chunks while batches still mix several drives. The flip is done in feature space (docs/design.md): token
grids and target mirrored along their width, the global vector unchanged; ViT features are not exactly
flip-equivariant, so this approximates flipping the image, which `ImageBatches` does.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from pipeline.devices import usable_cores
from pipeline.memory import check_resident_memory, resolve_cache_device, store_bytes
from pipeline.store import FeatureStore, StoreError
from spaceclip.features import Features

log = logging.getLogger(__name__)


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
        return tree_map_only(torch.Tensor, lambda t: (t.pin_memory() if t.device.type == "cpu" else t).to(
            device, non_blocking=True), self)


def _where(m: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a` in the samples selected by `m` (B,), else `b`."""
    return torch.where(m.view(-1, *[1] * (b.dim() - 1)), a, b)


def flip_features(features: Features, flips: torch.Tensor, mirrored: Features | None = None) -> Features:
    """The selected samples mirrored horizontally: every token grid flipped along its width (dim 2 of
    (B, g, g, C)), the global vector unchanged; with `mirrored` (the mirrored images' own features, `views.flip =
    extract` or pixel flip TTA) those are taken instead. The loader's host batches are flipped as they are copied
    (`_gather`), to the same values."""
    if not bool(flips.any()):
        return features
    flips = flips.to(features["global"].device)
    if mirrored is not None:
        return {"tokens": {k: _where(flips, mirrored["tokens"][k], t) for k, t in features["tokens"].items()},
                "global": _where(flips, mirrored["global"], features["global"])}
    return {"tokens": {k: _where(flips, t.flip(2), t) for k, t in features["tokens"].items()},
            "global": features["global"]}


def _np(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy view of the same shape (bfloat16, which numpy lacks, as its int16 bits)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _gather(rows_of, pos: np.ndarray, flips: np.ndarray, exact: bool = False, mirrored: bool = False,
            pin: bool = False) -> dict[str, torch.Tensor]:
    """A host batch {key: (B, ...)} of the samples at `pos`, one copy a row: `rows_of(p)` gives (flat arrays as
    `CachedBatches._read` makes them, the row of p in them). Where `flips`, token grids and target are copied
    reversed along their width, or (`exact`) the features taken from the mirrored image's arrays; `mirrored`:
    those arrays are in the batch too. numpy's copies: torch's, over OpenMP threads, are 10-100x slower in the
    loader's pool threads (BENCHMARKS.md)."""
    first, _ = rows_of(int(pos[0]))
    keys = [k for k in first if mirrored or not k.startswith("flipped_")]
    out = {k: torch.empty((len(pos), *first[k].shape[1:]), dtype=first[k].dtype, pin_memory=pin) for k in keys}
    dst = {k: _np(t) for k, t in out.items()}
    for j, p in enumerate(pos):
        part, r = rows_of(int(p))
        for k in keys:
            features = k == "global" or k.startswith("tokens/")
            src = _np(part["flipped_" + k if flips[j] and exact and features else k])[r]
            mirror = flips[j] and (k == "depth" or (not exact and k.startswith("tokens/")))
            np.copyto(dst[k][j], src[:, ::-1] if mirror else src)
    return out


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """`items` produced in a background thread, at most `depth` ahead of the consumer. An exception there is raised
    here; leaving the loop early closes `items` once its current item is made."""
    end = object()
    pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
    ahead = deque(pool.submit(next, items, end) for _ in range(max(1, depth)))
    try:
        while (item := ahead.popleft().result()) is not end:
            ahead.append(pool.submit(next, items, end))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        items.close()


# ---- one base for both sources ------------------------------------------------------------------------------
class Batches(ABC):
    """The batches of one split for the layers one decoder reads: `len(loader)` steps an epoch, `loader.epoch(e)`
    the batches of epoch e in the order and with the flips of `loader.plan(e)`, made in a background thread.
    `train=False`: split order, no flips (validation). `mode`: `cpu` / `cuda` (the cache held resident), `stream`
    (read chunk by chunk) or `images`."""

    mode: str

    def __init__(
        self, n: int, chunk_size: int, layers: Sequence[int], batch_size: int, *, train: bool, flip_p: float,
        seed: int, shuffle_window: int, device: torch.device | str, prefetch: int, drop_last: bool,
        target_hw: tuple[int, int] | None, usable: np.ndarray | None = None,
    ):
        self.n, self.chunk_size, self.batch_size = n, chunk_size, int(batch_size)
        self.layers = tuple(sorted(int(k) for k in layers))
        self.train, self.flip_p, self.seed, self.shuffle_window = train, flip_p if train else 0.0, seed, shuffle_window
        self.device, self.prefetch, self.drop_last = torch.device(device), prefetch, drop_last
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
    def _produce(self, plan: EpochPlan) -> Iterator:
        """The epoch's batches (or what `epoch` makes them from), in order, made in the prefetch thread."""

    def epoch(self, epoch: int) -> Iterator[Batch]:
        return _prefetched(self._produce(self.plan(epoch)), self.prefetch)

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
    the mirrored images' features to every batch (`Batch.mirrored`, pixel flip TTA; stores with them only)."""

    def __init__(
        self, store: FeatureStore, layers: Sequence[int], batch_size: int, *, train: bool = True, flip_p: float = 0.5,
        seed: int = 42, shuffle_window: int = 4, cache_device: str = "auto", device: torch.device | str = "cpu",
        prefetch: int = 4, memory_budget: int | None = None, memory_share: int = 1, device_share: int = 1,
        drop_last: bool = False, read_workers: int | None = None, read_ahead: int | None = None,
        positions: np.ndarray | None = None, mirrored: bool = False,
    ):
        usable = store.usable()
        if positions is not None:
            usable &= np.isin(np.arange(store.n), positions)
        super().__init__(store.n, store.chunk_size, layers, batch_size, train=train, flip_p=flip_p, seed=seed,
                         shuffle_window=shuffle_window, device=device, prefetch=prefetch, drop_last=drop_last,
                         target_hw=store.target_hw, usable=usable)
        self.store = store
        if missing := sorted(set(self.layers) - set(store.layers)):
            raise StoreError(f"the decoder reads layers {list(self.layers)}, but {store.url} holds only "
                             f"{list(store.layers)} (missing {missing}); add them to cache.layers and extract again")
        # A store extracted with views.flip = extract holds the mirrored images' features: flips use those.
        self.exact_flips = bool(train and self.flip_p > 0 and store.has_flipped)
        self.mirrored, self.reads_mirrored = mirrored, self.exact_flips or mirrored
        self.mode = resolve_cache_device(cache_device, store_bytes(store, self.layers, self.reads_mirrored),
                                         self.device, memory_budget, memory_share, device_share)
        # Streaming: threads that read whole chunks (Zarr's reads, CRC checks and decompression release the GIL)
        # `read_ahead` chunks ahead of the batch being assembled (default: a window more than the threads).
        self.read_workers = read_workers or usable_cores()
        self.read_ahead = read_ahead if read_ahead is not None else self.read_workers + shuffle_window
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._resident = self._load_all(torch.device(self.mode)) if self.mode in ("cpu", "cuda") else None
        log.info("%s: %d samples, layers %s, cache %s", store.url, self.n_usable, list(self.layers), self.mode)

    def targets(self, max_samples: int) -> np.ndarray:
        return self.store.read(slice(0, max_samples), layers=())["depth"].numpy()

    def _read(self, c: int) -> dict[str, torch.Tensor]:
        """Chunk c as one level of tensors: "tokens/<k>", "global", "depth" (metres), with mirrored features also
        "flipped_tokens/<k>", "flipped_global"."""
        part = self.store.read_chunk(c, self.layers, flipped=self.reads_mirrored)
        del part["index"]
        flat = {}
        for key, v in part.items():
            flat.update({f"{key}/{k}": t for k, t in v.items()} if isinstance(v, dict) else {key: v})
        return flat

    def _load_all(self, device: torch.device) -> dict:
        """The whole store (these layers) in tensors on `device`, position p at row p, allocated once and filled
        chunk by chunk (on CUDA through one pinned chunk): the cache's memory plus a chunk, not twice the cache's.
        Checked first (`check_resident_memory`): one that cannot fit fails with the sizes, not by the OOM killer."""
        store, cuda = self.store, device.type == "cuda"
        need = store_bytes(store, self.layers, self.reads_mirrored)
        check_resident_memory(store.url, need, device, -(-need // max(1, store.n_chunks)))
        data = staging = None
        for c in range(store.n_chunks):
            part = self._read(c)
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
        return data or {}

    def _batch(self, rows: dict, pos: np.ndarray, flips: np.ndarray) -> Batch:
        """A batch of flat rows (see `_read`); its `mirrored` features where the rows hold them."""
        mirrored = {"tokens": {k: rows[f"flipped_tokens/{k}"] for k in self.layers},
                    "global": rows["flipped_global"]} if "flipped_global" in rows else None
        features = {"tokens": {k: rows[f"tokens/{k}"] for k in self.layers}, "global": rows["global"]}
        return Batch(features, rows.get("depth"), pos, torch.from_numpy(flips.copy()), mirrored)

    def _host_batch(self, rows_of, pos: np.ndarray, flips: np.ndarray):
        """(a batch gathered and flipped on the host by `_gather`, moved to `device`; on CUDA on a side stream,
        overlapping the training step, with the event `epoch` makes the consumer's stream wait for)."""
        batch = self._batch(_gather(rows_of, pos, flips, self.exact_flips, self.mirrored,
                                    pin=self.device.type == "cuda"), pos, flips)
        if self._copy_stream is None:
            return batch.to(self.device), None
        with torch.cuda.stream(self._copy_stream):
            return batch.to(self.device), self._copy_stream.record_event()

    def _produce(self, plan: EpochPlan) -> Iterator:
        if self._resident is None:
            yield from self._stream(plan)
            return
        for pos, flips in self._batches(plan):
            if self.mode == "cpu":
                yield self._host_batch(lambda p: (self._resident, p), pos, flips)
                continue
            # resident on the GPU: rows selected and flipped there
            at = torch.from_numpy(pos).to(self._resident["global"].device)
            batch = self._batch({k: t.index_select(0, at) for k, t in self._resident.items()}, pos, flips)
            m = batch.flipped.to(at.device)
            features = flip_features(batch.features, m, batch.mirrored if self.exact_flips else None)
            depth = None if batch.depth is None else _where(m, batch.depth.flip(2), batch.depth)
            yield batch._replace(features=features, depth=depth, flipped=m,
                                 mirrored=batch.mirrored if self.mirrored else None), None

    def _stream(self, plan: EpochPlan) -> Iterator:
        """The epoch's chunks read in visiting order by `read_workers` threads, up to `read_ahead` chunks beyond those
        the current batch needs; each batch assembled in the same pool, handed out in order."""
        cs = self.store.chunk_size
        batches = list(self._batches(plan))
        last_use = {int(c): b for b, (pos, _) in enumerate(batches) for c in np.unique(pos // cs)}
        order = [int(c) for win in plan.windows for c in win if int(c) in last_use]  # chunks with a usable sample
        rank = {c: i for i, c in enumerate(order)}
        reads, assembled, submitted = {}, deque(), 0
        pool = ThreadPoolExecutor(self.read_workers, thread_name_prefix="chunk-read")
        try:
            for b, (pos, flips) in enumerate(batches):
                need = [int(c) for c in np.unique(pos // cs)]
                horizon = min(max(rank[c] for c in need) + 1 + self.read_ahead, len(order))
                reads.update({c: pool.submit(self._read, c) for c in order[submitted:horizon]})
                submitted = max(submitted, horizon)
                parts = {c: (reads.pop(c) if last_use[c] == b else reads[c]).result() for c in need}
                assembled.append(pool.submit(self._host_batch, lambda p, parts=parts: (parts[p // cs], p % cs),
                                             pos, flips))
                while assembled and (assembled[0].done() or len(assembled) > self.prefetch):
                    yield assembled.popleft().result()
            while assembled:
                yield assembled.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        with contextlib.closing(super().epoch(epoch)) as items:
            for batch, moved in items:
                if moved is not None:  # copied on the side stream: this stream waits for it
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(moved)
                    for t in tree_leaves(batch):
                        if isinstance(t, torch.Tensor) and t.is_cuda:
                            t.record_stream(stream)  # the allocator must not reuse them while this stream reads them
                yield batch
