"""The cache fingerprint: a hash of everything that changes a feature store's bytes.

A different config never reads a stale cache; the same config never recomputes one. The inputs are kept in the
store's attrs so that a refusal can say *what* differs, not just that the hashes do.

The dataset files themselves are not hashed (reading 95 GB of KITTI to name a cache would cost more than the
cache saves). Instead a store records the data roots it was extracted from (`data_roots`) and each sample's
files by size and modification time (`file_signature`, in the store's `sources/` arrays): a reuse compares them
and says what changed (`pipeline.sources.source_changes`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.devices import encoder_settings

FORMAT_VERSION = 1


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint_inputs(cfg: Config, split: str, encoder_identity: dict) -> dict:
    """What determines the bytes of `<split>` for this config and this encoder (see `FrozenEncoder.identity`)."""
    data = cfg.data
    split_file = data.test_split if split == "test" else data.train_split
    trains = split != "test"
    inputs = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "layout": data.layout,
        "split_file_sha256": file_sha256(split_file),
        "encoder": {k: encoder_identity[k] for k in ("name", "revision", "weights_sha256", "width", "grid")},
        "preprocess": {"resize": "bicubic-squash", "image_size": encoder_identity["image_size"],
                       "mean": encoder_identity.get("mean"), "std": encoder_identity.get("std")},
        "autocast_dtype": encoder_settings(cfg.encoder).dtype,  # 'auto' resolved: the dtype that runs
        "layers": list(cfg.cache_layers),
        "dtype": cfg.cache.dtype,
        "chunk_size": cfg.cache.chunk_size,
        "compressor": [cfg.cache.compressor, cfg.cache.compression_level],
        # train and val are carved from the same file; the carve decides which frames land where.
        "val_carve": [data.val_fraction, data.val_seed] if trains else None,
        # test stores always hold the full frame; training views and targets are part of the bytes.
        "views": _views(cfg, split) if trains else "full-frame",
        "target": {"size": cfg.cache.target_size, "depth_range": list(data.depth_range)} if trains else None,
    }
    if not trains and cfg.pixel_flip_tta:  # the test store also holds the mirrored images' features
        inputs["flipped"] = True
    return inputs


def _views(cfg: Config, split: str) -> dict:
    """The view policy; augmentation keys only when augmentation is on, so stores extracted before those keys
    existed keep their fingerprints. Validation is never flipped, so `views.flip` does not change its bytes."""
    views = cfg.views.model_dump(mode="json")
    if split == "val":
        del views["flip"]
    if views["rotation_deg"] == 0:
        del views["rotation_deg"]
    if views["color"] is None:
        del views["color"]
    return views


def fingerprint(inputs: dict) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def diff_inputs(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprint-input dicts, e.g. `layers: [0, 12] != [0, 1, 12]`."""
    # Compare as stored (JSON): a tuple in the config equals the list the store's attributes hold.
    expected, found = json.loads(json.dumps(expected)), json.loads(json.dumps(found))
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_inputs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: config has {a!r}, store has {b!r}")
    return out


def data_roots(cfg: Config, split: str) -> dict[str, str]:
    """The absolute data roots a split's files are read from (what a store records; the test split may have its
    own, `data.test_image_root` / `data.test_depth_root`)."""
    image_root, depth_root = cfg.data.roots(split)
    return {"image_root": os.path.abspath(image_root), "depth_root": os.path.abspath(depth_root)}


MISSING = (-1, -1)  # the signature of a file that is not there (or a sample without ground truth)


def file_signature(paths) -> np.ndarray:
    """(N, 2) int64: (size in bytes, modification time in ns) of each file, `MISSING` where there is none ("": no
    file). One `stat` a file, no read: a KITTI split's 46 k files take a fraction of a second."""
    out = np.full((len(paths), 2), MISSING, np.int64)
    seen: dict[str, tuple[int, int]] = {}  # the views of one frame share its files
    for i, path in enumerate(paths):
        path = str(path)
        if not path:
            continue
        if path not in seen:
            try:
                st = os.stat(path)
                seen[path] = (st.st_size, st.st_mtime_ns)
            except OSError:
                seen[path] = MISSING
        out[i] = seen[path]
    return out
