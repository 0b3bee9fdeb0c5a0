"""Split-file readers, validation carving, image/depth decoding errors, training views, and `synth.ensure` (the
synthetic dataset rendered when a run needs it, or a missing real one named by its config key)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import synth
from pipeline.config import DataConfig, SynthConfig, ViewConfig
from pipeline.datasets import (
    DEPTH_SCALE, DatasetError, View, apply_view, load_depth, load_image, make_views,
    parse_split_file, read_split,
)

TRAIN, TEST = 24, 8  # 4 train drives of 6 frames, 4 test drives of 2; one test line has GT None (the demo's counts
# and seed in the tests' config: rendered once a run, tests/conftest.py)


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets") / "kitti"
    paths = synth.synthesize("kitti", root, train=TRAIN, test=TEST, seed=0)
    return DataConfig(
        layout="kitti", image_root=str(paths["image_root"]), depth_root=str(paths["depth_root"]),
        train_split=str(paths["train_split"]), test_split=str(paths["test_split"]), val_fraction=0.25,
    )


def test_kitti_split_counts(kitti):
    train, val, test = (read_split(kitti, s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == TRAIN and len(val) == 6  # one of four drives
    assert len(test) == TEST
    assert sum(s.depth_path is None for s in test) == 1 and sum(s.depth_path is not None for s in test) == 7
    assert all(s.depth_path is not None for s in train + val)
    ids = [s.id for s in train + val + test]
    assert len(set(ids)) == len(ids)
    sample = test[0]
    drive, frame = sample.id.split("/")
    assert drive.endswith("_sync") and len(frame) == 10 and sample.group == drive
    assert sample.focal > 700 and sample.line == 1 and sample.split_file == Path(kitti.test_split)


def test_val_groups_disjoint_and_deterministic(kitti):
    train, val = read_split(kitti, "train"), read_split(kitti, "val")
    assert {s.group for s in train}.isdisjoint({s.group for s in val})
    assert [s.id for s in read_split(kitti, "val")] == [s.id for s in val]
    test_groups = {s.group for s in read_split(kitti, "test")}
    assert test_groups.isdisjoint({s.group for s in val})
    chosen = {read_split(kitti.model_copy(update={"val_seed": seed}), "val")[0].group for seed in range(12)}
    assert len(chosen) > 1  # the seed matters
    none = kitti.model_copy(update={"val_fraction": 0.0})
    assert read_split(none, "val") == [] and len(read_split(none, "train")) == TRAIN


def test_leading_slash_comments_and_blank_lines(kitti, tmp_path):
    lines = Path(kitti.test_split).read_text().splitlines()
    slashed = ["# BTS-style split with absolute-looking paths", ""]
    for line in lines:
        image, depth, focal = line.split()
        slashed.append(f"/{image} {depth if depth == 'None' else '/' + depth} {focal}")
    split = tmp_path / "slashed.txt"
    split.write_text("\n".join(slashed) + "\n\n")
    ours = parse_split_file(split, Path(kitti.image_root), Path(kitti.depth_root), "kitti")
    theirs = read_split(kitti, "test")
    assert [(s.id, s.image_path, s.depth_path, s.focal) for s in ours] == \
        [(s.id, s.image_path, s.depth_path, s.focal) for s in theirs]
    assert ours[0].line == 3  # file line numbers, comments and blanks counted
    assert load_image(ours[0]).shape[2] == 3


@pytest.mark.parametrize("bad", ["only_two fields", "a.png b.png not_a_number", "a.png b.png 721 extra"])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    split = tmp_path / "split.txt"
    split.write_text(f"x/y_sync/image_02/data/0000000001.png None 721.5\n\n{bad}\n")
    with pytest.raises(DatasetError, match=r"line 3 of .*split\.txt"):
        parse_split_file(split, tmp_path, tmp_path, "kitti")


def test_missing_split_file_names_the_config_key(kitti, tmp_path):
    cfg = kitti.model_copy(update={"train_split": str(tmp_path / "nope.txt")})
    with pytest.raises(DatasetError, match=r"nope\.txt.*data\.train_split"):
        read_split(cfg, "train")


def _one_line_split(kitti, tmp_path) -> Path:
    """A copy of the first test frame with GT, listed on line 2 of its own split file."""
    sample = next(s for s in read_split(kitti, "test") if s.depth_path is not None)
    image_rel = sample.image_path.relative_to(kitti.image_root)
    depth_rel = sample.depth_path.relative_to(kitti.depth_root)
    copies = ((sample.image_path, tmp_path / "raw" / image_rel), (sample.depth_path, tmp_path / "gt" / depth_rel))
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    split = tmp_path / "one.txt"
    split.write_text(f"# one frame\n{image_rel} {depth_rel} {sample.focal}\n")
    return split


def test_deleted_image_raises_with_path_and_line(kitti, tmp_path):
    split = _one_line_split(kitti, tmp_path)
    (sample,) = parse_split_file(split, tmp_path / "raw", tmp_path / "gt", "kitti")
    assert load_image(sample).dtype == np.uint8
    sample.image_path.unlink()
    with pytest.raises(DatasetError) as err:
        load_image(sample)
    assert str(sample.image_path) in str(err.value) and "line 2 of" in str(err.value) and "one.txt" in str(err.value)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16"])
def test_png_frames_decode_to_pillows_pixels(kitti, tmp_path, mode, monkeypatch):
    """8-bit RGB(A) PNGs are decoded by imagecodecs, every other mode by Pillow: `load_image` gives Pillow's
    `convert("RGB")` pixels either way, and a truncated RGB PNG is named as unreadable."""
    import imagecodecs
    from PIL import Image

    split = _one_line_split(kitti, tmp_path)
    (sample,) = parse_split_file(split, tmp_path / "raw", tmp_path / "gt", "kitti")
    rgb = Image.open(sample.image_path).convert("RGB").crop((0, 150, 320, 246))  # a corner: the size is not tested
    noisy = np.random.default_rng(0).integers(0, 256, (rgb.size[1], rgb.size[0], 3), dtype=np.uint8)
    rgb = Image.fromarray(np.where(np.arange(rgb.size[0])[None, :, None] % 7 == 0, noisy, np.array(rgb)))
    img = {"RGB": rgb, "RGBA": rgb.convert("RGBA"), "P": rgb.quantize(64), "L": rgb.convert("L"),
           "I;16": rgb.convert("I").point(lambda v: v * 200).convert("I;16")}[mode]
    img.save(sample.image_path)
    expected = np.array(Image.open(sample.image_path).convert("RGB"))
    import pipeline.datasets as ds

    calls, decode = [], imagecodecs.png_decode
    monkeypatch.setattr(ds.imagecodecs, "png_decode", lambda data: calls.append(1) or decode(data))
    got = load_image(sample)
    assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, expected)
    assert len(calls) == (mode in ("RGB", "RGBA"))  # imagecodecs for 8-bit RGB(A), Pillow for the rest
    if mode == "RGB":
        data = sample.image_path.read_bytes()
        sample.image_path.write_bytes(data[: len(data) // 2])
        with pytest.raises(DatasetError) as err:
            load_image(sample)
        assert str(err.value).startswith(f"image file unreadable: {sample.image_path} (line 2 of")


def test_corrupt_depth_raises_with_path_and_line(kitti, tmp_path):
    split = _one_line_split(kitti, tmp_path)
    (sample,) = parse_split_file(split, tmp_path / "raw", tmp_path / "gt", "kitti")
    assert load_depth(sample, "kitti").dtype == np.float32
    data = sample.depth_path.read_bytes()
    sample.depth_path.write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(DatasetError) as err:
        load_depth(sample, "kitti")
    assert str(sample.depth_path) in str(err.value) and "line 2 of" in str(err.value)
    sample.depth_path.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match="line 2 of"):
        load_depth(sample, "kitti")


def test_depth_scales_and_none(kitti, tmp_path):
    assert DEPTH_SCALE == {"kitti": 256.0, "nyu": 1000.0}
    test = read_split(kitti, "test")
    assert load_depth(next(s for s in test if s.depth_path is None), "kitti") is None
    sample = next(s for s in test if s.depth_path is not None)
    from PIL import Image

    raw = np.array(Image.open(sample.depth_path))
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(load_depth(sample, "kitti"), raw.astype(np.float32) / 256)
    np.testing.assert_allclose(load_depth(sample, "nyu"), raw.astype(np.float32) / 1000)
    assert load_depth(sample, "kitti").shape == load_image(sample).shape[:2]


def test_nyu_groups_merge_recordings_of_one_room(tmp_path):
    split = tmp_path / "nyu.txt"
    split.write_text(
        "/kitchen_0028a/rgb_00001.jpg /kitchen_0028a/sync_depth_00001.png 518.8579\n"
        "/kitchen_0028b/rgb_00045.jpg /kitchen_0028b/sync_depth_00045.png 518.8579\n"
        "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579\n"
    )
    samples = parse_split_file(split, tmp_path / "sync", tmp_path / "sync", "nyu")
    assert [s.id for s in samples] == ["kitchen_0028a/00001", "kitchen_0028b/00045", "bathroom/00045"]
    assert [s.group for s in samples] == ["kitchen_0028", "kitchen_0028", "bathroom"]
    assert samples[1].image_path == tmp_path / "sync" / "kitchen_0028b" / "rgb_00045.jpg"


# ---- views ---------------------------------------------------------------------------------------------------
def test_kb_crop_coordinates():
    views = ViewConfig(kb_crop=True, mode="full")
    assert make_views("d/0", (375, 1242), views, "kitti", train=True) == [View(0, 23, 13, 352, 1216)]
    assert make_views("d/0", (370, 1224), views, "kitti", train=True) == [View(0, 18, 4, 352, 1216)]
    assert make_views("d/0", (375, 1242), views, "nyu", train=True) == [View(0, 0, 0, 375, 1242)]
    assert make_views("d/0", (375, 1242), views, "kitti", train=False) == [View(0, 0, 0, 375, 1242)]
    center = ViewConfig(kb_crop=True, mode="center", crop_size=(352, 704))
    assert make_views("d/0", (375, 1242), center, "kitti", train=True) == [View(0, 23, 13 + 256, 352, 704)]


def test_random_views_deterministic_distinct_and_in_bounds():
    views = ViewConfig(kb_crop=True, mode="random", crop_size=(320, 704), views_per_image=4, seed=42)
    a = make_views("2011_09_26_drive_0001_sync/0000000005", (375, 1242), views, "kitti", train=True)
    b = make_views("2011_09_26_drive_0001_sync/0000000005", (375, 1242), views, "kitti", train=True)
    other = make_views("2011_09_26_drive_0001_sync/0000000006", (375, 1242), views, "kitti", train=True)
    assert a == b and [v.k for v in a] == [0, 1, 2, 3]
    assert len({(v.top, v.left) for v in a}) == 4 and a != other
    for v in a:
        assert (v.height, v.width) == (320, 704)
        assert 23 <= v.top and v.top + v.height <= 375 and 13 <= v.left and v.left + v.width <= 13 + 1216
    reseeded = make_views("2011_09_26_drive_0001_sync/0000000005", (375, 1242),
                          views.model_copy(update={"seed": 7}), "kitti", train=True)
    assert reseeded != a


def test_crop_larger_than_region_is_clamped():
    views = ViewConfig(kb_crop=False, mode="random", crop_size=(600, 2000), views_per_image=2)
    assert make_views("s/1", (480, 640), views, "nyu", train=True) == [View(0, 0, 0, 480, 640), View(1, 0, 0, 480, 640)]
    views = ViewConfig(kb_crop=True, mode="random", crop_size=(400, 704), views_per_image=1)
    (v,) = make_views("s/1", (375, 1242), views, "kitti", train=True)
    assert (v.top, v.height) == (23, 352)


def test_apply_view_crops_images_and_depth():
    image = np.arange(375 * 1242 * 3, dtype=np.int64).reshape(375, 1242, 3)
    depth = image[..., 0].astype(np.float32)
    view = View(0, 23, 13, 352, 1216)
    assert apply_view(image, view).shape == (352, 1216, 3) and apply_view(depth, view).shape == (352, 1216)
    np.testing.assert_array_equal(apply_view(image, view)[0, 0], image[23, 13])
    with pytest.raises(ValueError):
        apply_view(depth, View(0, 100, 0, 352, 1216))


# ---- synth.ensure ------------------------------------------------------------------------------------------------
def _cfg(root: Path, synth_cfg: SynthConfig | None) -> DataConfig:
    return DataConfig(
        layout="kitti", image_root=str(root / "raw"), depth_root=str(root / "gt"),
        train_split=str(root / "splits" / "eigen_train_files_with_gt.txt"),
        test_split=str(root / "splits" / "eigen_test_files_with_gt.txt"), synth=synth_cfg,
    )


def test_synth_ensure_generates_once(tmp_path, caplog):
    cfg = _cfg(tmp_path / "demo", SynthConfig(train=2, test=1, seed=0))
    with caplog.at_level(logging.INFO, logger="pipeline.synth.write"):
        synth.ensure(cfg)
    assert "synthetic kitti dataset" in caplog.text
    assert len(read_split(cfg, "train")) + len(read_split(cfg, "val")) == 2 and len(read_split(cfg, "test")) == 1
    stamp = Path(cfg.train_split).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.synth.write"):
        synth.ensure(cfg)  # present and current: untouched
    assert caplog.text == "" and Path(cfg.train_split).stat().st_mtime_ns == stamp
    bigger = cfg.model_copy(update={"synth": SynthConfig(train=3, test=1, seed=0)})
    synth.ensure(bigger)  # other synth settings: regenerated
    assert len(read_split(bigger, "train")) + len(read_split(bigger, "val")) == 3


def test_synth_ensure_without_synth_names_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"eigen_train_files_with_gt\.txt.*data\.train_split"):
        synth.ensure(_cfg(tmp_path / "real", None))
    real = _cfg(tmp_path / "real", None)
    for split in (real.train_split, real.test_split):
        Path(split).parent.mkdir(parents=True, exist_ok=True)
        Path(split).write_text("")
    with pytest.raises(DatasetError, match=r"raw.*data\.image_root"):
        synth.ensure(real)
