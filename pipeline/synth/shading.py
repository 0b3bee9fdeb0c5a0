"""Shading: world-anchored value-noise textures that fade with distance, converging surface patterns (lanes,
windows, planks, tiles), Lambert light, haze and sky (outdoor) or light fall-off (indoor)."""

from __future__ import annotations

import numpy as np

from pipeline.synth.scene import FACADE, PLANKS, ROAD, TILES, Camera, Scene


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


def _value_noise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1] at lattice coordinates (u, v), tiling every 64 cells. Coordinates are shifted
    positive so truncation is a floor."""
    mask = _NOISE_SIZE - 1
    iu = (u * np.float32(_NOISE_RES) + np.float32(2**20)).astype(np.int32) & mask
    iv = (v * np.float32(_NOISE_RES) + np.float32(2**20)).astype(np.int32) & mask
    return _NOISE_FLAT.take(iv * _NOISE_SIZE + iu)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _patterns(scene: Scene, pattern, ax, px, pz, su, sv, gain) -> tuple[np.ndarray, np.ndarray]:
    """Surface patterns as per-pixel gain factors and paint (>= 0: a grey that replaces the albedo): lanes and
    kerbs, windows, planks, tiles. They are world-anchored lines, so they converge in perspective."""
    f32 = np.float32
    paint = np.full(gain.shape, -1.0, f32)  # >= 0: replace the albedo by this grey
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
    return gain, paint


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

    gain, paint = _patterns(scene, pattern, ax, px, pz, su, sv, gain)

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
