"""The reference path of training (`feature_source: images`): the same batches as the feature cache's
(`pipeline.loader.CachedBatches`, one `epoch_plan`), the images decoded and the frozen encoder run on every step:
the honest baseline the cache is measured against, and where pixel-space augmentation could go.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.loader import Batch, Batches, EpochPlan


class ImageBatches(Batches):
    """`feature_source: images`: the same batches as `CachedBatches`, the images decoded and the frozen encoder run
    on every step, flipped on the pixels. `index`: a planned split (`plan_split(...).index`), read by the same
    `load_view` as extraction (`chunk_size` only shapes the shuffle, as for the cache)."""

    mode = "images"

    def __init__(
        self, index: dict, encoder, layers: Sequence[int], batch_size: int, *, split_file: str, layout: str,
        target_hw: tuple[int, int], chunk_size: int, train: bool = True, flip_p: float = 0.5, seed: int = 42,
        shuffle_window: int = 4, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
        prefetch: int = 2, workers: int = 2, drop_last: bool = False,
    ):
        super().__init__(len(index["id"]), chunk_size, layers, batch_size, train=train, flip_p=flip_p, seed=seed,
                         shuffle_window=shuffle_window, device=device, prefetch=prefetch, drop_last=drop_last,
                         target_hw=target_hw)
        self.index, self.encoder, self.autocast_dtype, self.workers = index, encoder, autocast_dtype, workers
        self.split_file, self.layout = split_file, layout

    def _view(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's view as uint8 RGB (h, w, 3) and its target (H, W) in metres, as extraction builds them."""
        from pipeline import datasets
        from pipeline.planning import load_view

        row = {k: v[i] for k, v in self.index.items()}
        view = datasets.View.from_record(row["view"], row["view_aug"])
        return load_view(datasets.sample_from_row(row, self.split_file), view, tuple(row["orig_hw"]), self.layout,
                         self.target_hw)

    def targets(self, max_samples: int) -> np.ndarray:
        return np.stack([self._view(i)[1] for i in range(min(self.n, max_samples))])

    def _produce(self, plan: EpochPlan) -> Iterator[dict]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for pos, flips in self._batches(plan):
                images, depths = [], []
                for (image, depth), flip in zip(pool.map(lambda i: self._view(int(i)), pos), flips):
                    images.append(np.ascontiguousarray(image[:, ::-1] if flip else image))
                    depths.append(np.ascontiguousarray(depth[:, ::-1] if flip else depth))
                yield {"pixels": self.encoder.preprocess(images),  # (B, 3, S, S)
                       "depth": torch.from_numpy(np.stack(depths)),  # (B, H, W)
                       "index": pos, "flipped": torch.from_numpy(flips.copy())}

    def epoch(self, epoch: int) -> Iterator[Batch]:
        with contextlib.closing(super().epoch(epoch)) as items:
            for raw in items:
                # The encoder runs here, in the training thread, on every step: the cost the cache removes.
                feats = self.encoder(raw["pixels"].to(self.device), self.layers, autocast_dtype=self.autocast_dtype)
                # The encoder runs under inference_mode; clone to ordinary tensors that autograd may save.
                yield Batch({"tokens": {k: t.clone() for k, t in feats["tokens"].items()},
                             "global": feats["global"].clone()}, raw["depth"].to(self.device), raw["index"],
                            raw["flipped"])
