"""Ray casting: the nearest hit of every pixel's ray against the ground plane or room and the boxes, in the
camera's z-depth (the ray parameter is scaled so that it *is* the depth a depth map stores)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.synth.scene import Camera, Scene


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
