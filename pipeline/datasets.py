"""Dataset readers for the real on-disk layouts: KITTI Eigen split (BTS form) and NYU Depth V2 (BTS form).

Split files list one frame per line, `<image> <depth|None> <focal>`, paths relative to `data.image_root` and
`data.depth_root`:

    2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000005.png 2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000005.png 721.5377
    /kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579

Depth PNGs are uint16: metres × 256 (KITTI) or × 1000 (NYU), 0 = no measurement. Validation is carved from the
train split file by drive / scene, so no drive or room is in both (checkpoints are never selected on test).
Training views (KB crop, centre or seeded random crops) are described here as `View`s and cut by `apply_view`.
Every error names the file and its line in the split file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagecodecs
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import DataConfig, ViewConfig
from pipeline.errors import SpaceClipError

log = logging.getLogger(__name__)

DEPTH_SCALE = {"kitti": 256.0, "nyu": 1000.0}
UINT16_MAX = 65535
KB_CROP = (352, 1216)  # KITTI benchmark crop (H, W): bottom rows, centred columns


class DatasetError(SpaceClipError, RuntimeError):
    """A split file, image or depth map is missing or malformed; the message names the file and the line."""


@dataclass(frozen=True)
class Sample:
    id: str  # stable and unique: "2011_09_26_drive_0002_sync/0000000005", "bathroom/00045"
    image_path: Path
    depth_path: Path | None  # None: the split file says None (no ground truth for this frame)
    focal: float
    line: int  # 1-based line in split_file
    split_file: Path
    group: str  # drive (KITTI) / scene (NYU): the unit validation is carved by

    @property
    def where(self) -> str:
        return f"line {self.line} of {self.split_file}"


def sample_from_row(row, split_file: str | Path) -> Sample:
    """A stored or planned index row (a mapping with id, image_path, depth_path, focal, line, group) back to the
    `Sample` of its split-file line; an empty depth path is GT `None`."""
    return Sample(id=row["id"], image_path=Path(row["image_path"]),
                  depth_path=Path(row["depth_path"]) if row["depth_path"] else None, focal=float(row["focal"]),
                  line=int(row["line"]), split_file=Path(split_file), group=row["group"])


# ---- split files -------------------------------------------------------------------------------------------------
def _kitti_identity(image_rel: str) -> tuple[str, str]:
    """(id, group) from `<date>/<drive>_sync/image_0X/data/<frame>.png`. The right camera (image_03), when a
    split lists it, keeps its own id."""
    parts = image_rel.split("/")
    stem = Path(parts[-1]).stem
    drive = next((p for p in reversed(parts[:-1]) if p.endswith("_sync")), None)
    if drive is None:  # not the KITTI raw layout: fall back to the folder
        folder = "/".join(parts[:-1]) or "."
        return f"{folder}/{stem}", folder
    camera = next((p for p in parts if re.fullmatch(r"image_0\d", p)), "image_02")
    return (f"{drive}/{stem}" if camera == "image_02" else f"{drive}/{camera}/{stem}"), drive


def _nyu_identity(image_rel: str) -> tuple[str, str]:
    """(id, group) from `<scene>/rgb_00045.jpg`. Recordings of one room (`kitchen_0028a`, `kitchen_0028b`) share
    a group so validation never holds a room that training also sees."""
    parts = image_rel.split("/")
    scene = parts[-2] if len(parts) >= 2 else "."
    stem = Path(parts[-1]).stem
    number = re.search(r"(\d+)$", stem)
    frame = number.group(1) if number else stem
    return f"{scene}/{frame}", re.sub(r"^(.*_\d+)[a-z]$", r"\1", scene)


def parse_split_file(split_file: Path, image_root: Path, depth_root: Path, layout: str) -> list[Sample]:
    """Every line of a split file as a `Sample` (blank lines and `#` comments skipped; CRLF or LF endings; a UTF-8
    byte-order mark, as Windows editors save one, is not part of the first path). A leading `/` on a path (the BTS
    NYU train file has one) is relative to the root, not absolute."""
    split_file = Path(split_file)
    identity = _kitti_identity if layout == "kitti" else _nyu_identity
    if split_file.is_dir():
        raise DatasetError(f"split file {split_file} is a directory, not a file")
    try:
        text = split_file.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise DatasetError(f"cannot read split file {split_file}: {err}") from None
    except UnicodeDecodeError as err:
        line = split_file.read_bytes()[: err.start].count(b"\n") + 1
        raise DatasetError(f"split file {split_file} is not UTF-8 text (line {line}, byte {err.start}): "
                           f"{err.reason}") from None
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"line {number} of {split_file}"
        if len(fields) != 3:
            raise DatasetError(f"malformed split line, expected '<image> <depth|None> <focal>': {raw!r} ({where})")
        image_rel, depth_rel, focal_text = fields
        try:
            focal = float(focal_text)
        except ValueError:
            raise DatasetError(f"focal length {focal_text!r} is not a number ({where})") from None
        if not (math.isfinite(focal) and focal > 0):
            raise DatasetError(f"focal length must be a positive finite number, got {focal_text} ({where})")
        image_rel = image_rel.lstrip("/")
        sample_id, group = identity(image_rel)
        if sample_id in seen:
            raise DatasetError(f"duplicate frame {sample_id!r} on line {seen[sample_id]} and {where}")
        seen[sample_id] = number
        depth_path = None if depth_rel == "None" else Path(depth_root) / depth_rel.lstrip("/")
        samples.append(Sample(sample_id, Path(image_root) / image_rel, depth_path, focal, number, split_file, group))
    return samples


def split_statistics(split_file: Path, image_root: Path, depth_root: Path, layout: str) -> dict:
    """{"frames", "groups" (drives or scenes), "no_gt" (lines whose GT is None)} of one split file."""
    samples = parse_split_file(split_file, image_root, depth_root, layout)
    return {"frames": len(samples), "groups": len({s.group for s in samples}),
            "no_gt": sum(s.depth_path is None for s in samples)}


def _group_rank(group: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}:{group}".encode()).digest()


def validation_groups(groups: list[str], fraction: float, seed: int) -> set[str]:
    """The groups held out for validation: round(fraction · n) of them (at least one when fraction > 0 and there
    are >= 2 groups, never all), chosen by a seeded hash rank, so the choice does not depend on line order."""
    unique = sorted(set(groups))
    if fraction <= 0 or len(unique) < 2:
        return set()
    n_val = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    return set(sorted(unique, key=lambda g: _group_rank(g, seed))[:n_val])


def read_split(cfg: DataConfig, split: Literal["train", "val", "test"]) -> list[Sample]:
    """Samples of a split in file order. "train" is the train split file minus the validation groups, "val" those
    groups (carved by drive / scene with `cfg.val_fraction`, `cfg.val_seed`), "test" the test split file."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}: expected 'train', 'val' or 'test'")
    key = "test_split" if split == "test" else "train_split"
    split_file = Path(getattr(cfg, key))
    if not split_file.is_file():
        raise DatasetError(
            f"split file missing: {split_file} (set data.{key}, or data.synth to generate a synthetic dataset)"
        )
    image_root, depth_root = cfg.roots(split)  # the test split may live under its own roots (NYU BTS)
    samples = parse_split_file(split_file, Path(image_root), Path(depth_root), cfg.layout)
    if split == "test":
        return samples
    val = validation_groups([s.group for s in samples], cfg.val_fraction, cfg.val_seed)
    if not val and cfg.val_fraction > 0 and (split_file, cfg.val_fraction) not in _WARNED_NO_VAL:
        # Not an error: training then keeps the last epoch as best/ (as with val_fraction 0), but say why.
        _WARNED_NO_VAL.add((split_file, cfg.val_fraction))
        groups = sorted({s.group for s in samples})
        log.warning("no validation split: %s has %d %s (%s), and validation is carved by whole %s so that no frame "
                    "of it is trained on; best/ will follow last/. Add %s to data.train_split for checkpoint "
                    "selection, or set data.val_fraction=0 to say there is none", split_file, len(groups),
                    "drive" if cfg.layout == "kitti" else "scene", ", ".join(groups[:3]),
                    "drives" if cfg.layout == "kitti" else "scenes", "drives" if cfg.layout == "kitti" else "scenes")
    return [s for s in samples if (s.group in val) == (split == "val")]


_WARNED_NO_VAL: set = set()  # (split file, fraction): the warning above once per process, not once per read


# ---- images and depth ----------------------------------------------------------------------------------------
def _require_file(path: Path, kind: str, sample: Sample) -> None:
    if path.is_dir():
        raise DatasetError(f"{kind} path is a directory, not a file: {path} ({sample.where})")
    if not path.is_file():
        raise DatasetError(f"{kind} file missing: {path} ({sample.where})")
    if path.stat().st_size == 0:
        raise DatasetError(f"{kind} file is empty (0 bytes): {path} ({sample.where})")


def _open(path: Path, kind: str, sample: Sample) -> Image.Image:
    _require_file(path, kind, sample)
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated or corrupt file fails here, with its name
    except Image.DecompressionBombError as err:  # more pixels than PIL's limit: refused before decoding
        raise DatasetError(f"{kind} file refused as a decompression bomb: {path} ({sample.where}): {err}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DatasetError(f"{kind} file unreadable: {path} ({sample.where}): {err}") from None
    return img


def _header_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from an image file's header, without decoding; None when it cannot be read (then the image loader
    reports it)."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None


def load_image(sample: Sample) -> np.ndarray:
    """(H, W, 3) uint8 RGB. An 8-bit RGB or RGBA PNG (KITTI's frames, the synthetic ones) is decoded by
    imagecodecs (libpng with zlib-ng: 9.4 ms for a 375 x 1242 frame where Pillow takes 15.5, the same pixels;
    BENCHMARKS.md, issue 14) after Pillow has read its header; every other file by Pillow."""
    pixels = _png_rgb(sample.image_path, sample)
    if pixels is not None:
        return pixels
    img = _open(sample.image_path, "image", sample)
    return np.array(img.convert("RGB"))


def _png_rgb(path: Path, sample: Sample) -> np.ndarray | None:
    """The pixels of an 8-bit RGB(A) PNG by imagecodecs, or None for any other file (Pillow decodes it, and
    names what is wrong with it). Pillow's header read keeps its checks: format, mode, decompression-bomb size."""
    _require_file(path, "image", sample)
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode not in ("RGB", "RGBA"):
                return None
            size = im.size
    except Exception:  # let Pillow's full decode raise the named error
        return None
    try:
        pixels = imagecodecs.png_decode(path.read_bytes())
    except Exception as err:
        raise DatasetError(f"image file unreadable: {path} ({sample.where}): {type(err).__name__}: {err}") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1::-1] != size or pixels.shape[2] not in (3, 4):
        return None  # not what the header said: Pillow decides
    return pixels if pixels.shape[2] == 3 else np.ascontiguousarray(pixels[..., :3])


def load_depth(sample: Sample, layout: str) -> np.ndarray | None:
    """(H, W) float32 metres, 0 = invalid; None when the split line has no ground truth. A depth map must be a
    16-bit single-channel PNG of its image's size (the image's header is read to check)."""
    if sample.depth_path is None:
        return None
    if layout not in DEPTH_SCALE:
        raise ValueError(f"unknown layout {layout!r}: expected one of {sorted(DEPTH_SCALE)}")
    img = _open(sample.depth_path, "depth", sample)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DatasetError(
            f"depth file is not a 16-bit PNG (mode {img.mode}): {sample.depth_path} ({sample.where})"
        )
    raw = np.array(img)
    if raw.ndim != 2:
        raise DatasetError(
            f"depth file is not single-channel (shape {raw.shape}): {sample.depth_path} ({sample.where})"
        )
    image_size = _header_size(sample.image_path)
    if image_size is not None and image_size != img.size:
        raise DatasetError(
            f"depth file is {img.size[0]}x{img.size[1]} but its image {sample.image_path} is "
            f"{image_size[0]}x{image_size[1]}: {sample.depth_path} ({sample.where})"
        )
    return decode_depth(raw, DEPTH_SCALE[layout])


def encode_depth(depth: np.ndarray, scale: float) -> np.ndarray:
    """Metres -> the uint16 of depth PNGs: round(depth × scale) clipped to [0, 65535]; a non-finite depth becomes
    0, "no measurement". The product is taken in float64, where it is exact for float32 depths, so the rounding
    never depends on the caller's dtype."""
    q = np.where(np.isfinite(depth), depth, 0.0).astype(np.float64) * scale
    return np.clip(np.rint(q), 0, UINT16_MAX).astype(np.uint16)


def decode_depth(raw: np.ndarray, scale: float) -> np.ndarray:
    """The uint16 of a depth PNG -> float32 metres; 0 stays 0 (no measurement)."""
    return raw.astype(np.float32) / np.float32(scale)


# ---- training views ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    k: int  # index among the frame's views
    top: int
    left: int
    height: int
    width: int
    # Augmentation baked in at extraction (`views.rotation_deg`, `views.color`): the frame is rotated by `angle`
    # degrees (counter-clockwise, about its centre, as PIL) before the crop; `color` = (gamma, brightness, gain R,
    # gain G, gain B) on the crop, None = not applied to this view.
    angle: float = 0.0
    color: tuple[float, float, float, float, float] | None = None

    @property
    def augmentation(self) -> tuple[float, float, float, float, float, float]:
        """(angle, gamma, brightness, gain R, gain G, gain B), the identity (0, 1, 1, 1, 1, 1) when off: the row the
        store's index keeps for the view."""
        return (float(self.angle), *(self.color if self.color is not None else (1.0,) * 5))

    @staticmethod
    def from_record(box, augmentation=None) -> "View":
        """A View from the index's (k, top, left, h, w) and (angle, gamma, brightness, gains) rows."""
        k, top, left, h, w = (int(v) for v in box)
        if augmentation is None:
            return View(k, top, left, h, w)
        angle, *color = (float(v) for v in augmentation)
        return View(k, top, left, h, w, angle, None if all(c == 1.0 for c in color) else tuple(color))


def _stable_seed(*parts) -> int:
    """A seed from values, identical across processes and runs (unlike Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def kb_region(image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the KITTI benchmark crop: bottom 352 rows, centred 1216 columns (clamped
    to the frame)."""
    H, W = image_hw
    h, w = min(KB_CROP[0], H), min(KB_CROP[1], W)
    return H - h, (W - w) // 2, h, w


def make_views(
    sample_id: str, image_hw: tuple[int, int], views: ViewConfig, layout: str, train: bool
) -> list[View]:
    """The crops of one frame the encoder sees. Evaluation (train=False) always sees the full frame. Training: the
    KB crop first (KITTI, `views.kb_crop`), then the whole region ("full"), its centre ("center") or
    `views.views_per_image` random crops seeded by (views.seed, sample_id, k) ("random"). Random crops cannot
    be made later in feature space, hence K of them now."""
    H, W = image_hw
    if not train:
        return [View(0, 0, 0, H, W)]
    top, left, rh, rw = kb_region(image_hw) if views.kb_crop and layout == "kitti" else (0, 0, H, W)
    augments = views.rotation_deg > 0 or views.color is not None
    if views.mode in ("full", "center"):
        ch, cw = (rh, rw) if views.mode == "full" else tuple(min(a, b) for a, b in zip(views.crop_size or (rh, rw),
                                                                                        (rh, rw)))
        box = (top + (rh - ch) // 2, left + (rw - cw) // 2, ch, cw)
        # One fixed box: K > 1 views of it only differ when they are augmented (else they would be copies).
        return [_augmented(View(k, *box), sample_id, views) for k in range(views.views_per_image if augments else 1)]
    ch, cw = views.crop_size or (rh, rw)
    ch, cw = min(ch, rh), min(cw, rw)
    out = []
    for k in range(views.views_per_image):
        rng = np.random.default_rng(_stable_seed(views.seed, sample_id, k))
        dy = int(rng.integers(0, rh - ch + 1))
        dx = int(rng.integers(0, rw - cw + 1))
        out.append(_augmented(View(k, top + dy, left + dx, ch, cw), sample_id, views))
    return out


def _augmented(view: View, sample_id: str, views: ViewConfig) -> View:
    """`view` with its rotation angle and colour parameters, drawn from their own seeded stream (views.seed,
    sample_id, k, "augment"), so that turning augmentation on does not move the crops."""
    if views.rotation_deg <= 0 and views.color is None:
        return view
    rng = np.random.default_rng(_stable_seed(views.seed, sample_id, view.k, "augment"))
    u_angle, u_apply, u_gamma, u_bright = rng.random(4)
    u_gain = rng.random(3)
    angle = float((2.0 * u_angle - 1.0) * views.rotation_deg) if views.rotation_deg > 0 else 0.0
    color = None
    c = views.color
    if c is not None and u_apply < c.p:
        lerp = lambda lo_hi, u: float(lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u)  # noqa: E731
        color = (lerp(c.gamma, u_gamma), lerp(c.brightness, u_bright), *(lerp(c.gain, u) for u in u_gain))
    return View(view.k, view.top, view.left, view.height, view.width, angle, color)


def rotate_frame(array: np.ndarray, angle: float, depth: bool) -> np.ndarray:
    """An (H, W, 3) uint8 image or (H, W) float32 depth map rotated by `angle` degrees counter-clockwise about its
    centre, same size, as the reference's PIL `rotate`: bicubic for the image, nearest-neighbour for depth (sparse
    LiDAR values stay real), 0 (black / invalid) where the rotated frame does not reach."""
    if angle == 0.0:
        return array
    if depth:
        img = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F")
        return np.asarray(img.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=0.0), dtype=np.float32)
    img = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    return np.asarray(img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0)))


def apply_color(image: np.ndarray, color: tuple | None) -> np.ndarray:
    """The release's colour augmentation on an (H, W, 3) uint8 image: x = image / 255, x ** gamma x brightness x
    per-channel gain, clipped to [0, 1], rounded back to uint8. None: the image unchanged."""
    if color is None:
        return image
    gamma, brightness, *gains = color
    x = image.astype(np.float32) / np.float32(255.0)
    x = x ** np.float32(gamma) * np.float32(brightness) * np.asarray(gains, np.float32)
    return np.round(np.clip(x, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def augmented_view(image: np.ndarray, depth: np.ndarray | None, view: View) -> tuple[np.ndarray, np.ndarray | None]:
    """(image crop, depth crop) of a training view with its augmentation: the whole frame rotated by `view.angle`
    (image and depth alike), then cut to the view's box, then the colour change on the image."""
    crop = apply_view(rotate_frame(image, view.angle, depth=False), view)
    crop = apply_color(np.ascontiguousarray(crop), view.color)
    if depth is not None:
        depth = apply_view(rotate_frame(depth, view.angle, depth=True), view)
    return crop, depth


def apply_view(array: np.ndarray, view: View) -> np.ndarray:
    """Crop an (H, W, ...) image or depth map to the view (a view of the array, not a copy)."""
    H, W = array.shape[:2]
    if view.top < 0 or view.left < 0 or view.top + view.height > H or view.left + view.width > W:
        raise ValueError(f"{view} does not fit an array of size {H}x{W}")
    return array[view.top : view.top + view.height, view.left : view.left + view.width]


# ---- a configured dataset is there ---------------------------------------------------------------------------
def require_dataset(cfg: DataConfig) -> None:
    """A missing split file or root is an error naming the config key to set. Rendering the synthetic dataset
    when `data.synth` is set is the generator's job (`pipeline.synth.ensure`, which calls this one otherwise)."""
    splits = {"data.train_split": Path(cfg.train_split), "data.test_split": Path(cfg.test_split)}
    roots = {"data.image_root": Path(cfg.image_root), "data.depth_root": Path(cfg.depth_root)}
    roots.update({f"data.{k}": Path(v) for k in ("test_image_root", "test_depth_root")
                  if (v := getattr(cfg, k)) is not None})
    for key, path in {**splits, **roots}.items():
        if not path.exists():
            raise DatasetError(
                f"dataset not found: {path} does not exist (set {key}, or data.synth to generate a synthetic dataset)"
            )


# ---- checking a dataset tree against its split files ------------------------------------------------------------
@dataclass(frozen=True)
class FileProblem:
    kind: str  # "image" / "depth" / "split file"
    path: Path
    line: int | None  # 1-based line of the split file (None: the split file itself)
    split_file: Path
    reason: str  # "missing" / "unreadable: ..."

    def describe(self) -> str:
        where = f"line {self.line} of {self.split_file}" if self.line else str(self.split_file)
        return f"{self.kind} {self.reason}: {self.path} ({where})"


@dataclass
class SplitCheck:
    split: str  # "train" (validation is carved from it) / "test"
    split_file: Path
    image_root: Path
    depth_root: Path
    lines: int = 0
    gt_none: int = 0
    images: dict = None  # {"present": n, "missing": n, "unreadable": n}
    depths: dict = None
    problems: list = None  # FileProblem, in split-file order
    error: str | None = None  # the split file itself is missing or malformed

    def __post_init__(self):
        self.images = self.images or {"present": 0, "missing": 0, "unreadable": 0}
        self.depths = self.depths or {"present": 0, "missing": 0, "unreadable": 0}
        self.problems = self.problems or []

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    def summary_lines(self, examples: int = 5) -> list[str]:
        head = f"{self.split}: {self.split_file}"
        if self.error is not None:
            return [f"{head}: FAILED: {self.error}"]
        out = [f"{head}: {self.lines} lines ({self.gt_none} with GT None); images under {self.image_root}, depth "
               f"under {self.depth_root}",
               "  images: " + ", ".join(f"{n} {k}" for k, n in self.images.items()),
               "  depth:  " + ", ".join(f"{n} {k}" for k, n in self.depths.items())]
        out += [f"  - {p.describe()}" for p in self.problems[:examples]]
        if len(self.problems) > examples:
            out.append(f"  ... and {len(self.problems) - examples} more")
        return out


@dataclass
class DatasetCheck:
    layout: str
    splits: list  # SplitCheck

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.splits)

    def summary_lines(self, examples: int = 5) -> list[str]:
        lines = [f"{self.layout} dataset check: {'ok' if self.ok else 'PROBLEMS FOUND'}"]
        for s in self.splits:
            lines += s.summary_lines(examples)
        return lines


def _check_file(sample: Sample, kind: str, layout: str, decode: bool) -> str | None:
    """None when the file is present and readable, else "missing" / "unreadable: why"."""
    path = sample.image_path if kind == "image" else sample.depth_path
    if not path.is_file():
        return "missing"
    try:
        if decode:  # exactly what extraction will do with it
            load_image(sample) if kind == "image" else load_depth(sample, layout)
        else:  # the header only
            with Image.open(path) as img:
                if kind == "depth" and img.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    return f"unreadable: not a 16-bit PNG (mode {img.mode})"
    except DatasetError as err:
        return "unreadable: " + str(err).replace(f" ({sample.where})", "").replace(f": {path}", "")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return f"unreadable: {err}"
    return None


def check_split(cfg: DataConfig, split: str, decode: bool = True, workers: int = 4) -> SplitCheck:
    """Every line of the split's file against the tree: present, missing or unreadable, image and depth."""
    from concurrent.futures import ThreadPoolExecutor

    split_file = Path(cfg.test_split if split == "test" else cfg.train_split)
    image_root, depth_root = (Path(r) for r in cfg.roots(split))
    report = SplitCheck(split, split_file, image_root, depth_root)
    if not split_file.is_file():
        report.error = f"split file missing (data.{'test' if split == 'test' else 'train'}_split)"
        return report
    try:
        samples = parse_split_file(split_file, image_root, depth_root, cfg.layout)
    except DatasetError as err:
        report.error = str(err)
        return report
    report.lines = len(samples)
    jobs = [(s, "image") for s in samples] + [(s, "depth") for s in samples if s.depth_path is not None]
    report.gt_none = sum(s.depth_path is None for s in samples)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda job: _check_file(job[0], job[1], cfg.layout, decode), jobs))
    for (sample, kind), result in zip(jobs, results):
        counts = report.images if kind == "image" else report.depths
        counts["present" if result is None else result.split(":", 1)[0]] += 1
        if result is not None:
            path = sample.image_path if kind == "image" else sample.depth_path
            report.problems.append(FileProblem(kind, path, sample.line, split_file, result))
    report.problems.sort(key=lambda p: (p.line, p.kind))
    return report


def check_dataset(cfg: DataConfig, splits=("train", "test"), decode: bool = True, workers: int = 4) -> DatasetCheck:
    """The dataset tree read against its split files, before any extraction: per split the lines, and how many of
    their images and depth maps are present, missing or unreadable (with `decode`, fully decoded by the same
    readers extraction uses; otherwise the header only), each problem with its split-file line."""
    return DatasetCheck(cfg.layout, [check_split(cfg, s, decode=decode, workers=workers) for s in splits])
