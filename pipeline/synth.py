"""Procedural depth datasets written in the real KITTI (Eigen, BTS form) and NYU v2 (BTS) on-disk layouts.

Scenes are ray cast with numpy, one ray per pixel centre, against a ground plane (KITTI) or a room interior (NYU)
plus axis-aligned boxes (buildings, cars, poles / furniture). The ray parameter is scaled so that it *is* the
camera z-depth, so the ground truth is exact, not estimated: a ground pixel in row v has depth f·h / (v − cy).

Appearance carries depth the way photographs do, so a decoder has something to learn:
- textures are anchored to the world (metres, not pixels), so their image-space period shrinks with distance and
  octaves finer than a pixel fade out (a cheap mip-map);
- lane markings, windows, planks and kerbs are parallel lines that converge in perspective;
- haze (KITTI) and light fall-off (NYU) grow with distance; the KITTI sky has no depth.

KITTI ground truth is sparse like projected HDL-64E LiDAR (64 beam curves from +2° to −24.8°, ~8% of pixels,
none in the sky or the top rows), and about one test line in eight has GT `None`, like the real Eigen test split.
Output is byte-deterministic for a seed: frames are independent and written in parallel threads.

    synthesize("kitti", Path("data/demo/kitti"), train=48, test=16, seed=0)
    # data/demo/kitti/raw/2011_09_26/2011_09_26_drive_0001_sync/image_02/data/0000000018.png
    # data/demo/kitti/gt/2011_09_26_drive_0001_sync/proj_depth/groundtruth/image_02/0000000018.png
    # data/demo/kitti/splits/eigen_{train,test}_files_with_gt.txt
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

SYNTH_VERSION = 1  # bump when the rendered bytes change; recorded in the stamp beside the split files

# (date, (H, W), focal, cx, cy): frame sizes and left-colour-camera intrinsics of the real KITTI recording days.
KITTI_DATES = (
    ("2011_09_26", (375, 1242), 721.5377, 609.5593, 172.8540),
    ("2011_09_28", (370, 1224), 707.0493, 604.0814, 180.5066),
    ("2011_09_29", (374, 1238), 718.3351, 600.3891, 181.5122),
    ("2011_10_03", (376, 1241), 718.8560, 607.1928, 185.2157),
)
KITTI_CAMERA_HEIGHT = 1.65  # metres, the KITTI rig's colour cameras
KITTI_LIDAR_RANGE = 80.0  # GT beyond this is left invalid, as in the Eigen evaluation range
NYU_SIZE = (480, 640)
NYU_FOCAL, NYU_CX, NYU_CY = 518.8579, 325.5824, 253.7362  # Kinect colour camera (BTS split-file focal)
NYU_MAX_DEPTH = 9.9  # every visible point closer than 10 m (Euclidean, hence also in z)
NYU_CATEGORIES = ("bathroom", "bedroom", "kitchen", "living_room", "office", "dining_room", "study_room", "classroom")

SPLIT_NAMES = {
    "kitti": ("eigen_train_files_with_gt.txt", "eigen_test_files_with_gt.txt"),
    "nyu": ("nyudepthv2_train_files_with_gt.txt", "nyudepthv2_test_files_with_gt.txt"),
}
STAMP_NAME = "synth.json"

# Surface patterns (on top of the noise texture).
PLAIN, ROAD, FACADE, PLANKS, TILES = range(5)


def _noise_table(period: int = 64, res: int = 8, seed: int = 20240917) -> np.ndarray:
    """Value noise (smoothstep-interpolated random lattice, `period` cells, tiling) pre-sampled `res` times per
    cell: texturing a pixel is then one table lookup instead of four plus interpolation."""
    lattice = np.random.default_rng(seed).random((period, period))
    s = (np.arange(period * res) + 0.5) / res
    i0 = np.floor(s).astype(np.int64) % period
    i1 = (i0 + 1) % period
    f = s - np.floor(s)
    f = f * f * (3 - 2 * f)
    rows = lattice[i0] * (1 - f)[:, None] + lattice[i1] * f[:, None]  # (period*res, period)
    return (rows[:, i0] * (1 - f) + rows[:, i1] * f).astype(np.float32)  # (period*res, period*res)


_NOISE = _noise_table()  # fixed, so textures never depend on numpy's global random state
_NOISE_FLAT = _NOISE.ravel()
_NOISE_SIZE = _NOISE.shape[0]  # a power of two
_NOISE_RES = 8  # table samples per lattice cell
_PLANK_TONE = np.random.default_rng(7).random(256).astype(np.float32)


# ---- scene description -----------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 exact camera z-depth in metres, 0 where the ray hits nothing (sky)
    primitive: np.ndarray  # (H, W) int16: -1 sky, 0 ground plane / room, k >= 1 box k-1


@dataclass(frozen=True)
class FramePlan:
    """One frame to render: where it goes in the layout and what it shows."""

    layout: str
    split: str  # "train" | "test"
    group: str  # drive (KITTI) / scene folder (NYU)
    image_rel: str  # relative to the image root, as written in the split file
    depth_rel: str | None  # relative to the depth root; None: the split line says None and no GT file is written
    focal: float
    camera: Camera
    scene: Scene
    seed: int  # seeds per-frame randomness (LiDAR column drop-out)


# ---- ray casting -------------------------------------------------------------------------------------------------
def _clip_rect(scene_box: np.ndarray, cam: Camera, rot_t: np.ndarray) -> tuple[int, int, int, int] | None:
    """Image rectangle (r0, r1, c0, c1) that can contain the box, or None when it is wholly behind the camera.
    The box is clipped against a near plane first, so boxes reaching behind the camera still get a tight rect."""
    lo, hi = scene_box
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    cam_pts = (corners - np.asarray(cam.position)) @ rot_t.T  # world -> camera, (8, 3)
    near = 1e-2
    pts = [p for p in cam_pts if p[2] > near]
    for i in range(8):
        for j in range(i + 1, 8):
            if bin(i ^ j).count("1") != 1:
                continue  # not an edge
            a, b = cam_pts[i], cam_pts[j]
            if (a[2] - near) * (b[2] - near) < 0:
                s = (near - a[2]) / (b[2] - a[2])
                pts.append(a + s * (b - a))
    if not pts:
        return None
    p = np.array(pts)
    u = cam.focal * p[:, 0] / p[:, 2] + cam.cx
    v = cam.focal * p[:, 1] / p[:, 2] + cam.cy
    c0, c1 = max(int(math.floor(u.min())), 0), min(int(math.ceil(u.max())) + 1, cam.width)
    r0, r1 = max(int(math.floor(v.min())), 0), min(int(math.ceil(v.max())) + 1, cam.height)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def cast(
    scene: Scene, cam: Camera, rows: tuple[int, int] | None = None, rects: list | None = None,
    d: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit per pixel of image rows [r0, r1): t (h, W) camera z-depth (inf: none), primitive id, material
    id, face axis (0/1/2), and the world ray directions (3, h, W). `rects` (`_clip_rect` per box) and `d` (the
    band's rays) may be passed precomputed."""
    band0, band1 = rows or (0, cam.height)
    h, W = band1 - band0, cam.width
    d = cam.rays((band0, band1)) if d is None else d  # (3, h, W)
    o = np.asarray(cam.position, dtype=np.float32)
    t = np.full((h, W), np.inf, dtype=np.float32)
    prim = np.full((h, W), -1, dtype=np.int16)
    mat = np.full((h, W), -1, dtype=np.int16)
    axis = np.zeros((h, W), dtype=np.int8)
    # 1/1e-30 instead of inf on axis-parallel rays: slab products stay finite (no 0·inf = nan).
    inv = 1.0 / np.where(d == 0, np.float32(1e-30), d)  # (3, h, W)
    if scene.ground is not None:
        tg = np.where(d[1] > 0, -o[1] * inv[1], np.float32(np.inf))
        hit = tg < t
        t[hit], prim[hit], mat[hit], axis[hit] = tg[hit], 0, scene.ground, 1
    if scene.room is not None:
        # From inside a box, the exit point of the slab test is the wall the ray sees.
        t1 = (scene.room[0][:, None, None] - o[:, None, None]) * inv
        t2 = (scene.room[1][:, None, None] - o[:, None, None]) * inv
        tfar = np.maximum(t1, t2)  # (3, h, W)
        ax = np.argmin(tfar, axis=0).astype(np.int8)
        tr = np.min(tfar, axis=0)
        walls, floor, ceiling = scene.room_materials
        m = np.where(ax != 1, walls, np.where(d[1] > 0, floor, ceiling)).astype(np.int16)
        hit = tr < t
        t[hit], prim[hit], mat[hit], axis[hit] = tr[hit], 0, m[hit], ax[hit]
    if rects is None:
        rot_t = cam.rotation().T
        rects = [_clip_rect(box, cam, rot_t) for box in scene.boxes]
    for k, (box, rect) in enumerate(zip(scene.boxes, rects)):
        if rect is None or rect[1] <= band0 or rect[0] >= band1:
            continue
        r0, r1, c0, c1 = max(rect[0], band0) - band0, min(rect[1], band1) - band0, rect[2], rect[3]
        # Slab test. Along an axis where the eye is outside the slab, only the near face can be entered (the far
        # one is the exit); where it is inside, that axis only bounds the exit.
        near, far = [], []
        for a in range(3):
            lo, hi = float(box[0][a] - o[a]), float(box[1][a] - o[a])
            inv_a = inv[a, r0:r1, c0:c1]
            if lo > 0:
                near.append((a, np.float32(lo) * inv_a))
                far.append(np.float32(hi) * inv_a)
            elif hi < 0:
                near.append((a, np.float32(hi) * inv_a))
                far.append(np.float32(lo) * inv_a)
            else:
                far.append(np.maximum(np.float32(lo) * inv_a, np.float32(hi) * inv_a))
        if not near:
            continue  # the eye is inside the box: never generated
        tn = near[0][1]
        for _, tn_a in near[1:]:
            tn = np.maximum(tn, tn_a)
        tf = np.minimum(np.minimum(far[0], far[1]), far[2])
        tw = t[r0:r1, c0:c1]
        hit = (tn <= tf) & (tn > 0) & (tw > tn)
        if not hit.any():
            continue
        tn_hit = tn[hit]
        ax = np.full(tn_hit.shape, near[0][0], dtype=np.int8)  # the face entered is the slab entered last
        for a, tn_a in near[1:]:
            ax[tn_a[hit] == tn_hit] = a
        side, top = scene.box_materials[k]
        tw[hit] = tn_hit
        prim[r0:r1, c0:c1][hit] = k + 1
        mat[r0:r1, c0:c1][hit] = np.where(ax == 1, top, side)
        axis[r0:r1, c0:c1][hit] = ax
    return t, prim, mat, axis, d


def _value_noise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1] at lattice coordinates (u, v), tiling every 64 cells. Coordinates are shifted
    positive so truncation is a floor."""
    mask = _NOISE_SIZE - 1
    iu = (u * np.float32(_NOISE_RES) + np.float32(2**20)).astype(np.int32) & mask
    iv = (v * np.float32(_NOISE_RES) + np.float32(2**20)).astype(np.int32) & mask
    return _NOISE_FLAT.take(iv * _NOISE_SIZE + iu)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def shade(scene: Scene, cam: Camera, t, prim, mat, axis, d) -> np.ndarray:
    """RGB float (h, W, 3) in 0..1 from a band's hit buffers. Every pixel is shaded (sky pixels with a stand-in
    hit, overwritten at the end) because gathering the hit pixels first costs more than shading the sky."""
    H, W = t.shape
    f32 = np.float32
    sky = ~np.isfinite(t.reshape(-1))  # (N,)
    th = np.where(sky, f32(1.0), t.reshape(-1))
    dx, dy, dz = d.reshape(3, -1)
    ax = axis.reshape(-1)
    m = np.maximum(mat.reshape(-1), 0).astype(np.intp)
    ox, oy, oz = (f32(c) for c in cam.position)
    px, py, pz = ox + th * dx, oy + th * dy, oz + th * dz  # world hit points
    # World-anchored surface coordinates: the two axes spanning the face.
    su = np.where(ax == 0, pz, px)
    sv = np.where(ax == 1, pz, py)
    d_ax = np.where(ax == 0, dx, np.where(ax == 1, dy, dz))
    inv_norm = 1.0 / np.sqrt(dx * dx + dy * dy + dz * dz)
    cos_in = np.abs(d_ax) * inv_norm
    footprint = th * f32(1.0 / cam.focal) / np.maximum(cos_in, f32(0.15))  # metres per pixel on the surface

    mats = scene.materials
    colors = np.array([mt.color for mt in mats], f32)
    scale = np.array([mt.scale for mt in mats], f32).take(m)
    contrast = np.array([mt.contrast for mt in mats], f32).take(m)
    pattern = np.array([mt.pattern for mt in mats], np.int8).take(m)
    offset = np.array([mt.seed * 37.0 for mt in mats], f32).take(m)

    # Three octaves; one finer than ~2 pixels fades to its mean (0.5), so far textures blur instead of aliasing.
    # Texture coordinates in coarsest-octave texels; the per-material offset decorrelates neighbouring surfaces.
    tu = su / scale + offset
    tv = sv / scale + offset * f32(0.7)
    texel_px = scale / (2 * footprint)  # coarsest texel size in units of 2 pixels
    tex = np.full_like(th, 0.5)
    for octave, amp in enumerate((0.55, 0.3, 0.15)):
        fade = np.clip(texel_px * f32(0.5**octave) - 0.5, 0.0, 1.0)
        n = _value_noise(tu * f32(2**octave) + f32(11.3 * octave), tv * f32(2**octave))
        tex += f32(amp) * fade * (n - 0.5)
    gain = 1.0 - contrast * 0.5 + contrast * tex  # (N,)

    # Patterns as per-pixel gain factors and paint; parallel lines converge in perspective.
    paint = np.full(th.shape, -1.0, f32)  # >= 0: replace the albedo by this grey
    if scene.ground is not None:
        road = pattern == ROAD
        ax_ = np.abs(px)
        rw = f32(scene.road_half_width)
        walk = road & (ax_ > rw)
        joints = (_frac(px * f32(1 / 0.6)) < 0.06) | (_frac(pz * f32(1 / 0.6)) < 0.06)
        gain = np.where(walk, gain * np.where(joints, f32(1.1), f32(1.6)), gain)
        centre = (ax_ < 0.07) & (_frac(pz * f32(1 / 9.0)) < 0.35)
        edge = np.abs(ax_ - (rw - f32(0.35))) < 0.08
        paint = np.where(road & ~walk & (centre | edge), f32(0.85), paint)
        paint = np.where(road & (np.abs(ax_ - rw) < 0.12), f32(0.6), paint)
    facade = (pattern == FACADE) & (ax != 1)
    if facade.any():
        # Windows: 1.2 m wide every 2.5 m, 1.5 m tall every 3 m (y is negative upwards).
        across = np.abs(_frac(su * f32(1 / 2.5)) - 0.5) < 0.24
        win = facade & across & (np.abs(_frac(-sv * f32(1 / 3.0)) - 0.55) < 0.25)
        gain = np.where(win, gain * f32(0.3), gain)
    planks = pattern == PLANKS
    if planks.any():
        plank = np.floor(su * f32(1 / 0.18)).astype(np.int32) & 255
        tone = 0.8 + 0.4 * _PLANK_TONE[plank]
        gain = np.where(planks, gain * tone * np.where(_frac(su * f32(1 / 0.18)) < 0.05, f32(0.55), f32(1.0)), gain)
    tiles = pattern == TILES
    if tiles.any():
        grout = (_frac(su * f32(1 / 0.3)) < 0.07) | (_frac(sv * f32(1 / 0.3)) < 0.07)
        gain = np.where(tiles & grout, gain * f32(0.6), gain)

    # Lambert with the normal facing the camera, plus ambient.
    light = np.asarray(scene.light, f32)
    light = light / np.linalg.norm(light)
    n_dot_l = -np.sign(d_ax) * light[ax]
    lambert = 0.45 + 0.55 * np.clip(n_dot_l, 0.0, 1.0)
    if scene.outdoor:
        transmit = np.exp(th * f32(-1.0 / scene.haze_distance))
    else:
        transmit = 0.25 + 0.95 / (1.0 + (th * f32(1.0 / scene.haze_distance)) ** 2)
    k = gain * lambert * transmit  # (N,)
    color = colors.take(m, axis=0)  # (N, 3) albedo
    painted = paint >= 0
    if painted.any():
        color[painted] = paint[painted][:, None]
    color *= k[:, None]
    if scene.outdoor:
        color += np.asarray(scene.haze, f32) * (1.0 - transmit)[:, None]
        if sky.any():  # gradient from the haze colour at the horizon to the zenith colour
            s = np.clip(-dy[sky] * inv_norm[sky] * 3.0, 0.0, 1.0)[:, None]
            color[sky] = np.asarray(scene.haze, f32) * (1 - s) + np.asarray(scene.sky_zenith, f32) * s
    return color.reshape(H, W, 3)


def render(scene: Scene, cam: Camera) -> Frame:
    """Ray cast and shade in bands of rows: small temporaries stay in cache and are recycled by the allocator,
    several times faster than whole-frame arrays."""
    H, W = cam.height, cam.width
    rgb = np.empty((H, W, 3), dtype=np.uint8)
    depth = np.empty((H, W), dtype=np.float32)
    primitive = np.empty((H, W), dtype=np.int16)
    rot_t = cam.rotation().T
    rects = [_clip_rect(box, cam, rot_t) for box in scene.boxes]
    band = max(1, 65536 // W)
    for r0 in range(0, H, band):
        r1 = min(r0 + band, H)
        t, prim, mat, axis, d = cast(scene, cam, (r0, r1), rects)
        color = shade(scene, cam, t, prim, mat, axis, d)
        rgb[r0:r1] = np.clip(color * np.float32(255.0) + np.float32(0.5), 0, 255)
        depth[r0:r1] = np.where(np.isfinite(t), t, np.float32(0.0))
        primitive[r0:r1] = prim
    return Frame(rgb=rgb, depth=depth, primitive=primitive)


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


# ---- scene generators ----------------------------------------------------------------------------------------
def _gray(rng, lo, hi, tint=0.05):
    g = rng.uniform(lo, hi)
    return tuple(float(np.clip(g + rng.uniform(-tint, tint), 0, 1)) for _ in range(3))


def _kitti_street(rng: np.random.Generator, travel: float) -> tuple[Scene, float]:
    """A street: road and pavements on the ground, facades on both sides, a closing row of buildings ahead,
    parked and oncoming cars, poles. `travel` metres of camera motion must stay clear. Returns (scene, lane x)."""
    road = float(rng.uniform(5.5, 7.0))  # kerb to centre line: a lane plus a parking strip
    walk = float(rng.uniform(1.5, 3.5))
    end = float(rng.uniform(travel + 32.0, 76.0))  # closing facade: bounds every ray, keeps GT inside 80 m
    materials: list[Material] = [
        Material(_gray(rng, 0.28, 0.4, 0.02), scale=0.8, contrast=0.5, pattern=ROAD, seed=1),
    ]
    boxes, box_mats = [], []

    def add(lo, hi, side, top=None):
        boxes.append((lo, hi))
        box_mats.append((side, side if top is None else top))

    def facade_material(seed):
        base = rng.uniform(0.35, 0.8)
        hue = rng.uniform(-0.12, 0.12, 3)
        color = tuple(float(np.clip(base + h, 0.05, 0.95)) for h in hue)
        scale = float(rng.uniform(0.8, 3.0))
        materials.append(Material(color, scale=scale, contrast=0.5, pattern=FACADE, seed=seed))
        return len(materials) - 1

    roof = len(materials)
    materials.append(Material(_gray(rng, 0.2, 0.35), scale=2.0, contrast=0.3, seed=3))
    for sign in (-1.0, 1.0):
        z = -25.0
        while z < end:
            length = float(rng.uniform(6.0, 22.0))
            inner = road + walk + float(rng.uniform(0.0, 1.5))
            height = float(rng.uniform(5.0, 22.0))
            x0, x1 = sorted((sign * inner, sign * (inner + 12.0)))
            add((x0, -height, z), (x1, 0.0, min(z + length, end)), facade_material(len(boxes) + 10), roof)
            z += length + float(rng.uniform(0.0, 7.0)) * (rng.random() < 0.4)
    add((-80.0, -float(rng.uniform(8.0, 25.0)), end), (80.0, 0.0, end + 15.0), facade_material(99), roof)

    lane = -road / 2.0  # the camera's lane; parked cars (>= road - 2.1 from the centre) never reach it
    for _ in range(int(rng.integers(2, 7))):  # parked cars along both kerbs
        sign = rng.choice([-1.0, 1.0])
        cz = float(rng.uniform(-5.0, end - 6.0))
        x_in = road - 0.3 - 1.8
        x0, x1 = sorted((sign * x_in, sign * (road - 0.3)))
        h = float(rng.uniform(1.35, 1.7))
        add((x0, -h, cz), (x1, 0.0, cz + float(rng.uniform(3.8, 4.8))), _car(rng, materials), roof)
    for _ in range(int(rng.integers(0, 3))):  # oncoming traffic in the other lane, ahead of all frames
        cz = float(rng.uniform(travel + 6.0, end - 6.0))
        h = float(rng.uniform(1.4, 1.8))
        add((-lane - 0.9, -h, cz), (-lane + 0.9, 0.0, cz + 4.5), _car(rng, materials), roof)
    pole = len(materials)
    materials.append(Material(_gray(rng, 0.3, 0.5), scale=0.5, contrast=0.3, seed=7))
    z = float(rng.uniform(-10.0, 5.0))
    while z < end - 2:
        sign = rng.choice([-1.0, 1.0])
        x = sign * (road + 0.5)
        add((x - 0.12, -float(rng.uniform(4.0, 7.5)), z), (x + 0.12, 0.0, z + 0.24), pole)
        z += float(rng.uniform(8.0, 25.0))

    scene = Scene(
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 2, 3),
        box_materials=tuple(box_mats),
        materials=tuple(materials),
        ground=0,
        outdoor=True,
        light=(float(rng.uniform(-0.6, 0.6)), -1.0, float(rng.uniform(-0.5, 0.5))),
        haze=_gray(rng, 0.72, 0.88, 0.03),
        haze_distance=float(rng.uniform(55.0, 110.0)),
        sky_zenith=(float(rng.uniform(0.3, 0.5)), float(rng.uniform(0.45, 0.6)), float(rng.uniform(0.75, 0.9))),
        road_half_width=road,
    )
    return scene, lane


def _car(rng, materials: list[Material]) -> int:
    hue = rng.uniform(0.05, 0.9, 3)
    materials.append(Material(tuple(float(h) for h in hue), scale=0.6, contrast=0.2, seed=len(materials)))
    return len(materials) - 1


def _nyu_room(rng: np.random.Generator) -> tuple[Scene, float]:
    """A room around the camera origin (x, z) = (0, 0): floor, ceiling, four walls and furniture boxes.
    Returns (scene, camera height)."""
    width = float(rng.uniform(3.0, 6.0))
    height = float(rng.uniform(2.4, 3.1))
    cam_h = float(rng.uniform(1.0, 1.6))
    back = float(rng.uniform(3.5, 8.5))
    behind = float(rng.uniform(0.3, 1.0))
    left = float(rng.uniform(0.25, 0.75)) * width
    lo = np.array([-left, -height, -behind])
    hi = np.array([width - left, 0.0, back])
    # Every point of the room within NYU_MAX_DEPTH of every camera position (the eye moves ±0.3 m).
    while math.sqrt((max(left, width - left) + 0.3) ** 2 + height**2 + (back + 0.3) ** 2) > NYU_MAX_DEPTH:
        back *= 0.95
    hi[2] = back
    materials = [
        Material(_gray(rng, 0.6, 0.9, 0.08), scale=float(rng.uniform(0.3, 1.2)), contrast=0.35, pattern=PLAIN, seed=1),
        Material(tuple(float(c) for c in rng.uniform([0.35, 0.22, 0.12], [0.65, 0.45, 0.3])), scale=0.5,
                 contrast=0.4, pattern=PLANKS if rng.random() < 0.6 else TILES, seed=2),
        Material(_gray(rng, 0.8, 0.95, 0.02), scale=1.0, contrast=0.1, seed=3),
    ]
    boxes, box_mats = [], []
    for _ in range(int(rng.integers(2, 6))):
        w, dz, h = rng.uniform(0.4, 1.8), rng.uniform(0.4, 1.2), rng.uniform(0.4, 2.0)
        x0 = float(rng.uniform(lo[0], hi[0] - w))
        z0 = float(rng.uniform(1.2, max(1.3, back - dz)))
        color = tuple(float(c) for c in rng.uniform(0.1, 0.85, 3))
        materials.append(Material(color, scale=float(rng.uniform(0.2, 0.8)), contrast=0.35, seed=len(materials)))
        boxes.append(((x0, -h, z0), (x0 + w, 0.0, min(z0 + dz, back))))
        box_mats.append((len(materials) - 1, len(materials) - 1))
    scene = Scene(
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 2, 3),
        box_materials=tuple(box_mats),
        materials=tuple(materials),
        room=np.stack([lo, hi]).astype(np.float32),
        room_materials=(0, 1, 2),
        outdoor=False,
        light=(float(rng.uniform(-0.5, 0.5)), -1.0, float(rng.uniform(-0.3, 0.6))),
        haze_distance=float(rng.uniform(3.5, 6.5)),
    )
    return scene, cam_h


# ---- planning and writing --------------------------------------------------------------------------------------
def _groups(n: int) -> list[int]:
    """Frames per group (drive / scene): several groups even for small sets, so validation can be carved."""
    per = max(1, min(8, n // 4))
    sizes = [per] * (n // per)
    if n % per:
        sizes.append(n % per)
    return sizes


def plan_dataset(layout: Literal["kitti", "nyu"], train: int, test: int, seed: int) -> list[FramePlan]:
    """Every frame of the dataset, in split-file order (train then test). Cheap: scenes are described, not
    rendered. Deterministic for (layout, train, test, seed)."""
    if layout not in SPLIT_NAMES:
        raise ValueError(f"unknown layout {layout!r}: expected 'kitti' or 'nyu'")
    if train < 0 or test < 0:
        raise ValueError(f"frame counts must be >= 0, got train={train}, test={test}")
    plans: list[FramePlan] = []
    group_index = 0
    frame_counter = 0
    for split, n in (("train", train), ("test", test)):
        split_plans: list[FramePlan] = []
        for size in _groups(n):
            rng = np.random.default_rng([seed, group_index, 0 if layout == "kitti" else 1])
            if layout == "kitti":
                split_plans += _plan_drive(rng, split, group_index, size)
            else:
                split_plans += _plan_room(rng, split, group_index, size, frame_counter)
                frame_counter += size
            group_index += 1
        if split == "test" and layout == "kitti" and len(split_plans) >= 2:
            # Like the real Eigen test split (45 of 697), some lines have no ground truth: about 1 in 8 here.
            rng = np.random.default_rng([seed, 7919])
            n_none = max(1, round(len(split_plans) / 8))
            for i in sorted(rng.choice(len(split_plans), size=n_none, replace=False)):
                split_plans[i] = dataclasses.replace(split_plans[i], depth_rel=None)
        plans += split_plans
    return plans


def _plan_drive(rng: np.random.Generator, split: str, index: int, n: int) -> list[FramePlan]:
    date, (H, W), focal, cx, cy = KITTI_DATES[index % len(KITTI_DATES)]
    drive = f"{date}_drive_{index + 1:04d}_sync"
    step = float(rng.uniform(0.8, 2.2))  # metres driven between listed frames
    scene, lane = _kitti_street(rng, travel=step * max(n - 1, 0))
    start, stride = int(rng.integers(0, 60)), int(rng.integers(3, 12))
    yaw0 = float(rng.uniform(-0.03, 0.03))
    plans = []
    for k in range(n):
        frame = f"{start + k * stride:010d}"
        cam = Camera(H, W, focal, cx, cy, position=(lane + float(rng.uniform(-0.3, 0.3)), -KITTI_CAMERA_HEIGHT,
                     k * step), yaw=yaw0 + float(rng.uniform(-0.02, 0.02)))
        plans.append(FramePlan(
            layout="kitti", split=split, group=drive,
            image_rel=f"{date}/{drive}/image_02/data/{frame}.png",
            depth_rel=f"{drive}/proj_depth/groundtruth/image_02/{frame}.png",
            focal=focal, camera=cam, scene=scene, seed=int(rng.integers(2**31)),
        ))
    return plans


def _plan_room(rng: np.random.Generator, split: str, index: int, n: int, first: int) -> list[FramePlan]:
    category = NYU_CATEGORIES[index % len(NYU_CATEGORIES)]
    # Train scenes are recordings (kitchen_0003); the official test split groups images by category folder.
    folder = f"{category}_{index + 1:04d}" if split == "train" else category
    scene, cam_h = _nyu_room(rng)
    H, W = NYU_SIZE
    plans = []
    for k in range(n):
        number = f"{first + k + 1:05d}"
        cam = Camera(H, W, NYU_FOCAL, NYU_CX, NYU_CY,
                     position=(float(rng.uniform(-0.3, 0.3)), -cam_h + float(rng.uniform(-0.1, 0.1)),
                               float(rng.uniform(-0.1, 0.3))),
                     yaw=float(rng.uniform(-0.35, 0.35)), pitch=float(rng.uniform(-0.05, 0.25)))
        plans.append(FramePlan(
            layout="nyu", split=split, group=folder,
            image_rel=f"{folder}/rgb_{number}.jpg", depth_rel=f"{folder}/sync_depth_{number}.png",
            focal=NYU_FOCAL, camera=cam, scene=scene, seed=int(rng.integers(2**31)),
        ))
    return plans


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
        scale = 256.0 if plan.layout == "kitti" else 1000.0  # = datasets.DEPTH_SCALE; 0 stays "no measurement"
        q = np.clip(np.round(gt.astype(np.float64) * scale), 0, 65535).astype(np.uint16)
        _save_atomic(q, depth_root / plan.depth_rel, format="PNG", compress_level=1)


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
    workers = workers or min(8, os.cpu_count() or 1)
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
