"""Depth map + image -> coloured point cloud (PLY), with a pinhole camera.

Camera frame as in OpenCV: x right, y down, z forward (along the optical axis), metres. Pixel (u, v) is the
centre of column u, row v; with focal length f (pixels) and principal point (cx, cy)

    X = (u - cx) * Z / f,   Y = (v - cy) * Z / fy,   Z = depth(v, u)

and one vertex per valid pixel (finite depth > 0), in row-major pixel order. Without a principal point the
image centre ((W - 1) / 2, (H - 1) / 2) is used; `fy` defaults to `f` (square pixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.visualize import has_depth

VERTEX_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def backproject(
    depth: np.ndarray, focal: float, cx: float | None = None, cy: float | None = None, fy: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) metres -> (points (N, 3) float32, valid mask (H, W)); N = valid pixels, row-major order."""
    if not focal > 0:
        raise ValueError(f"focal length must be > 0 pixels, got {focal}")
    h, w = depth.shape
    cx = (w - 1) / 2.0 if cx is None else float(cx)
    cy = (h - 1) / 2.0 if cy is None else float(cy)
    fy = float(focal) if fy is None else float(fy)
    mask = has_depth(depth)
    v, u = np.nonzero(mask)  # row-major: the vertex order
    z = depth[v, u].astype(np.float64)
    points = np.stack([(u - cx) * z / float(focal), (v - cy) * z / fy, z], axis=1)  # (N, 3)
    return points.astype(np.float32), mask


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray, binary: bool = True) -> Path:
    """Write (N, 3) float points with (N, 3) uint8 colours as a PLY (binary little-endian or ASCII)."""
    path = Path(path)
    if points.ndim != 2 or points.shape[1] != 3 or colors.shape != points.shape:
        raise ValueError(f"expected points (N, 3) and colours (N, 3), got {points.shape} and {colors.shape}")
    vertices = np.empty(len(points), VERTEX_DTYPE)
    for i, axis in enumerate("xyz"):
        vertices[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = colors[:, i]
    header = (
        "ply\n"
        f"format {'binary_little_endian' if binary else 'ascii'} 1.0\n"
        "comment SPACE-CLIP depth back-projected with a pinhole camera (x right, y down, z forward, metres)\n"
        f"element vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "end_header\n"
    )
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        if binary:
            f.write(vertices.tobytes())
        else:
            np.savetxt(f, vertices, fmt=["%.6g"] * 3 + ["%d"] * 3)
    return path


def depth_to_ply(
    path: str | Path, depth: np.ndarray, image: np.ndarray, focal: float,
    cx: float | None = None, cy: float | None = None, binary: bool = True,
) -> int:
    """Back-project `depth` (H, W) with colours from `image` (H, W, 3) uint8 into a PLY; returns the vertex count."""
    if image.shape[:2] != depth.shape:
        raise ValueError(f"image {image.shape[:2]} and depth {depth.shape} differ in size")
    points, mask = backproject(depth, focal, cx, cy)
    write_ply(path, points, image[mask], binary=binary)
    return len(points)
