"""What a split's store holds: the planned samples and views (`plan_split`, from the split file and the image
headers alone) and what its store is created with (`store_spec`), and how one planned view is made from its files
(`load_view`), for extraction and for the images source of training (`pipeline.image_batches.ImageBatches`) alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import datasets
from pipeline.config import Config, dump_config
from pipeline.devices import encoder_settings
from pipeline.datasets import DatasetError, Sample, View
from pipeline.fingerprint import data_roots
from pipeline.layout import SPLITS, RunContext, package_versions
from pipeline.store import StoreError, StoreSpec

log = logging.getLogger(__name__)


def view_config_for(cfg: Config, split: str):
    """Train: the configured views. Val: one deterministic centred view of the same size (checkpoint selection
    must not depend on random crops or augmentation). Test: the full frame, handled by `make_views(train=False)`."""
    if split == "val":  # un-augmented, one view per frame
        update = {"rotation_deg": 0.0, "color": None, "views_per_image": 1}
        if cfg.views.mode == "random":
            update["mode"] = "center"
        return cfg.views.model_copy(update=update)
    return cfg.views


# ---- planning -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    split: str
    index: dict  # the store's index columns (`pipeline.store.INDEX_FIELDS`), one row per view
    target_hw: tuple[int, int] | None  # training targets' (H, W); None for the test split
    skipped: list[dict]  # frames whose image could not be read ({"id", "line", "reason"}; data.on_error = skip)


def plan_split(cfg: Config, split: str) -> Plan:
    """Which frames and views a split's store holds, from the split file and the image headers alone."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    samples = datasets.read_split(cfg.data, split)
    trains = split != "test"
    views_cfg = view_config_for(cfg, split)
    rows: dict[str, list] = {k: [] for k in ("id", "image_path", "depth_path", "focal", "orig_hw", "view", "group",
                                              "line", "view_aug")}
    skipped = []
    for s in samples:
        try:
            w, h = _image_size(s)
        except DatasetError as err:
            if cfg.data.on_error == "raise":
                raise
            skipped.append({"id": s.id, "line": s.line, "reason": str(err)})
            log.warning("skipping %s: %s", s.id, err)
            continue
        for v in datasets.make_views(s.id, (h, w), views_cfg, cfg.data.layout, train=trains):
            rows["id"].append(s.id if not trains or views_cfg.views_per_image == 1 else f"{s.id}#v{v.k}")
            rows["image_path"].append(str(s.image_path))
            rows["depth_path"].append("" if s.depth_path is None else str(s.depth_path))
            rows["focal"].append(s.focal)
            rows["orig_hw"].append((h, w))
            rows["view"].append((v.k, v.top, v.left, v.height, v.width))
            rows["view_aug"].append(v.augmentation)  # (angle, gamma, brightness, gains): the view is recomputable
            rows["group"].append(s.group)
            rows["line"].append(s.line)
    index = {
        "id": np.array(rows["id"], dtype=str), "image_path": np.array(rows["image_path"], dtype=str),
        "depth_path": np.array(rows["depth_path"], dtype=str), "focal": np.array(rows["focal"], np.float64),
        "orig_hw": np.array(rows["orig_hw"], np.int32).reshape(-1, 2),
        "view": np.array(rows["view"], np.int32).reshape(-1, 5), "group": np.array(rows["group"], dtype=str),
        "line": np.array(rows["line"], np.int32),
        "view_aug": np.array(rows["view_aug"], np.float64).reshape(-1, 6),
    }
    target_hw = None
    if trains:
        target_hw = cfg.cache.target_size
        sizes = {tuple(v[3:5]) for v in rows["view"]}
        if target_hw is None and len(sizes) > 1:
            raise StoreError(
                f"{split} views have different sizes {sorted(sizes)[:4]}...; set cache.target_size (H, W) or use a "
                "fixed views.crop_size so that training targets share one shape"
            )
        target_hw = tuple(target_hw) if target_hw else (next(iter(sizes)) if sizes else (1, 1))
    return Plan(split, index, target_hw, skipped)


def store_spec(ctx: RunContext, split: str, plan: Plan) -> StoreSpec:
    """What a planned split's store is created with, its attributes recording where its bytes come from."""
    cfg, identity, inputs = ctx.cfg, ctx.encoder_identity, ctx.fingerprint_inputs(split)
    # The mirrored images' features: for training flips (views.flip = extract) or pixel-space flip TTA on test.
    flipped = (split == "train" and cfg.views.flip == "extract") or (split == "test" and cfg.pixel_flip_tta)
    return StoreSpec(
        n=len(plan.index["id"]), layers=cfg.cache_layers, grid=identity["grid"], width=identity["width"],
        dtype=cfg.cache.dtype, chunk_size=cfg.cache.chunk_size, compressor=cfg.cache.compressor,
        level=cfg.cache.compression_level, target_hw=plan.target_hw,
        depth_scale=datasets.DEPTH_SCALE[cfg.data.layout], flipped=flipped,
        attrs={
            "fingerprint": ctx.fingerprint(split), "fingerprint_inputs": inputs, "split": split,
            "config": dump_config(cfg), "versions": package_versions(), "format_version": inputs["format_version"],
            "encoder": identity, "skipped_at_planning": plan.skipped,
            "split_file": cfg.data.test_split if split == "test" else cfg.data.train_split,
            "depth_range": list(cfg.data.depth_range), "layout": cfg.data.layout,
            "data_roots": data_roots(cfg, split),  # compared on reuse (`source_changes`)
            "extraction": encoder_settings(cfg.encoder).describe(),  # device, batch, autocast, TF32
        },
    )


def _image_size(s: Sample) -> tuple[int, int]:
    """(W, H) from the image header alone; decoding happens in the chunk workers."""
    where = f"(line {s.line} of {s.split_file})"
    if not Path(s.image_path).is_file():
        raise DatasetError(f"image file missing: {s.image_path} {where}")
    try:
        with Image.open(s.image_path) as im:
            return im.size
    except Exception as err:
        raise DatasetError(f"image file unreadable: {s.image_path} {where}: {err}") from None


def load_view(sample: Sample, view: View, orig_hw: tuple[int, int], layout: str,
              target_hw: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """One planned view of a frame as the encoder sees it: the (h, w, 3) uint8 crop with its recorded augmentation
    (rotation of the frame, image and depth alike; colour), and its training target (target_hw) in metres, 0 =
    invalid (None without `target_hw`). Extraction and the images source (`ImageBatches`) both read views here."""
    image = datasets.load_image(sample)
    if image.shape[:2] != tuple(orig_hw):
        raise DatasetError(f"image {sample.image_path} is {image.shape[1]}x{image.shape[0]}, but was "
                           f"{orig_hw[1]}x{orig_hw[0]} when the store was planned (line {sample.line})")
    gt = datasets.load_depth(sample, layout) if target_hw is not None else None
    crop, gt_crop = datasets.augmented_view(image, gt, view)
    depth = None
    if target_hw is not None:
        depth = np.zeros(target_hw, np.float32) if gt_crop is None else resize_depth(gt_crop, target_hw)
    return crop, depth


def view_of_row(row) -> View:
    """The `View` (crop box and augmentation) an index row records (a row of `FeatureStore.index()`)."""
    return View.from_record((row.view_k, row.view_top, row.view_left, row.view_h, row.view_w),
                            (row.view_angle, row.view_gamma, row.view_brightness, row.view_gain_r,
                             row.view_gain_g, row.view_gain_b))


def resize_depth(depth: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize: keeps sparse LiDAR values real (no blending of valid and invalid pixels)."""
    if depth.shape == tuple(hw):
        return depth
    rows = (np.arange(hw[0]) * depth.shape[0] / hw[0]).astype(np.int64)
    cols = (np.arange(hw[1]) * depth.shape[1] / hw[1]).astype(np.int64)
    return depth[rows[:, None], cols[None, :]]
