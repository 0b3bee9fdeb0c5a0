"""Depth for your own images: files, folders or globs -> depth PNG / .npy / colour picture [/ side-by-side / PLY].

    predict_paths(model, ["photos/", "extra/*.jpg"], "out/", PredictOptions(side_by_side=True))

Per image `<stem>` (the file name without its extension) in `out`:
    <stem>_depth.png   uint16 depth x `png_scale` (256 by default, like KITTI: metres = value / 256, 1/256 m steps,
                       at most 255.99 m); 0 = no depth. The scale is also in the PNG's text chunk `depth_scale`.
    <stem>_depth.npy   float32 metres, (H, W) at the input's size
    <stem>_color.png   colour-mapped depth (near = colormap high end; fixed range or per-image percentiles)
    <stem>_side.png    input | depth | colour bar                                    (with side_by_side)
    <stem>.ply         coloured point cloud, one vertex per valid pixel               (with pointcloud + focal)

A file that cannot be read as an image is reported on stderr, counted, and skipped; the batch goes on.
Images are turned upright from their EXIF orientation first, so depth lines up with what a viewer shows.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin
from tqdm.auto import tqdm

from pipeline.datasets import DEPTH_SCALE, encode_depth
from pipeline.pointcloud import depth_to_ply
from pipeline.visualize import DEFAULT_COLORMAP, colorize, side_by_side
from spaceclip.model import SpaceClip

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif"}
DEFAULT_PNG_SCALE = DEPTH_SCALE["kitti"]  # KITTI's convention: uint16 / 256 = metres


@dataclass
class PredictOptions:
    colormap: str = DEFAULT_COLORMAP
    depth_range: tuple[float, float] | None = None  # fixed colour range in metres; None = per-image percentiles
    side_by_side: bool = False
    pointcloud: bool = False
    focal: float | None = None  # pixels of the input image; needed for point clouds
    cx: float | None = None
    cy: float | None = None
    ply_binary: bool = True
    png_scale: float = DEFAULT_PNG_SCALE
    batch_size: int = 8

    def __post_init__(self):
        if self.pointcloud and not (self.focal and self.focal > 0):
            raise ValueError("point clouds need the focal length in pixels (--focal F)")
        if not self.png_scale > 0:
            raise ValueError(f"png_scale must be > 0, got {self.png_scale}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PredictResult:
    written: dict[str, dict[str, Path]] = field(default_factory=dict)  # input path -> {kind: output path}
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)

    @property
    def n_ok(self) -> int:
        return len(self.written)


# ---- inputs -------------------------------------------------------------------------------------------------------
def collect_inputs(paths: Sequence[str | Path], exclude: str | Path | None = None) -> tuple[list[Path], list]:
    """Files, folders (their image files, recursively) and globs -> (sorted unique files, [(path, reason)]).

    A named file is always tried (a corrupt or mislabelled one is then reported, not silently dropped); inside
    folders only image extensions count. `exclude` (the output folder) is never read as input.
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    files: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []

    def add_folder(folder: Path) -> None:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not _inside(f, exclude):
                files.setdefault(f, None)

    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            add_folder(p)
        elif p.is_file():
            files.setdefault(p, None)
        elif glob.has_magic(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                problems.append((str(raw), "no file matches this pattern"))
            for m in matches:
                if m.is_dir():
                    add_folder(m)
                elif not _inside(m, exclude):
                    files.setdefault(m, None)
        else:
            problems.append((str(raw), "no such file or folder"))
    return list(files), problems


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def open_image_upright(path: str | Path) -> Image.Image:
    """An RGB PIL image, upright by its EXIF orientation, fully decoded (a truncated file fails here)."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def output_stems(files: Sequence[Path]) -> list[str]:
    """File stems, made unique: a later `a/x.png` next to `b/x.jpg` becomes `x-2`."""
    seen: dict[str, int] = {}
    stems = []
    for f in files:
        n = seen.get(f.stem, 0) + 1
        seen[f.stem] = n
        stems.append(f.stem if n == 1 else f"{f.stem}-{n}")
    return stems


# ---- outputs ------------------------------------------------------------------------------------------------------
def save_depth_png(path: str | Path, depth: np.ndarray, scale: float = DEFAULT_PNG_SCALE) -> Path:
    """float metres -> uint16 PNG of round(depth * scale), clipped to [0, 65535]; 0 = invalid. The scale is
    written into the PNG text chunk (`depth_scale`, `depth_unit`) so the file says how to read it."""
    q = encode_depth(depth, scale)  # (H, W) uint16
    info = PngImagePlugin.PngInfo()
    info.add_text("depth_scale", f"{scale:g}")
    info.add_text("depth_unit", "m")
    info.add_text("Description", f"SPACE-CLIP depth: metres = value / {scale:g}; 0 = no depth")
    Image.fromarray(q).save(path, pnginfo=info)  # (H, W) uint16 -> 16-bit greyscale PNG
    return Path(path)


def write_outputs(out: Path, stem: str, image: Image.Image, depth: np.ndarray, opts: PredictOptions) -> dict:
    """All requested files for one image; returns {kind: path}."""
    rgb = np.asarray(image)  # (H, W, 3) uint8
    paths = {
        "depth_png": save_depth_png(out / f"{stem}_depth.png", depth, opts.png_scale),
        "npy": out / f"{stem}_depth.npy",
        "color": out / f"{stem}_color.png",
    }
    np.save(paths["npy"], depth.astype(np.float32))
    Image.fromarray(colorize(depth, opts.colormap, opts.depth_range)[0]).save(paths["color"])
    if opts.side_by_side:
        paths["side"] = out / f"{stem}_side.png"
        Image.fromarray(side_by_side(rgb, depth, opts.colormap, opts.depth_range)).save(paths["side"])
    if opts.pointcloud:
        paths["ply"] = out / f"{stem}.ply"
        depth_to_ply(paths["ply"], depth, rgb, opts.focal, opts.cx, opts.cy, binary=opts.ply_binary)
    return paths


# ---- the batch ----------------------------------------------------------------------------------------------------
def predict_paths(
    model: SpaceClip, paths: Sequence[str | Path], out: str | Path, opts: PredictOptions | None = None,
    progress: bool = True,
) -> PredictResult:
    """Depth for every image under `paths`, written into `out`. Bad inputs are reported and skipped."""
    opts = opts or PredictOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = collect_inputs(paths, exclude=out)
    result = PredictResult()
    for path, reason in problems:
        _report(result, path, reason)
    stems = output_stems(files)
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not progress, file=sys.stderr)
    for start in range(0, len(files), opts.batch_size):
        batch = []
        for f, stem in zip(files[start:start + opts.batch_size], stems[start:start + opts.batch_size]):
            try:
                batch.append((f, stem, open_image_upright(f)))
            except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
                _report(result, str(f), f"not a readable image ({type(err).__name__}: {err})", bar)
                bar.update(1)
        if batch:
            depths = model.predict([img for _, _, img in batch], batch_size=opts.batch_size)
            for (f, stem, img), depth in zip(batch, depths):
                result.written[str(f)] = write_outputs(out, stem, img, depth, opts)
                bar.update(1)
    bar.close()
    return result


def _report(result: PredictResult, path: str, reason: str, bar=None) -> None:
    result.failed.append((path, reason))
    (bar.write if bar is not None else print)(f"skipped {path}: {reason}", file=sys.stderr)


def summary_lines(result: PredictResult, out: Path, opts: PredictOptions) -> list[str]:
    lines = [
        f"predicted {result.n_ok} image(s) into {out}; {len(result.failed)} skipped (unreadable or missing)",
        f"16-bit depth PNGs: metres = value / {opts.png_scale:g} (also in each PNG's 'depth_scale' text); 0 = no depth",
    ]
    lines += [f"  skipped: {path}: {reason}" for path, reason in result.failed]
    return lines
