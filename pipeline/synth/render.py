"""A rendered frame: ray cast and shade in bands of rows, and the LiDAR-like sparse ground truth of KITTI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.raycast import _clip_rect, cast
from pipeline.synth.scene import Camera, Scene
from pipeline.synth.shading import shade

KITTI_LIDAR_RANGE = 80.0  # GT beyond this is left invalid, as in the Eigen evaluation range


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 exact camera z-depth in metres, 0 where the ray hits nothing (sky)


def render(scene: Scene, cam: Camera) -> Frame:
    """Ray cast and shade in bands of rows: small temporaries stay in cache and are recycled by the allocator,
    several times faster than whole-frame arrays."""
    H, W = cam.height, cam.width
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    depth = np.empty((H, W), dtype=np.float32)
    rot_t = cam.rotation().T
    rects = [_clip_rect(box, cam, rot_t) for box in scene.boxes]
    band = max(1, 65536 // W)
    for r0 in range(0, H, band):
        r1 = min(r0 + band, H)
        t, prim, mat, axis, d = cast(scene, cam, (r0, r1), rects)
        color = shade(scene, cam, t, prim, mat, axis, d)
        rgb[r0:r1] = np.clip(color * np.float32(255.0) + np.float32(0.5), 0, 255)
        depth[r0:r1] = np.where(np.isfinite(t), t, np.float32(0.0))
    return Frame(rgb=rgb, depth=depth)


def lidar_mask(cam: Camera, depth: np.ndarray, rng: np.random.Generator, keep: float = 0.75) -> np.ndarray:
    """Pixels an HDL-64E would return: 64 beams from +2° to −24.8° elevation, each sweeping the curve
    v = cy + f·tan(−elevation)/cos(azimuth) (level camera), a quarter of the columns dropped, range ≤ 80 m."""
    H, W = depth.shape
    elevation = np.deg2rad(np.linspace(2.0, -24.8, 64))
    cols = np.arange(W)
    cos_az = cam.focal / np.hypot(cols - cam.cx, cam.focal)
    rows = np.round(cam.cy + cam.focal * np.tan(-elevation)[:, None] / cos_az[None, :]).astype(np.int64)  # (64, W)
    take = (rng.random(rows.shape) < keep) & (rows >= 0) & (rows < H)
    mask = np.zeros((H, W), dtype=bool)
    mask[rows[take], np.broadcast_to(cols, rows.shape)[take]] = True
    return mask & (depth > 0) & (depth <= KITTI_LIDAR_RANGE)
