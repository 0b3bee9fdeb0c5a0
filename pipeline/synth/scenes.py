"""Scene generators (a KITTI street, an NYU room) and the dataset plan: every frame's camera, scene and place in the
real on-disk layout, described (cheaply) before anything is rendered."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.synth.scene import FACADE, PLAIN, PLANKS, ROAD, TILES, Camera, Material, Scene

# (date, (H, W), focal, cx, cy): frame sizes and left-colour-camera intrinsics of the real KITTI recording days.
KITTI_DATES = (
    ("2011_09_26", (375, 1242), 721.5377, 609.5593, 172.8540),
    ("2011_09_28", (370, 1224), 707.0493, 604.0814, 180.5066),
    ("2011_09_29", (374, 1238), 718.3351, 600.3891, 181.5122),
    ("2011_10_03", (376, 1241), 718.8560, 607.1928, 185.2157),
)
KITTI_CAMERA_HEIGHT = 1.65  # metres, the KITTI rig's colour cameras
NYU_SIZE = (480, 640)
NYU_FOCAL, NYU_CX, NYU_CY = 518.8579, 325.5824, 253.7362  # Kinect colour camera (BTS split-file focal)
NYU_MAX_DEPTH = 9.9  # every visible point closer than 10 m (Euclidean, hence also in z)
NYU_CATEGORIES = ("bathroom", "bedroom", "kitchen", "living_room", "office", "dining_room", "study_room", "classroom")

SPLIT_NAMES = {
    "kitti": ("eigen_train_files_with_gt.txt", "eigen_test_files_with_gt.txt"),
    "nyu": ("nyudepthv2_train_files_with_gt.txt", "nyudepthv2_test_files_with_gt.txt"),
}


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


# ---- the dataset plan ------------------------------------------------------------------------------------------
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
