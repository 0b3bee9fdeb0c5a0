"""Writing a synthetic dataset: every planned frame rendered and saved (PNG / JPEG images, uint16 depth PNGs) in
parallel threads, then the split files and the stamp, atomically. `ensure` renders the one a config names when it
is missing or was rendered with other settings: whoever starts a run calls it before reading the dataset."""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.datasets import DEPTH_SCALE, encode_depth, require_dataset
from pipeline.synth.render import Frame, lidar_mask, render
from pipeline.synth.scenes import SPLIT_NAMES, FramePlan, plan_dataset

SYNTH_VERSION = 1  # bump when the rendered bytes change; recorded in the stamp beside the split files
STAMP_NAME = "synth.json"

log = logging.getLogger(__name__)


def render_plan(plan: FramePlan) -> tuple[Frame, np.ndarray]:
    """The rendered frame and the ground truth as stored (float32 metres, 0 = invalid): sparse LiDAR-like for
    KITTI, dense for NYU."""
    frame = render(plan.scene, plan.camera)
    if plan.layout == "kitti":
        mask = lidar_mask(plan.camera, frame.depth, np.random.default_rng(plan.seed))
        gt = np.where(mask, frame.depth, 0.0).astype(np.float32)
    else:
        gt = frame.depth
    return frame, gt


def _save_atomic(array: np.ndarray, path: Path, **save_args) -> None:
    """Readers (another process generating the same dataset, a reader of an older one) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    Image.fromarray(array).save(tmp, **save_args)
    os.replace(tmp, path)


def _write_frame(plan: FramePlan, image_root: Path, depth_root: Path) -> None:
    frame, gt = render_plan(plan)
    if plan.layout == "kitti":
        # Fast zlib settings: PNG is lossless whatever the level, and encoding is a third of the frame's time.
        _save_atomic(frame.rgb, image_root / plan.image_rel, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    else:
        _save_atomic(frame.rgb, image_root / plan.image_rel, format="JPEG", quality=95)
    if plan.depth_rel is not None:
        depth_png = encode_depth(gt, DEPTH_SCALE[plan.layout])  # 0 stays "no measurement"
        _save_atomic(depth_png, depth_root / plan.depth_rel, format="PNG", compress_level=1)


def _split_line(plan: FramePlan) -> str:
    lead = "/" if plan.layout == "nyu" and plan.split == "train" else ""  # as in the BTS NYU train file
    depth = "None" if plan.depth_rel is None else f"{lead}{plan.depth_rel}"
    return f"{lead}{plan.image_rel} {depth} {plan.focal:.4f}"


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def synthesize_to(
    layout: Literal["kitti", "nyu"], *, image_root: Path, depth_root: Path, train_split: Path, test_split: Path,
    train: int, test: int, seed: int, workers: int | None = None,
) -> dict[str, Path]:
    """Render the dataset into explicit roots and split-file paths (the ones a DataConfig names). Split files are
    written last and atomically: they mark a complete dataset."""
    image_root, depth_root = Path(image_root), Path(depth_root)
    train_split, test_split = Path(train_split), Path(test_split)
    plans = plan_dataset(layout, train, test, seed)
    from pipeline.devices import usable_cores

    workers = workers or min(8, usable_cores())
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy, zlib and libjpeg release the GIL
        frames = pool.map(lambda p: _write_frame(p, image_root, depth_root), plans)
        for _ in tqdm(frames, total=len(plans), desc=f"render synthetic {layout}", unit="frame", leave=False):
            pass
    for path, split in ((train_split, "train"), (test_split, "test")):
        _write_text_atomic(path, "".join(_split_line(p) + "\n" for p in plans if p.split == split))
    stamp = {"layout": layout, "train": train, "test": test, "seed": seed, "version": SYNTH_VERSION}
    _write_text_atomic(train_split.parent / STAMP_NAME, json.dumps(stamp, sort_keys=True) + "\n")
    return {"image_root": image_root, "depth_root": depth_root, "train_split": train_split, "test_split": test_split}


def synthesize(layout: Literal["kitti", "nyu"], out: Path, train: int, test: int, seed: int) -> dict[str, Path]:
    """Write a procedural dataset under `out` in the real layout and return its paths: `root`, `image_root`,
    `depth_root`, `train_split`, `test_split`. KITTI: out/raw, out/gt, out/splits/eigen_*; NYU: out/sync (images
    and depth side by side), out/splits/nyudepthv2_*."""
    out = Path(out)
    train_name, test_name = SPLIT_NAMES.get(layout, (None, None))
    if train_name is None:
        raise ValueError(f"unknown layout {layout!r}: expected 'kitti' or 'nyu'")
    if layout == "kitti":
        image_root, depth_root = out / "raw", out / "gt"
    else:
        image_root = depth_root = out / "sync"
    paths = synthesize_to(
        layout, image_root=image_root, depth_root=depth_root, train_split=out / "splits" / train_name,
        test_split=out / "splits" / test_name, train=train, test=test, seed=seed,
    )
    return {"root": out, **paths}


def ensure(cfg: DataConfig) -> None:
    """Make sure the configured dataset exists. With `data.synth` set, the synthetic dataset is rendered into the
    configured roots when the split files are missing or were rendered with other synth settings (the stamp beside
    them says which); without it, a missing split file or root is an error naming the config key to set."""
    if cfg.synth is None:
        require_dataset(cfg)
        return
    splits = (Path(cfg.train_split), Path(cfg.test_split))
    wanted = {"layout": cfg.layout, "train": cfg.synth.train, "test": cfg.synth.test, "seed": cfg.synth.seed,
              "version": SYNTH_VERSION}
    stamp = splits[0].parent / STAMP_NAME
    if all(p.is_file() for p in splits):
        try:
            found = json.loads(stamp.read_text()) if stamp.is_file() else None
        except (OSError, ValueError):
            found = None
        if found is None or found == wanted:
            return  # complete: ours and current, or a real dataset we must not touch
    log.info(
        "generating a synthetic %s dataset (%d train + %d test frames, seed %d) into %s and %s",
        cfg.layout, cfg.synth.train, cfg.synth.test, cfg.synth.seed, cfg.image_root, cfg.depth_root,
    )
    synthesize_to(
        cfg.layout, image_root=Path(cfg.image_root), depth_root=Path(cfg.depth_root), train_split=splits[0],
        test_split=splits[1], train=cfg.synth.train, test=cfg.synth.test, seed=cfg.synth.seed,
    )
