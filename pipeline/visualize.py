"""Depth maps as pictures: colour mapping with a fixed or per-image range, and input | depth side by side.

Convention: **near is the colormap's high end** (red for `turbo`, bright for `magma`/`inferno`), far its low end,
as in most monocular-depth figures. Invalid pixels (zero, negative or non-finite depth) are black. Without a
fixed range each picture is stretched between its own 2nd and 98th depth percentiles, which shows structure but
makes pictures incomparable; pass `depth_range=(min, max)` in metres for a shared scale.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spaceclip.metrics import valid_mask

DEFAULT_COLORMAP = "turbo"
PERCENTILES = (2.0, 98.0)


def colormap(name: str):
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; e.g. turbo, magma, inferno, viridis, Spectral") from None


def has_depth(depth: np.ndarray) -> np.ndarray:
    """Pixels that carry a depth at all (finite, > 0): the valid-pixel rule with no range."""
    return valid_mask(depth, 0.0, math.inf)


def depth_range_of(depth: np.ndarray, depth_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """The (min, max) metres a picture maps: the given fixed range, else the valid pixels' percentiles."""
    if depth_range is not None:
        lo, hi = float(depth_range[0]), float(depth_range[1])
        if not hi > lo:
            raise ValueError(f"depth range must have max > min, got {lo} {hi}")
        return lo, hi
    valid = depth[has_depth(depth)]
    if valid.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(valid, PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1e-6)


def colorize(
    depth: np.ndarray, cmap: str = DEFAULT_COLORMAP, depth_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """(H, W) metres -> ((H, W, 3) uint8, the (min, max) range used). Near = colormap high end."""
    lo, hi = depth_range_of(depth, depth_range)
    t = (hi - np.nan_to_num(depth, nan=hi)) / (hi - lo)  # 1 at `lo` (near), 0 at `hi` (far)
    rgb = colormap(cmap)(np.clip(t, 0.0, 1.0), bytes=True)[..., :3]  # (H, W, 3) uint8
    rgb[~has_depth(depth)] = 0
    return rgb, (lo, hi)


def colorbar(height: int, cmap: str, depth_range: tuple[float, float], width: int | None = None) -> np.ndarray:
    """A vertical bar (near at the top) with its range in metres written at both ends: (height, w, 3) uint8."""
    lo, hi = depth_range
    bar_w = max(12, height // 24)
    font_size = max(10, height // 24)
    font = ImageFont.load_default(size=font_size)
    labels = [f"{lo:.2f} m near", f"{hi:.2f} m far"]
    text_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in labels)
    width = width or bar_w + text_w + 12
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(bar_w, axis=1)  # top = near (high end)
    panel.paste(Image.fromarray(colormap(cmap)(ramp, bytes=True)[..., :3]), (4, 0))
    draw = ImageDraw.Draw(panel)
    draw.text((bar_w + 8, 2), labels[0], fill=(0, 0, 0), font=font)
    draw.text((bar_w + 8, height - font_size - 4), labels[1], fill=(0, 0, 0), font=font)
    return np.asarray(panel)


def side_by_side(
    image: np.ndarray, depth: np.ndarray, cmap: str = DEFAULT_COLORMAP,
    depth_range: tuple[float, float] | None = None, gap: int = 4,
) -> np.ndarray:
    """Input (H, W, 3) uint8 | colour-mapped depth (H, W) | colour bar, in one (H, W', 3) uint8 picture."""
    if image.shape[:2] != depth.shape:
        raise ValueError(f"image {image.shape[:2]} and depth {depth.shape} differ in size")
    rgb, used = colorize(depth, cmap, depth_range)
    h = image.shape[0]
    white = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate([image, white, rgb, white, colorbar(h, cmap, used)], axis=1)
