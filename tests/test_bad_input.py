"""Bad input real datasets hold (issue 15): split files saved by other tools, and image / depth files that are not
what their split line promises. Each is either read correctly or refused with a DatasetError naming the file and
its split-file line."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.datasets import DatasetError, load_depth, load_image, parse_split_file

KITTI_IMAGE = "2011_09_26/2011_09_26_drive_{drive:04d}_sync/image_02/data/{frame:010d}.png"
KITTI_DEPTH = "2011_09_26_drive_{drive:04d}_sync/proj_depth/groundtruth/image_02/{frame:010d}.png"


# ---- split files ---------------------------------------------------------------------------------------------
def test_utf8_bom_is_not_part_of_the_first_path(tmp_path):
    split = tmp_path / "eigen_test_files_with_gt.txt"
    lines = [f"{KITTI_IMAGE.format(drive=2, frame=f)} {KITTI_DEPTH.format(drive=2, frame=f)} 721.5377" for f in (5, 6)]
    split.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")  # what Notepad's "UTF-8 with BOM" saves
    assert split.read_bytes()[:3] == b"\xef\xbb\xbf"
    samples = parse_split_file(split, tmp_path / "raw", tmp_path / "gt", "kitti")
    assert [s.id for s in samples] == ["2011_09_26_drive_0002_sync/0000000005", "2011_09_26_drive_0002_sync/0000000006"]
    assert samples[0].image_path == tmp_path / "raw" / KITTI_IMAGE.format(drive=2, frame=5)
    assert "\ufeff" not in str(samples[0].image_path) and samples[0].line == 1


def test_non_numeric_focal_is_named_with_file_and_line(tmp_path):
    split = tmp_path / "split.txt"
    split.write_text(f"# header\r\n{KITTI_IMAGE.format(drive=1, frame=1)} None 721.5\r\n"
                     f"{KITTI_IMAGE.format(drive=1, frame=2)} None 721,5\r\n")
    with pytest.raises(DatasetError) as err:
        parse_split_file(split, tmp_path, tmp_path, "kitti")
    assert str(err.value) == f"focal length '721,5' is not a number (line 3 of {split})"


@pytest.mark.parametrize("focal", ["nan", "inf", "-721.5", "0"])
def test_focal_that_is_not_a_positive_finite_number_is_refused(tmp_path, focal):
    split = tmp_path / "split.txt"
    split.write_text(f"{KITTI_IMAGE.format(drive=1, frame=1)} None {focal}\n")
    with pytest.raises(DatasetError, match=rf"positive finite number, got {focal} \(line 1 of .*split\.txt\)"):
        parse_split_file(split, tmp_path, tmp_path, "kitti")


def test_two_fields_are_named_with_file_and_line(tmp_path):
    split = tmp_path / "split.txt"
    split.write_text(f"\n{KITTI_IMAGE.format(drive=1, frame=1)} 721.5\n")
    with pytest.raises(DatasetError, match=r"expected '<image> <depth\|None> <focal>'.*\(line 2 of .*split\.txt\)"):
        parse_split_file(split, tmp_path, tmp_path, "kitti")


def test_split_file_that_is_not_utf8_or_is_a_directory(tmp_path):
    split = tmp_path / "latin1.txt"
    split.write_bytes(b"a/b_sync/image_02/data/1.png None 721.5\nsc\xe8ne/rgb_1.jpg None 518.8\n")
    with pytest.raises(DatasetError, match=r"latin1\.txt is not UTF-8 text \(line 2, byte 42\)"):
        parse_split_file(split, tmp_path, tmp_path, "kitti")
    with pytest.raises(DatasetError, match=r"is a directory, not a file"):
        parse_split_file(tmp_path, tmp_path, tmp_path, "kitti")


# A split file as a real one may be written: any mix of LF / CRLF endings, an optional BOM, blank lines, comment
# lines, runs of spaces or tabs between fields, BTS-style leading slashes, GT `None`, focal lengths in any float form.
frame_lines = st.lists(
    st.tuples(
        st.integers(0, 3),  # drive
        st.booleans(),  # GT None
        st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False),  # focal
        st.booleans(),  # leading slash
        st.sampled_from([" ", "  ", "\t", " \t "]),  # separator
    ),
    min_size=0, max_size=12,
)
noise = st.lists(st.sampled_from(["", "   ", "\t", "# comment", "  # indented comment", "#"]), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_lines, gaps=st.lists(noise, min_size=13, max_size=13),
       endings=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=64, max_size=64), bom=st.booleans(),
       final_newline=st.booleans())
@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_split_file_parser_properties(frames, gaps, endings, bom, final_newline):
    lines: list[str] = []
    expected = []  # (id, image rel, depth rel | None, focal, line number)
    for frame, (drive, none, focal, slash, sep) in enumerate(frames):
        lines += gaps[frame]
        image, depth = KITTI_IMAGE.format(drive=drive, frame=frame), KITTI_DEPTH.format(drive=drive, frame=frame)
        lead = "/" if slash else ""
        lines.append(sep.join([lead + image, "None" if none else lead + depth, repr(focal)]) + sep.strip(" "))
        expected.append((f"2011_09_26_drive_{drive:04d}_sync/{frame:010d}", image, None if none else depth, focal,
                         len(lines)))
    lines += gaps[-1]
    text = "".join(line + endings[i % len(endings)] for i, line in enumerate(lines))
    if not final_newline:
        text = text.rstrip("\r\n")
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "split.txt"
        split.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
        root = Path(tmp)
        samples = parse_split_file(split, root / "raw", root / "gt", "kitti")
    assert [(s.id, s.image_path, s.depth_path, s.focal, s.line) for s in samples] == [
        (i, root / "raw" / image, None if depth is None else root / "gt" / depth, focal, line)
        for i, image, depth, focal, line in expected
    ]
    assert all(s.split_file == split and s.group == s.id.split("/")[0] for s in samples)
    assert all(math.isfinite(s.focal) and s.focal > 0 for s in samples)


@settings(max_examples=100, deadline=None)
@given(n_before=st.integers(0, 5), fields=st.integers(1, 6).filter(lambda n: n != 3), crlf=st.booleans())
def test_split_file_parser_names_the_line_with_a_wrong_field_count(n_before, fields, crlf):
    eol = "\r\n" if crlf else "\n"
    good = [f"{KITTI_IMAGE.format(drive=0, frame=f)} None 721.5" for f in range(n_before)]
    bad = " ".join(["x"] * fields)
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "split.txt"
        split.write_text(eol.join(["# c", *good, bad, good[0] if good else ""]) + eol, newline="")
        with pytest.raises(DatasetError) as err:
            parse_split_file(split, Path(tmp), Path(tmp), "kitti")
    assert str(err.value).endswith(f"(line {n_before + 2} of {split})") and repr(bad) in str(err.value)


# ---- image and depth files -----------------------------------------------------------------------------------
@pytest.fixture
def frame(tmp_path):
    """One 8x6 RGB frame with its uint16 depth, listed on line 2 of a split file; returns (sample, tmp_path)."""
    image_rel, depth_rel = KITTI_IMAGE.format(drive=1, frame=0), KITTI_DEPTH.format(drive=1, frame=0)
    image, depth = tmp_path / "raw" / image_rel, tmp_path / "gt" / depth_rel
    for path in (image, depth):
        path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(image)
    Image.fromarray(rng.integers(1, 20000, (6, 8), dtype=np.uint16)).save(depth)
    split = tmp_path / "split.txt"
    split.write_text(f"# one frame\n{image_rel} {depth_rel} 721.5377\n")
    (sample,) = parse_split_file(split, tmp_path / "raw", tmp_path / "gt", "kitti")
    assert load_image(sample).shape == (6, 8, 3) and load_depth(sample, "kitti").shape == (6, 8)  # readable as is
    return sample


def where(sample) -> str:
    return f"(line 2 of {sample.split_file})"


def test_depth_of_another_size_than_its_image(frame):
    Image.fromarray(np.full((3, 4), 256, np.uint16)).save(frame.depth_path)
    with pytest.raises(DatasetError) as err:
        load_depth(frame, "kitti")
    assert str(err.value) == (f"depth file is 4x3 but its image {frame.image_path} is 8x6: {frame.depth_path} "
                              f"{where(frame)}")


def test_8bit_depth_png_is_refused(frame):
    Image.fromarray(np.full((6, 8), 200, np.uint8)).save(frame.depth_path)
    with pytest.raises(DatasetError) as err:
        load_depth(frame, "kitti")
    assert str(err.value) == f"depth file is not a 16-bit PNG (mode L): {frame.depth_path} {where(frame)}"


@pytest.mark.parametrize("kind", ["image", "depth"])
def test_empty_truncated_and_directory(frame, kind):
    path = frame.image_path if kind == "image" else frame.depth_path
    read = (lambda: load_image(frame)) if kind == "image" else (lambda: load_depth(frame, "kitti"))
    data = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        read()
    assert str(err.value) == f"{kind} file is empty (0 bytes): {path} {where(frame)}"
    path.write_bytes(data[: len(data) // 2])  # cut in the middle of the pixel data
    with pytest.raises(DatasetError) as err:
        read()
    assert str(err.value).startswith(f"{kind} file unreadable: {path} {where(frame)}: ")
    path.unlink()
    path.mkdir()
    with pytest.raises(DatasetError) as err:
        read()
    assert str(err.value) == f"{kind} path is a directory, not a file: {path} {where(frame)}"


def test_decompression_bomb_is_refused(frame, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 48 pixels > 2 x 20: what PIL refuses outright
    with pytest.raises(DatasetError) as err:
        load_image(frame)
    assert str(err.value).startswith(f"image file refused as a decompression bomb: {frame.image_path} "
                                     f"{where(frame)}: Image size (48 pixels) exceeds limit")
