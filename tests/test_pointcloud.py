"""PLY point clouds: one vertex per valid pixel at X=(u-cx)Z/f, Y=(v-cy)Z/f, Z=depth, coloured from the image."""

import numpy as np
import pytest

from pipeline.pointcloud import depth_to_ply

PROPS = ["x", "y", "z", "red", "green", "blue"]


def read_ply(path):
    """A minimal independent PLY reader for the vertex-only files we write: -> (N, 6) float64 [x y z r g b]."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply"
    fmt = header[1].split()[1]
    n = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    assert [line.split()[2] for line in header if line.startswith("property")] == PROPS
    if fmt == "binary_little_endian":
        dtype = np.dtype([(p, "<f4") for p in PROPS[:3]] + [(p, "u1") for p in PROPS[3:]])
        assert len(data) - end == n * dtype.itemsize
        v = np.frombuffer(data[end:], dtype)
        return np.stack([v[p].astype(np.float64) for p in PROPS], axis=1)
    assert fmt == "ascii"
    rows = np.loadtxt(data[end:].decode().splitlines(), ndmin=2)
    assert rows.shape == (n, 6)
    return rows


@pytest.mark.parametrize("binary", [True, False])
def test_ply_vertices_for_a_known_depth_map(tmp_path, binary):
    depth = np.array([
        [1.0, 2.0, 0.0, 4.0],
        [np.nan, 3.0, 5.0, -1.0],
        [2.5, np.inf, 8.0, 10.0],
    ], dtype=np.float32)  # 0, NaN, -1 and inf are not valid depths
    image = np.arange(depth.size * 3, dtype=np.uint8).reshape(*depth.shape, 3)
    f, cx, cy = 2.0, 1.5, 0.5
    n = depth_to_ply(tmp_path / "c.ply", depth, image, focal=f, cx=cx, cy=cy, binary=binary)
    v = read_ply(tmp_path / "c.ply")

    valid = [(r, c) for r in range(3) for c in range(4) if np.isfinite(depth[r, c]) and depth[r, c] > 0]
    assert n == len(v) == len(valid) == 8
    expected = np.array([
        [(c - cx) * depth[r, c] / f, (r - cy) * depth[r, c] / f, depth[r, c], *image[r, c]] for r, c in valid
    ])
    np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-6 if binary else 1e-5)
    # e.g. pixel (u=3, v=2), Z=10: X = (3 - 1.5) * 10 / 2 = 7.5, Y = (2 - 0.5) * 10 / 2 = 7.5
    np.testing.assert_allclose(v[-1, :3], [7.5, 7.5, 10.0])


def test_default_principal_point_is_the_image_centre(tmp_path):
    depth = np.full((5, 7), 2.0, np.float32)
    image = np.zeros((5, 7, 3), np.uint8)
    assert depth_to_ply(tmp_path / "d.ply", depth, image, focal=4.0) == 35
    v = read_ply(tmp_path / "d.ply")
    centre = v[2 * 7 + 3]  # pixel (u=3, v=2) is the centre of a 7 x 5 image: on the optical axis
    np.testing.assert_allclose(centre[:3], [0.0, 0.0, 2.0])
    np.testing.assert_allclose(v[0, :3], [-3 * 2.0 / 4.0, -2 * 2.0 / 4.0, 2.0])
    with pytest.raises(ValueError, match="focal"):
        depth_to_ply(tmp_path / "e.ply", depth, image, focal=0.0)
