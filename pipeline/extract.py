"""Stage 1: run the frozen encoder once over a split and write its features into a feature store.

`prepare_store` plans a split (reads the split file and image headers, decides the views, computes the
fingerprint) and creates the store, or reuses an existing one with the same fingerprint. `extract_chunk` fills
one chunk; it is the unit the Prefect flow maps over Dask workers. A chunk's `done` flags are written after its
data, so a run killed at any moment resumes with exactly the chunks that are missing.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import datasets
from pipeline.config import Config, dump_config
from pipeline.datasets import DatasetError, Sample
from pipeline.fingerprint import diff_inputs, fingerprint, fingerprint_inputs
from pipeline.store import FeatureStore, StoreError, StoreSpec
from spaceclip.encoder import FrozenEncoder

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VERSIONED_PACKAGES = ("torch", "transformers", "zarr", "numcodecs", "numpy", "pillow")


def package_versions() -> dict:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    from spaceclip import __version__

    out["spaceclip"] = __version__
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    return torch.device(name)


@functools.lru_cache(maxsize=2)
def load_encoder(
    name: str, revision: str | None = None, device: str = "auto", image_size: int | None = None
) -> FrozenEncoder:
    """One encoder per process (Dask workers keep it between chunks)."""
    return FrozenEncoder.from_name(name, revision, image_size=image_size).to(resolve_device(device))


def encoder_for(cfg: Config) -> FrozenEncoder:
    return load_encoder(cfg.encoder.name, cfg.encoder.revision, cfg.encoder.device, cfg.encoder.image_size)


def store_url(cfg: Config, split: str, fp: str) -> str:
    return f"{cfg.cache.root.rstrip('/')}/{cfg.data.layout}/{split}-{fp}.zarr"


def split_fingerprint(cfg: Config, split: str, encoder: FrozenEncoder) -> tuple[str, dict]:
    inputs = fingerprint_inputs(cfg, split, encoder.identity())
    return fingerprint(inputs), inputs


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
    url: str
    fingerprint: str
    inputs: dict
    index: dict
    target_hw: tuple[int, int] | None
    skipped: list[dict]


def plan_split(cfg: Config, split: str, encoder: FrozenEncoder) -> Plan:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    fp, inputs = split_fingerprint(cfg, split, encoder)
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
    return Plan(split, store_url(cfg, split, fp), fp, inputs, index, target_hw, skipped)


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


def prepare_store(cfg: Config, split: str, encoder: FrozenEncoder | None = None) -> tuple[FeatureStore, bool]:
    """Open the store for this config and split if one with the same fingerprint exists, else create it.
    Returns (store, reused)."""
    encoder = encoder or encoder_for(cfg)
    fp, _ = split_fingerprint(cfg, split, encoder)
    url = store_url(cfg, split, fp)
    try:
        store = FeatureStore.open(url, mode="r+")
        if store.fingerprint == fp:
            state = "complete" if store.complete else f"{len(store.pending_chunks())} chunks to go"
            log.info("reusing feature store %s (fingerprint %s, %s)", url, fp, state)
            return store, True
    except StoreError:
        pass
    plan = plan_split(cfg, split, encoder)
    # The mirrored images' features: for training flips (views.flip = extract) or pixel-space flip TTA on test.
    flipped = (split == "train" and cfg.views.flip == "extract") or (split == "test" and cfg.pixel_flip_tta)
    spec = StoreSpec(
        n=len(plan.index["id"]), layers=cfg.cache_layers, grid=encoder.grid, width=encoder.width,
        dtype=cfg.cache.dtype, chunk_size=cfg.cache.chunk_size, compressor=cfg.cache.compressor,
        level=cfg.cache.compression_level, target_hw=plan.target_hw,
        depth_scale=datasets.DEPTH_SCALE[cfg.data.layout], flipped=flipped,
        attrs={
            "fingerprint": fp, "fingerprint_inputs": plan.inputs, "split": split, "config": dump_config(cfg),
            "versions": package_versions(), "format_version": plan.inputs["format_version"],
            "encoder": encoder.identity(), "skipped_at_planning": plan.skipped,
            "split_file": cfg.data.test_split if split == "test" else cfg.data.train_split,
            "depth_range": list(cfg.data.depth_range), "layout": cfg.data.layout,
        },
    )
    log.info("creating feature store %s: %d samples in %d chunks", url, spec.n, -(-spec.n // spec.chunk_size))
    return FeatureStore.create(url, spec, plan.index), False


def open_for(cfg: Config, split: str, encoder: FrozenEncoder | None = None) -> FeatureStore:
    """The complete store this config expects, or an error that says what differs from the stores that exist."""
    encoder = encoder or encoder_for(cfg)
    fp, inputs = split_fingerprint(cfg, split, encoder)
    url = store_url(cfg, split, fp)
    try:
        store = FeatureStore.open(url)
    except StoreError:
        siblings = sorted(Path(url).parent.glob(f"{split}-*.zarr")) if "://" not in url else []
        detail = ""
        for other in siblings[-3:]:
            try:
                found = FeatureStore.open(str(other)).attrs.get("fingerprint_inputs", {})
            except StoreError:
                continue
            detail += f"\n  {other.name} differs: " + "; ".join(diff_inputs(inputs, found)[:6])
        raise StoreError(
            f"no feature store for this config's {split} split (expected fingerprint {fp} at {url}); run "
            f"`spaceclip extract` with the same config first.{detail}"
        ) from None
    if store.fingerprint != fp:  # only possible if someone renamed a store
        raise StoreError(f"{url} has fingerprint {store.fingerprint}, config expects {fp}: " +
                         "; ".join(diff_inputs(inputs, store.attrs.get("fingerprint_inputs", {}))))
    if not store.complete:
        raise StoreError(f"{url} is incomplete ({len(store.pending_chunks())} chunks missing); run extraction "
                         "again to finish it")
    return store


# ---- one chunk --------------------------------------------------------------------------------------------------
def _load_row(store: FeatureStore, row, encoder: FrozenEncoder, layout: str, target_hw):
    """Decode, crop and preprocess one sample (runs in a loader thread)."""
    sample = datasets.sample_from_row(row._asdict(), store.attrs["split_file"])
    view = view_of_row(row)
    image = datasets.load_image(sample)
    if image.shape[:2] != (row.orig_h, row.orig_w):
        raise DatasetError(f"image {sample.image_path} is {image.shape[1]}x{image.shape[0]}, but was "
                           f"{row.orig_w}x{row.orig_h} when the store was planned (line {sample.line})")
    gt = datasets.load_depth(sample, layout) if target_hw is not None else None
    # The view's recorded augmentation (rotation of the frame, image and depth alike; colour) is applied here.
    crop, gt_crop = datasets.augmented_view(image, gt, view)
    pixels = encoder.preprocess(crop)[0]
    depth = None
    if target_hw is not None:
        depth = np.zeros(target_hw, np.float32) if gt_crop is None else resize_depth(gt_crop, target_hw)
    return pixels, depth


def view_of_row(row) -> datasets.View:
    """The `View` (crop box and augmentation) an index row records (a row of `FeatureStore.index()`)."""
    return datasets.View.from_record((row.view_k, row.view_top, row.view_left, row.view_h, row.view_w),
                                     (row.view_angle, row.view_gamma, row.view_brightness, row.view_gain_r,
                                      row.view_gain_g, row.view_gain_b))


def resize_depth(depth: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize: keeps sparse LiDAR values real (no blending of valid and invalid pixels)."""
    if depth.shape == tuple(hw):
        return depth
    rows = (np.arange(hw[0]) * depth.shape[0] / hw[0]).astype(np.int64)
    cols = (np.arange(hw[1]) * depth.shape[1] / hw[1]).astype(np.int64)
    return depth[rows[:, None], cols[None, :]]


def extract_chunk(cfg: Config, url: str, chunk: int, torch_threads: int | None = None) -> dict:
    """Encode and write one chunk of a store. Image decoding runs in threads ahead of the encoder."""
    if torch_threads:
        torch.set_num_threads(torch_threads)
    store = FeatureStore.open(url, mode="r+")
    a, b = store.chunk_range(chunk)
    rows = store.index().iloc[a:b]
    encoder = encoder_for(cfg)
    autocast = None if cfg.encoder.dtype == "float32" else getattr(torch, cfg.encoder.dtype)
    target_hw = tuple(store.group["depth"].shape[1:]) if store.has_depth else None
    layers = store.layers
    bs = cfg.encoder.batch_size
    n = b - a
    skipped = np.zeros(n, bool)
    reasons = [""] * n
    # The chunk's buffers are in the stored dtype: each batch is converted once, as it is copied in.
    buf_dtype = torch.bfloat16 if store.dtype == "bfloat16" else torch.float16
    tokens = {k: torch.zeros(n, encoder.grid, encoder.grid, encoder.width, dtype=buf_dtype) for k in layers}
    cls = torch.zeros(n, encoder.width, dtype=buf_dtype)
    flipped = None
    if store.has_flipped:  # views.flip = extract / pixel flip TTA: the mirrored image of every view, encoded too
        flipped = ({k: torch.zeros_like(t) for k, t in tokens.items()}, torch.zeros_like(cls))
    depth = np.zeros((n, *target_hw), np.float32) if target_hw else None
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_load_row, store, row, encoder, cfg.data.layout, target_hw)
                   for row in rows.itertuples()]
        for start in range(0, n, bs):
            batch_pixels, positions = [], []
            for i in range(start, min(start + bs, n)):
                try:
                    pixels, d = futures[i].result()
                except DatasetError as err:
                    if cfg.data.on_error == "raise":
                        raise
                    skipped[i], reasons[i] = True, str(err)
                    log.warning("skipping %s: %s", rows.iloc[i].id, err)
                    continue
                batch_pixels.append(pixels)
                positions.append(i)
                if depth is not None:
                    depth[i] = d
            if not positions:
                continue
            pixels = torch.stack(batch_pixels)  # (B, 3, S, S)
            feats = encoder(pixels, layers, autocast_dtype=autocast)
            for k in layers:
                tokens[k][positions] = feats["tokens"][k].to("cpu", buf_dtype)
            cls[positions] = feats["global"].to("cpu", buf_dtype)
            if flipped is not None:
                # Mirroring the preprocessed pixels = preprocessing the mirrored view (the squash is symmetric).
                feats = encoder(pixels.flip(-1), layers, autocast_dtype=autocast)
                for k in layers:
                    flipped[0][k][positions] = feats["tokens"][k].to("cpu", buf_dtype)
                flipped[1][positions] = feats["global"].to("cpu", buf_dtype)
    store.write_chunk(chunk, tokens, cls, depth, skipped, reasons, flipped=flipped)
    return {"chunk": chunk, "samples": n, "skipped": int(skipped.sum())}


def extract_splits(cfg: Config, splits=SPLITS) -> None:
    """Render the dataset if needed and extract the given splits in this process, chunk by chunk (no Prefect, no
    Dask): what tests and benchmarks use. The flow maps the same `extract_chunk` calls over a Dask cluster."""
    datasets.ensure_dataset(cfg.data)
    encoder = encoder_for(cfg)
    for split in splits:
        store, _ = prepare_store(cfg, split, encoder)
        for chunk in store.pending_chunks():
            extract_chunk(cfg, store.url, chunk)
        finalize_store(store.url)


def finalize_store(url: str) -> dict:
    store = FeatureStore.open(url, mode="r+")
    store.mark_complete()
    report = store.verify()
    if not report["ok"]:
        raise StoreError(f"{url} failed verification: " + "; ".join(report["problems"][:5]))
    return report
