"""Batches for decoder training: from the feature cache (the fast path) or from images (the reference path).

    CachedBatches   Zarr store -> {"tokens": {k: (B, g, g, C)}, "global": (B, C), "depth": (B, H, W), ...}
                    only the layers the variant reads; whole-chunk reads; background prefetch; optionally the
                    whole cache resident in RAM or on the GPU (`train.cache_device`).
    ImageBatches    the same batches, but images are decoded and the frozen encoder runs on every step. It is
                    the honest baseline the cache is measured against, and the place where pixel-space
                    augmentation (colour, rotation) could go.

Both follow one `epoch_plan`, so for a seed they visit the same samples in the same order with the same flips.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.store import FeatureStore, StoreError

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


def flip_batch(batch: dict, flips: torch.Tensor) -> dict:
    """Flip the selected samples horizontally: every token grid along its width (dim 2 of (B, g, g, C)) and the
    target along its width (dim 2 of (B, H, W)). In feature space the global vector is unchanged; when the batch
    carries the mirrored images' exact features ("flipped_tokens", "flipped_global": `views.flip = extract`),
    those are taken instead."""
    exact_tokens, exact_global = batch.pop("flipped_tokens", None), batch.pop("flipped_global", None)
    if not bool(flips.any()):
        return batch
    m = flips.to(device=batch["global"].device)
    if exact_tokens is not None:
        batch["tokens"] = {k: torch.where(m[:, None, None, None], exact_tokens[k], t)
                           for k, t in batch["tokens"].items()}
        batch["global"] = torch.where(m[:, None], exact_global, batch["global"])
    else:
        batch["tokens"] = {k: torch.where(m[:, None, None, None], t.flip(2), t) for k, t in batch["tokens"].items()}
    if "depth" in batch:
        batch["depth"] = torch.where(m[:, None, None], batch["depth"].flip(2), batch["depth"])
    return batch


def batch_to(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    move = lambda t: (t.pin_memory() if t.device.type == "cpu" else t).to(device, non_blocking=True)
    out = dict(batch)
    out["tokens"] = {k: move(t) for k, t in batch["tokens"].items()}
    for key in ("global", "depth", "flipped"):
        if key in batch:
            out[key] = move(batch[key])
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
def store_bytes(store: FeatureStore, layers: Sequence[int]) -> int:
    """Bytes a resident copy of these layers + global vector + float32 targets takes."""
    g, c = int(store.attrs["grid"]), int(store.attrs["width"])
    per = (len(layers) * g * g * c + c) * 2
    if store.has_depth:
        h, w = store.group["depth"].shape[1:]
        per += h * w * 4
    return store.n * per


def resolve_cache_device(mode: str, need: int, device: torch.device, budget: int | None = None) -> str:
    """`auto` -> `cuda` when the cache fits in the GPU budget, else `cpu` when it fits in the RAM budget,
    else `stream`. Explicit modes are checked for possibility only."""
    if mode == "cuda" and device.type != "cuda":
        raise ValueError("train.cache_device is 'cuda' but training runs on the CPU; use auto, cpu or stream")
    if mode != "auto":
        return mode
    if device.type == "cuda":
        gpu_budget = budget if budget is not None else int(torch.cuda.mem_get_info(device)[0] * GPU_BUDGET_FRACTION)
        if need <= gpu_budget:
            return "cuda"
    import psutil

    ram_budget = budget if budget is not None else int(psutil.virtual_memory().available * CPU_BUDGET_FRACTION)
    return "cpu" if need <= ram_budget else "stream"


class CachedBatches:
    """Training (or validation) batches over one feature store, for the layers one decoder reads.

        loader = CachedBatches(store, decoder.layers, batch_size=8, flip_p=0.5, seed=42)
        for batch in loader.epoch(e): ...   # {"tokens", "global", "depth", "index", "flipped"}

    `train=False` visits samples in store order without flips (validation). Batches arrive on `device`; tokens
    keep the store's dtype (float16/bfloat16) and the decoder casts them.
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
        drop_last: bool = False,
    ):
        self.store = store
        self.layers = tuple(sorted(int(k) for k in layers))
        missing = sorted(set(self.layers) - set(store.layers))
        if missing:
            raise StoreError(f"the decoder reads layers {list(self.layers)}, but {store.url} holds only "
                             f"{list(store.layers)} (missing {missing}); add them to cache.layers and extract again")
        self.batch_size = int(batch_size)
        self.train = train
        self.flip_p = flip_p if train else 0.0
        self.seed = seed
        self.shuffle_window = shuffle_window
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.drop_last = drop_last
        # A store extracted with views.flip = extract holds the mirrored images' features: flips use those.
        self.exact_flips = bool(train and self.flip_p > 0 and store.has_flipped)
        self.usable = ~store.group["skipped"][:].astype(bool) if store.n else np.zeros(0, bool)
        self.n_usable = int(self.usable.sum())
        self.target_hw = tuple(store.group["depth"].shape[1:]) if store.has_depth else None
        self.mode = resolve_cache_device(cache_device, store_bytes(store, self.layers), self.device, memory_budget)
        self._resident: dict | None = None
        if self.mode in ("cpu", "cuda"):
            self._resident = self._load_all(torch.device(self.mode))
        log.info("%s: %d samples, layers %s, cache %s", store.url, self.n_usable, list(self.layers), self.mode)

    def __len__(self) -> int:
        full, rest = divmod(self.n_usable, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.store.n, self.store.chunk_size, epoch, seed=self.seed, shuffle=self.train,
                          shuffle_window=self.shuffle_window, flip_p=self.flip_p, usable=self.usable)

    def _read_chunks(self, chunks: Sequence[int]) -> dict:
        """Whole chunks, concatenated in the given order (the store's unit of compression: large reads)."""
        parts = [self.store.read_chunk(int(c), self.layers, flipped=self.exact_flips) for c in chunks]
        out = {
            "tokens": {k: torch.cat([p["tokens"][k] for p in parts]) for k in self.layers},
            "global": torch.cat([p["global"] for p in parts]),
            "index": np.concatenate([p["index"] for p in parts]),
        }
        if self.target_hw is not None:
            out["depth"] = torch.cat([p["depth"] for p in parts])
        if self.exact_flips:
            out["flipped_tokens"] = {k: torch.cat([p["flipped_tokens"][k] for p in parts]) for k in self.layers}
            out["flipped_global"] = torch.cat([p["flipped_global"] for p in parts])
        return out

    def _load_all(self, device: torch.device) -> dict:
        data = self._read_chunks(range(self.store.n_chunks))  # position p sits at row p
        if device.type != "cpu":
            data = batch_to(data, device)
        return data

    @staticmethod
    def _gather(data: dict, rows: torch.Tensor) -> dict:
        rows = rows.to(data["global"].device)
        out = {
            "tokens": {k: t.index_select(0, rows) for k, t in data["tokens"].items()},  # (B, g, g, C)
            "global": data["global"].index_select(0, rows),  # (B, C)
        }
        if "depth" in data:
            out["depth"] = data["depth"].index_select(0, rows)  # (B, H, W)
        if "flipped_tokens" in data:
            out["flipped_tokens"] = {k: t.index_select(0, rows) for k, t in data["flipped_tokens"].items()}
            out["flipped_global"] = data["flipped_global"].index_select(0, rows)
        return out

    def _batches(self, plan: EpochPlan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        bs = self.batch_size
        for start in range(0, len(plan.order), bs):
            pos = plan.order[start:start + bs]
            if len(pos) < bs and self.drop_last:
                return
            yield pos, plan.flips[start:start + bs]

    def _finish(self, parts: list[dict], pos: np.ndarray, flips: np.ndarray) -> dict:
        batch = parts[0] if len(parts) == 1 else {
            "tokens": {k: torch.cat([p["tokens"][k] for p in parts]) for k in self.layers},
            "global": torch.cat([p["global"] for p in parts]),
            **({"depth": torch.cat([p["depth"] for p in parts])} if self.target_hw is not None else {}),
            **({"flipped_tokens": {k: torch.cat([p["flipped_tokens"][k] for p in parts]) for k in self.layers},
                "flipped_global": torch.cat([p["flipped_global"] for p in parts])} if self.exact_flips else {}),
        }
        batch["index"] = pos
        batch["flipped"] = torch.from_numpy(flips.copy())
        batch = flip_batch(batch, batch["flipped"])
        return batch_to(batch, self.device)

    def _produce(self, plan: EpochPlan, put) -> None:
        if self._resident is not None:
            for pos, flips in self._batches(plan):
                if not put(self._finish([self._gather(self._resident, torch.from_numpy(pos))], pos, flips)):
                    return
            return
        # Streaming: read a window of whole chunks, serve its samples, drop it. A batch that straddles two
        # windows is assembled from both.
        window_of = np.full(self.store.n, -1, np.int64)
        row_in = np.zeros(self.store.n, np.int64)
        for w, win in enumerate(plan.windows):
            pos = np.concatenate([np.arange(*self.store.chunk_range(int(c))) for c in win])
            window_of[pos], row_in[pos] = w, np.arange(len(pos))
        loaded: dict[int, dict] = {}
        for pos, flips in self._batches(plan):
            wins = window_of[pos]
            for w in np.unique(wins):
                if w not in loaded:
                    loaded[w] = self._read_chunks(plan.windows[w])
            parts, start = [], 0
            while start < len(pos):  # runs of one window, in batch order
                end = start
                while end < len(pos) and wins[end] == wins[start]:
                    end += 1
                parts.append(self._gather(loaded[wins[start]], torch.from_numpy(row_in[pos[start:end]])))
                start = end
            for w in [w for w in loaded if w < wins.min()]:
                del loaded[w]
            if not put(self._finish(parts, pos, flips)):
                return

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of one epoch (0-based), prefetched in a background thread."""
        plan = self.plan(epoch)
        return _prefetched(lambda put: self._produce(plan, put), self.prefetch)


# ---- from images (the reference approach) --------------------------------------------------------------------
def _decode_row(row: dict, split_file: str, layout: str, target_hw) -> tuple[np.ndarray, np.ndarray]:
    """One sample's view as uint8 RGB (H, W, 3) and its target (th, tw) float32 metres, exactly as extraction
    builds it (same view, same nearest-neighbour target resize). Pixel augmentation would go after this."""
    from pipeline import datasets
    from pipeline.extract import resize_depth

    sample = datasets.sample_from_row(row, split_file)
    view = datasets.View(*(int(v) for v in row["view"]))
    image = datasets.apply_view(datasets.load_image(sample), view)
    gt = datasets.load_depth(sample, layout)
    depth = np.zeros(target_hw, np.float32) if gt is None else resize_depth(datasets.apply_view(gt, view), target_hw)
    return image, depth


class ImageBatches:
    """`feature_source: images`: the same batches as `CachedBatches`, computed on every step by decoding the
    images and running the frozen encoder. Flips happen on the pixels (the reference way).

    `index` is a planned split (`pipeline.extract.plan_split(...).index`): the same samples and views the cache
    holds, visited in the same order (`chunk_size` only shapes the shuffle, as for the cache)."""

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
        self.index = index
        self.n = len(index["id"])
        self.encoder = encoder
        self.layers = tuple(sorted(int(k) for k in layers))
        self.batch_size = int(batch_size)
        self.split_file, self.layout, self.target_hw = split_file, layout, tuple(target_hw)
        self.chunk_size = chunk_size
        self.train = train
        self.flip_p = flip_p if train else 0.0
        self.seed, self.shuffle_window = seed, shuffle_window
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.prefetch, self.workers, self.drop_last = prefetch, workers, drop_last
        self.n_usable = self.n
        self.mode = "images"

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.n, self.chunk_size, epoch, seed=self.seed, shuffle=self.train,
                          shuffle_window=self.shuffle_window, flip_p=self.flip_p)

    def _row(self, i: int) -> dict:
        return {k: v[i] for k, v in self.index.items()}

    def target(self, i: int) -> np.ndarray:
        """Sample i's training target (H, W) in metres, 0 = invalid."""
        return _decode_row(self._row(i), self.split_file, self.layout, self.target_hw)[1]

    def _load(self, pos: np.ndarray, flips: np.ndarray, pool: ThreadPoolExecutor) -> dict:
        loaded = list(pool.map(lambda i: _decode_row(self._row(int(i)), self.split_file, self.layout,
                                                     self.target_hw), pos))
        images, depths = [], []
        for (image, depth), flip in zip(loaded, flips):
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
        bs = self.batch_size
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for start in range(0, len(plan.order), bs):
                pos, flips = plan.order[start:start + bs], plan.flips[start:start + bs]
                if len(pos) < bs and self.drop_last:
                    return
                if not put(self._load(pos, flips, pool)):
                    return

    def epoch(self, epoch: int) -> Iterator[dict]:
        plan = self.plan(epoch)
        for raw in _prefetched(lambda put: self._produce(plan, put), self.prefetch):
            # The encoder runs here, in the training thread, on every step: this is the cost the cache removes.
            feats = self.encoder(raw["pixels"].to(self.device), self.layers, autocast_dtype=self.autocast_dtype)
            # The encoder runs under inference_mode; clone to ordinary tensors that autograd may save.
            yield {"tokens": {k: t.clone() for k, t in feats["tokens"].items()}, "global": feats["global"].clone(),
                   "depth": raw["depth"].to(self.device),
                   "index": raw["index"], "flipped": raw["flipped"]}
