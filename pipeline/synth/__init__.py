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

    ensure(cfg.data)  # what a run calls first: renders `data.synth`'s dataset when missing or stale
"""

from pipeline.synth.raycast import cast
from pipeline.synth.render import KITTI_LIDAR_RANGE, Frame, lidar_mask, render
from pipeline.synth.scene import FACADE, PLAIN, PLANKS, ROAD, TILES, Camera, Material, Scene
from pipeline.synth.scenes import (
    KITTI_CAMERA_HEIGHT, KITTI_DATES, NYU_CATEGORIES, NYU_CX, NYU_CY, NYU_FOCAL, NYU_MAX_DEPTH, NYU_SIZE, SPLIT_NAMES,
    FramePlan, plan_dataset,
)
from pipeline.synth.shading import shade
from pipeline.synth.write import STAMP_NAME, SYNTH_VERSION, ensure, render_plan, synthesize, synthesize_to

__all__ = [
    "Camera", "Material", "Scene", "PLAIN", "ROAD", "FACADE", "PLANKS", "TILES",
    "cast", "shade", "Frame", "render", "lidar_mask", "KITTI_LIDAR_RANGE",
    "FramePlan", "plan_dataset", "KITTI_DATES", "KITTI_CAMERA_HEIGHT", "NYU_SIZE", "NYU_FOCAL", "NYU_CX", "NYU_CY",
    "NYU_MAX_DEPTH", "NYU_CATEGORIES", "SPLIT_NAMES",
    "render_plan", "synthesize_to", "synthesize", "ensure", "SYNTH_VERSION", "STAMP_NAME",
]
