"""The procedural dataset: exact depth, the real on-disk layouts, LiDAR-like sparsity, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import synth
from pipeline.config import DataConfig
from pipeline.datasets import load_depth, load_image, read_split

pytestmark = pytest.mark.usefixtures("real_rendering")  # the generator itself, not the session's copies of it


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def kitti_plans():
    return synth.plan_dataset("kitti", train=16, test=8, seed=3)


def test_ground_plane_depth_matches_the_analytic_formula(kitti_plans):
    for plan in kitti_plans[:3]:
        cam = plan.camera
        assert cam.pitch == 0 and cam.position[1] == -synth.KITTI_CAMERA_HEIGHT
        frame = synth.render(plan.scene, cam)
        primitive = synth.cast(plan.scene, cam)[1]  # (H, W): -1 sky, 0 the ground plane, k >= 1 box k-1
        rows, cols = np.nonzero(primitive == 0)
        assert rows.size > 10_000
        # A level pinhole camera h metres above a plane sees it in row v at depth f·h / (v − cy), whatever the yaw.
        expected = cam.focal * synth.KITTI_CAMERA_HEIGHT / (rows - cam.cy)
        np.testing.assert_allclose(frame.depth[rows, cols], expected, rtol=2e-6)
        assert (rows > cam.cy).all()


def test_sky_has_no_depth_and_boxes_are_closer_than_what_they_hide(kitti_plans):
    frame = synth.render(kitti_plans[0].scene, kitti_plans[0].camera)
    sky = synth.cast(kitti_plans[0].scene, kitti_plans[0].camera)[1] == -1  # no primitive hit
    assert (frame.depth[sky] == 0).all() and (frame.depth[~sky] > 0).all()
    assert np.isfinite(frame.depth).all()
    assert frame.rgb.dtype == np.uint8 and frame.rgb.shape == (*frame.depth.shape, 3)


def test_kitti_ground_truth_is_sparse_like_lidar(kitti_plans):
    for plan in kitti_plans[:4]:
        frame, gt = synth.render_plan(plan)
        valid = gt > 0
        assert 0.05 <= valid.mean() <= 0.15, valid.mean()
        assert not valid[frame.depth == 0].any()  # nothing in the sky
        top = int(plan.camera.cy - 40)  # the highest beam (+2°) stays below cy - f·tan 2° / cos(azimuth)
        assert not valid[:top].any()
        assert gt.max() <= synth.KITTI_LIDAR_RANGE
        np.testing.assert_array_equal(gt[valid], frame.depth[valid])


def test_kitti_frame_sizes_vary_and_drives_repeat(kitti_plans):
    sizes = {(p.camera.height, p.camera.width) for p in kitti_plans}
    assert sizes == {(375, 1242), (370, 1224), (374, 1238), (376, 1241)}
    train_drives = {p.group for p in kitti_plans if p.split == "train"}
    test_drives = {p.group for p in kitti_plans if p.split == "test"}
    assert len(train_drives) >= 3 and not train_drives & test_drives
    n_none = sum(p.depth_rel is None for p in kitti_plans)
    assert n_none == 1 and all(p.split == "test" for p in kitti_plans if p.depth_rel is None)


def test_kitti_layout_on_disk(kitti_tree):
    root, paths = kitti_tree
    assert paths["image_root"] == root / "raw" and paths["depth_root"] == root / "gt"
    assert paths["train_split"] == root / "splits" / "eigen_train_files_with_gt.txt"
    assert paths["test_split"] == root / "splits" / "eigen_test_files_with_gt.txt"
    first = paths["train_split"].read_text().splitlines()[0].split()
    image_rel, depth_rel, focal = first
    date, drive, cam, data, name = image_rel.split("/")
    assert drive.startswith(date + "_drive_") and drive.endswith("_sync") and (cam, data) == ("image_02", "data")
    assert depth_rel == f"{drive}/proj_depth/groundtruth/image_02/{name}" and len(Path(name).stem) == 10
    assert float(focal) == pytest.approx(721.5377)
    image = Image.open(root / "raw" / image_rel)
    depth = Image.open(root / "gt" / depth_rel)
    assert image.mode == "RGB" and depth.mode.startswith("I;16") and image.size == depth.size


def test_written_depth_decodes_to_the_rendered_depth(kitti_tree):
    root, paths = kitti_tree
    cfg = DataConfig(layout="kitti", image_root=str(paths["image_root"]), depth_root=str(paths["depth_root"]),
                     train_split=str(paths["train_split"]), test_split=str(paths["test_split"]), val_fraction=0.0)
    plans = {p.image_rel: p for p in synth.plan_dataset("kitti", **KITTI_COUNTS)}
    sizes = set()
    first_of_drive = {s.group: s for s in reversed(read_split(cfg, "train"))}
    for sample in list(first_of_drive.values())[:3]:
        frame, gt = synth.render_plan(plans[str(sample.image_path.relative_to(paths["image_root"]))])
        depth = load_depth(sample, "kitti")
        np.testing.assert_array_equal(depth > 0, gt > 0)
        assert np.abs(depth - gt).max() <= 0.5 / 256 + 1e-6  # uint16 / 256 quantisation
        np.testing.assert_array_equal(load_image(sample), frame.rgb)  # PNG is lossless
        sizes.add(depth.shape)
    assert len(sizes) >= 2


def test_nyu_layout_ranges_and_decoding(tmp_path):
    paths = synth.synthesize("nyu", tmp_path / "nyu", train=8, test=4, seed=1)
    sync = tmp_path / "nyu" / "sync"
    assert paths["image_root"] == sync and paths["depth_root"] == sync
    train_lines = paths["train_split"].read_text().splitlines()
    assert paths["train_split"].name == "nyudepthv2_train_files_with_gt.txt" and len(train_lines) == 8
    assert paths["test_split"].name == "nyudepthv2_test_files_with_gt.txt"
    assert all(line.startswith("/") for line in train_lines)  # as in the BTS NYU train file
    images = sorted(sync.rglob("rgb_*.jpg"))
    depths = sorted(sync.rglob("sync_depth_*.png"))
    assert len(images) == len(depths) == 12
    for image_path in images:
        assert len(image_path.stem) == len("rgb_00045")
        assert (image_path.parent / image_path.name.replace("rgb_", "sync_depth_").replace(".jpg", ".png")).exists()
        assert Image.open(image_path).format == "JPEG" and Image.open(image_path).size == (640, 480)
    cfg = DataConfig(layout="nyu", image_root=str(sync), depth_root=str(sync), train_split=str(paths["train_split"]),
                     test_split=str(paths["test_split"]), val_fraction=0.0)
    plans = {p.image_rel: p for p in synth.plan_dataset("nyu", 8, 4, 1)}
    for sample in read_split(cfg, "train")[:2] + read_split(cfg, "test")[:2]:
        depth = load_depth(sample, "nyu")
        assert depth.shape == (480, 640) and depth.min() > 0 and depth.max() <= 10.0  # dense, within (0, 10]
        _, gt = synth.render_plan(plans[str(sample.image_path.relative_to(sync))])
        assert np.abs(depth - gt).max() <= 0.5 / 1000 + 1e-6  # uint16 / 1000 quantisation


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
@pytest.mark.parametrize("layout", ["kitti", "nyu"])
def test_same_seed_same_bytes(tmp_path, layout):
    synth.synthesize(layout, tmp_path / "a", train=2, test=2, seed=5)
    synth.synthesize(layout, tmp_path / "b", train=2, test=2, seed=5)
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(a) >= 9 and a == b  # images, depth maps, split files, stamp
    synth.synthesize(layout, tmp_path / "c", train=2, test=2, seed=6)
    c = _tree_digest(tmp_path / "c")
    assert any(a[k] != c.get(k) for k in a if k.endswith((".png", ".jpg")))


KITTI_COUNTS = {"train": 8, "test": 2, "seed": 2}  # 4 train drives of 2 frames: all four frame sizes


@pytest.fixture(scope="module")
def kitti_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "kitti"
    return root, synth.synthesize("kitti", root, **KITTI_COUNTS)
