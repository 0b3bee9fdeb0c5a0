"""What a synthetic scene is: a pinhole camera, surface materials, and axis-aligned boxes on a ground plane or
inside a room. Descriptions only; `raycast` intersects them, `shading` colours the hits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Surface patterns (on top of the noise texture).
PLAIN, ROAD, FACADE, PLANKS, TILES = range(5)


@dataclass(frozen=True)
class Camera:
    """Pinhole camera; pixel centres at integer coordinates (OpenCV/KITTI convention). World axes: x right,
    y down, z forward; the ground is the plane y = 0."""

    height: int
    width: int
    focal: float
    cx: float
    cy: float
    position: tuple[float, float, float]
    yaw: float = 0.0  # radians about the world y axis
    pitch: float = 0.0  # radians about the camera x axis (positive looks down)

    def rotation(self) -> np.ndarray:
        cy_, sy = math.cos(self.yaw), math.sin(self.yaw)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        r_yaw = np.array([[cy_, 0, sy], [0, 1, 0], [-sy, 0, cy_]])
        r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # +pitch tilts the optical axis to +y (down)
        return r_yaw @ r_pitch  # camera -> world

    def rays(self, rows: tuple[int, int] | None = None) -> np.ndarray:
        """World directions (3, h, W) for image rows [r0, r1), scaled so the camera-space z component is 1: a hit
        at ray parameter t lies at camera z-depth t, which is what depth maps store."""
        r0, r1 = rows or (0, self.height)
        u = ((np.arange(self.width) - self.cx) / self.focal).astype(np.float32)[None, :]
        v = ((np.arange(r0, r1) - self.cy) / self.focal).astype(np.float32)[:, None]
        rot = self.rotation().astype(np.float32)
        d = np.empty((3, r1 - r0, self.width), dtype=np.float32)
        for i in range(3):  # world = R @ (u, v, 1)
            d[i] = rot[i, 0] * u + (rot[i, 1] * v + rot[i, 2])
        return d


@dataclass(frozen=True)
class Material:
    color: tuple[float, float, float]  # albedo, 0..1
    scale: float = 1.0  # texel size of the coarsest noise octave, metres
    contrast: float = 0.4
    pattern: int = PLAIN
    seed: int = 0  # shifts the texture so neighbouring surfaces differ


@dataclass(frozen=True)
class Scene:
    """Axis-aligned boxes, optionally standing on an infinite ground plane (outdoor, with sky) or enclosed in a
    room (indoor: every ray ends on the room's inside)."""

    boxes: np.ndarray  # (N, 2, 3) float: lo, hi corners in world metres
    box_materials: tuple[tuple[int, int], ...]  # per box: (side, top) indices into `materials`
    materials: tuple[Material, ...]
    ground: int | None = None  # material index of the plane y = 0, or None
    room: np.ndarray | None = None  # (2, 3) interior lo, hi
    room_materials: tuple[int, int, int] = (0, 0, 0)  # walls, floor, ceiling
    outdoor: bool = True  # haze + sky, else indoor light fall-off
    light: tuple[float, float, float] = (0.4, -0.8, 0.3)  # direction towards the light (y up is negative)
    haze: tuple[float, float, float] = (0.75, 0.8, 0.85)
    haze_distance: float = 90.0  # metres (outdoor) / fall-off distance (indoor)
    sky_zenith: tuple[float, float, float] = (0.35, 0.5, 0.8)
    road_half_width: float = 4.0
