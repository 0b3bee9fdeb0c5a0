"""Augmentation baked into training views at extraction (views.rotation_deg, views.color, K seeded views), pixel-space
flip TTA (eval.flip_tta_source=pixels), the recipe configs and the raw-vs-EMA selection: every view's parameters are
recorded and the extracted pixels and targets are recomputed here from them, independently of the pipeline code."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import datasets, extract, synth
from pipeline.config import config_from_dict, dump_config, load_config
from pipeline.evaluate import evaluate_run
from pipeline.extract import encoder_for, extract_chunks, finalize_store, prepare_store
from pipeline.fingerprint import fingerprint, fingerprint_inputs
from pipeline.store import FeatureStore
from pipeline.tables import protocol_line
from pipeline.train import learning_rates
from spaceclip.metrics import compute_metrics
from tests.conftest import open_for

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def small_config(tmp: Path, **views) -> dict:
    data = tmp / "data"
    return {
        "data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                 "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                 "test_split": str(data / "splits/eigen_test_files_with_gt.txt"),
                 "val_fraction": 0.25, "synth": {"train": 8, "test": 4, "seed": 5}},
        "encoder": {"name": "tiny-clip", "batch_size": 4},
        "views": {"crop_size": [176, 352], "views_per_image": 3, **views},
        "cache": {"root": str(tmp / "cache"), "chunk_size": 4, "layers": [0, 12]},
        "dask": {"processes": False},
    }


def extract_split(cfg, split):
    store, _ = prepare_store(cfg, split)
    for c in store.pending_chunks():
        extract_chunks(cfg, store.url, [c])
    finalize_store(store.url)
    return FeatureStore.open(store.url)


AUG = {"rotation_deg": 8.0, "color": {"p": 1.0}}  # large angles: the corners of the rotated frame are in the views


@pytest.fixture(scope="module")
def aug_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("augment")
    cfg = config_from_dict(small_config(tmp, **AUG))
    synth.ensure(cfg.data)
    return cfg


# ---- independent re-implementations (numpy / PIL calls written out here) -----------------------------------------
def rotate_nearest_numpy(a: np.ndarray, angle: float) -> np.ndarray:
    """Rotate an (H, W) map counter-clockwise by `angle` degrees about (W/2, H/2) by inverse mapping of pixel centres,
    nearest neighbour, 0 outside: the geometry of PIL's Image.rotate, written out."""
    h, w = a.shape
    t = math.radians(angle)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    xc, yc = x + 0.5 - w / 2, y + 0.5 - h / 2
    # output pixel (x, y) shows input pixel R(-angle) applied in image coordinates (y down): counter-clockwise on
    # screen is clockwise in (x, y-down) maths, hence the signs.
    xs = math.cos(t) * xc - math.sin(t) * yc + w / 2
    ys = math.sin(t) * xc + math.cos(t) * yc + h / 2
    xi, yi = np.floor(xs).astype(int), np.floor(ys).astype(int)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.zeros_like(a)
    out[inside] = a[yi[inside], xi[inside]]
    return out


def color_reference(crop: np.ndarray, gamma, brightness, gains) -> np.ndarray:
    """The authors' augment_image_numpy in float64 on [0, 1], then back to 8 bits (rounded)."""
    x = crop.astype(np.float64) / 255.0
    x = x ** gamma * brightness * np.asarray(gains)[None, None, :]
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


# ---- the views -----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_views_carry_seeded_angles_and_colours_and_augmentation_does_not_move_crops(aug_cfg):
    views_cfg = aug_cfg.views.model_copy(update={"views_per_image": 4})
    views = datasets.make_views("drive_x/0001", (375, 1242), views_cfg, "kitti", train=True)
    again = datasets.make_views("drive_x/0001", (375, 1242), views_cfg, "kitti", train=True)
    assert views == again  # reproducible from (seed, id, k)
    angles = [v.angle for v in views]
    assert len(set(angles)) == 4 and all(0 < abs(a) <= 8.0 for a in angles)
    for v in views:
        gamma, brightness, *gains = v.color  # p = 1: every view is colour-augmented
        assert all(0.9 <= f <= 1.1 for f in (gamma, brightness, *gains))
    assert len({v.color for v in views}) == 4
    plain = datasets.make_views("drive_x/0001", (375, 1242), views_cfg.model_copy(update={"rotation_deg": 0.0,
                                                                                         "color": None}),
                                "kitti", train=True)
    assert [(v.top, v.left) for v in plain] == [(v.top, v.left) for v in views]  # same crops
    assert all(v.angle == 0 and v.color is None and v.augmentation == (0, 1, 1, 1, 1, 1) for v in plain)
    # p = 0.5: about half the views are colour-augmented; p = 0: none
    half = views_cfg.model_copy(update={"views_per_image": 400, "color": views_cfg.color.model_copy(update={"p": 0.5})})
    n_colour = sum(v.color is not None for v in datasets.make_views("f", (375, 1242), half, "kitti", train=True))
    assert 160 < n_colour < 240
    # full frames (NYU release): K views of the same box, differing only by their augmentation
    full = datasets.make_views("s/1", (480, 640), views_cfg.model_copy(update={"mode": "full", "kb_crop": False}),
                               "nyu", train=True)
    assert len(full) == 4 and {(v.top, v.left, v.height, v.width) for v in full} == {(0, 0, 480, 640)}
    assert len({v.angle for v in full}) == 4


def test_rotation_moves_image_and_depth_together_and_is_invalid_outside():
    h, w = 60, 90
    depth = np.zeros((h, w), np.float32)
    depth[10:14, 60:64] = 7.5  # a small object, in the depth map and (white) in the image
    image = np.zeros((h, w, 3), np.uint8)
    image[10:14, 60:64] = 255
    full_depth = np.full((h, w), 3.0, np.float32)
    angle = 6.0
    dense = np.random.default_rng(0).uniform(1.0, 80.0, (h, w)).astype(np.float32)
    got, want = datasets.rotate_frame(dense, angle, depth=True), rotate_nearest_numpy(dense, angle)
    assert (got == want).mean() > 0.998  # the formula's geometry, pixel for pixel (ties at pixel edges aside)
    assert (datasets.rotate_frame(dense, angle, depth=True) == rotate_nearest_numpy(dense, -angle)).mean() < 0.1
    rotated = datasets.rotate_frame(depth, angle, depth=True)
    assert set(np.unique(rotated)) <= {0.0, 7.5}  # nearest: values stay real, never blended
    image_rot = datasets.rotate_frame(image, angle, depth=False)[..., 0]
    ys, xs = np.nonzero(rotated == 7.5)
    yi, xi = np.nonzero(image_rot > 127)
    assert abs(ys.mean() - yi.mean()) < 0.6 and abs(xs.mean() - xi.mean()) < 0.6  # the object moved alike
    # counter-clockwise: an object right of centre above the middle moves up (smaller row)
    assert ys.mean() < 11.5
    corners = datasets.rotate_frame(full_depth, angle, depth=True)
    assert corners[0, 0] == 0 and corners[-1, -1] == 0 and corners[h // 2, w // 2] == 3.0  # invalid outside


# ---- extraction records the parameters and uses them ---------------------------------------------------------------
@pytest.mark.slow
def test_augmented_views_are_recorded_and_reproducible_from_the_index(aug_cfg, monkeypatch):
    fed = []  # what the extractor gives the encoder, in order
    real = encoder_for(aug_cfg)

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, pixels, *args, **kwargs):
            fed.append(pixels.clone())
            return real(pixels, *args, **kwargs)

    monkeypatch.setattr(extract, "encoder_for", lambda cfg: Recording())
    store = extract_split(aug_cfg, "train")
    rows = store.index()
    assert store.n == 3 * len({i.split("#")[0] for i in rows.id})  # K = 3 views per frame
    pixels_fed = torch.cat(fed)
    assert pixels_fed.shape[0] == store.n

    # the recorded parameters differ between the views of a frame
    frame = rows[rows.id.str.startswith(rows.id[0].split("#")[0] + "#")]
    assert len(set(frame.view_angle)) == 3 and len(set(frame.view_gamma)) == 3
    assert (frame.view_angle.abs() <= 8).all() and frame.view_angle.abs().min() > 0

    samples = {s.id: s for s in datasets.read_split(aug_cfg.data, "train")}
    got = store.read(slice(0, store.n))
    for i, row in enumerate(rows.itertuples()):
        sample = samples[row.id.split("#")[0]]
        top, left, h, w = row.view_top, row.view_left, row.view_h, row.view_w
        # the image: rotate the whole frame (PIL, bicubic, black fill), crop the recorded box, the colour formula
        frame_img = Image.open(sample.image_path).convert("RGB")
        rot = np.asarray(frame_img.rotate(row.view_angle, resample=Image.BICUBIC, fillcolor=(0, 0, 0)))
        crop = color_reference(rot[top:top + h, left:left + w], row.view_gamma, row.view_brightness,
                               (row.view_gain_r, row.view_gain_g, row.view_gain_b))
        ours, _ = datasets.augmented_view(np.asarray(frame_img), None, extract.view_of_row(row))
        diff = np.abs(ours.astype(int) - crop.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 vs float64 rounding at .5 only
        # the pixels the encoder got = the CLIP preprocessing of that recomputed crop (bicubic squash, mean/std)
        squashed = np.asarray(Image.fromarray(crop).resize((real.image_size,) * 2, Image.BICUBIC), np.float32)
        expected = torch.from_numpy(((squashed / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))
        assert (pixels_fed[i] - expected).abs().max() < 0.05  # <= 1 grey level before the squash
        assert (pixels_fed[i] - real.preprocess(ours)[0]).abs().max() == 0  # exactly the recorded view's pixels
        # the stored target: the GT PNG rotated with the same angle (nearest, 0 outside), the same box
        gt = np.asarray(Image.open(sample.depth_path), np.float64) / 256.0
        gt_rot = rotate_nearest_numpy(gt, row.view_angle)[top:top + h, left:left + w]
        stored = got["depth"][i].numpy()
        assert stored.shape == (h, w)
        measured = (stored > 0) | (gt_rot > 0)
        # (sparse LiDAR: a sample point on a pixel-edge tie lands one pixel off in PIL vs the formula)
        close = np.abs(stored - gt_rot)[measured] <= 0.5 / 256 + 1e-6
        assert measured.sum() > 1000 and close.mean() > 0.97, f"{row.id}: {close.mean():.4f} of the targets agree"
        unrotated = gt[top:top + h, left:left + w]
        assert (np.abs(stored - unrotated)[measured] <= 0.5 / 256 + 1e-6).mean() < 0.9  # the rotation is there
    # the stored tokens are the encoder's features of those pixels
    ref = real(pixels_fed[:4], [0, 12])
    torch.testing.assert_close(got["tokens"][12][:4].float(), ref["tokens"][12], atol=2e-3, rtol=2e-3)


def test_validation_views_are_not_augmented(aug_cfg):
    store = extract_split(aug_cfg, "val")
    rows = store.index()
    assert (rows.view_angle == 0).all() and (rows.view_gamma == 1).all() and (rows.view_gain_b == 1).all()
    assert not rows.id.str.contains("#").any()  # one view per frame


def test_augmentation_is_in_the_fingerprint_and_old_fingerprints_stay(aug_cfg):
    identity = encoder_for(aug_cfg).identity()

    def with_views(**views):
        data = dump_config(aug_cfg)
        data["views"] = {**small_config(Path("."))["views"], **views}
        return config_from_dict(data)

    base = with_views()
    base_inputs = fingerprint_inputs(base, "train", identity)
    assert "rotation_deg" not in base_inputs["views"] and "color" not in base_inputs["views"]  # as before they existed
    fps = {fingerprint(fingerprint_inputs(with_views(**views), "train", identity))
           for views in ({}, {"rotation_deg": 1.0}, {"rotation_deg": 2.0}, {"color": {"p": 0.5}},
                         {"color": {"p": 0.5, "gain": [0.8, 1.2]}})}
    assert len(fps) == 5
    test_fp = fingerprint(fingerprint_inputs(base, "test", identity))
    assert fingerprint(fingerprint_inputs(aug_cfg, "test", identity)) == test_fp  # test frames are never augmented


# ---- pixel-space flip TTA -------------------------------------------------------------------------------------------
def test_pixel_flip_tta_averages_the_mirrored_images_prediction(aug_cfg):
    cfg = config_from_dict(dump_config(aug_cfg), overrides=["eval.flip_tta=true", "eval.flip_tta_source=pixels",
                                                            "eval.batch_size=1", "eval.qualitative=0",
                                                            "recipe=release"])
    identity = encoder_for(cfg).identity()
    plain_fp = fingerprint(fingerprint_inputs(aug_cfg, "test", identity))
    feature_fp = fingerprint(fingerprint_inputs(
        config_from_dict(dump_config(aug_cfg), overrides=["eval.flip_tta=true"]), "test", identity))
    assert feature_fp == plain_fp  # feature-space TTA reads the plain store
    store = extract_split(cfg, "test")
    assert store.has_flipped and store.fingerprint != plain_fp and store.attrs["fingerprint_inputs"]["flipped"]

    # the stored mirrored features are the encoder's features of the mirrored test image
    encoder = encoder_for(cfg)
    row = store.index().iloc[1]
    image = np.asarray(Image.open(row.image_path).convert("RGB"))
    ref = encoder(encoder.preprocess(np.ascontiguousarray(image[:, ::-1])), [12])
    got = store.read([1], flipped=True)
    torch.testing.assert_close(got["flipped_tokens"][12].float(), ref["tokens"][12], atol=2e-2, rtol=2e-2)

    def probe(features):  # positive, position-dependent, and it sees the global vector: not flip-equivariant
        t = features["tokens"][12].float()  # (B, g, g, C)
        ramp = torch.linspace(1.0, 2.0, t.shape[2], dtype=torch.float64)
        return (5.0 + 2.0 * torch.sigmoid(t.mean(-1)).double() * ramp
                + features["global"].float().mean(-1).double()[:, None, None])

    result = evaluate_run(cfg, predictors={"probe": lambda batch: probe(batch.features)})
    per_image = result.per_image.set_index("id")
    index = store.index()
    lo, hi = cfg.data.depth_range
    checked = 0
    for p, r in enumerate(index.itertuples()):
        if not r.depth_path:
            continue
        b = store.read([p], flipped=True)
        plain = probe({"tokens": b["tokens"], "global": b["global"]})[0]
        mirrored = probe({"tokens": b["flipped_tokens"], "global": b["flipped_global"]})[0]
        averaged = 0.5 * (plain + torch.flip(mirrored, dims=[-1]))  # the flipped-back prediction, averaged in
        gt = np.asarray(Image.open(r.depth_path), np.float64) / 256.0
        full = torch.nn.functional.interpolate(averaged[None, None], size=gt.shape, mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        direct = compute_metrics(full, gt, crop="garg", min_depth=lo, max_depth=hi)
        assert per_image.loc[r.id, "abs_rel"] == pytest.approx(direct["abs_rel"], rel=1e-9)
        assert per_image.loc[r.id, "rmse"] == pytest.approx(direct["rmse"], rel=1e-9)
        checked += 1
    assert checked >= 2
    line = protocol_line(result.protocol)
    assert "flip TTA on (pixel space" in line and "training recipe release" in line
    assert result.protocol["flip_tta_source"] == "pixels" and result.protocol["recipe"] == "release"
    with pytest.raises(Exception, match="no feature store"):  # the plain store of aug_cfg was never extracted
        open_for(config_from_dict(dump_config(cfg), overrides=["eval.flip_tta_source=features"]), "test")


# ---- the recipes -----------------------------------------------------------------------------------------------------
def paper_lr(pass_index: int) -> float:
    """StepLR(step_size=2, gamma=0.5) at 1e-4: the rate during pass `pass_index` (0-based) over the frames."""
    return 1e-4 * 0.5 ** (pass_index // 2)


@pytest.mark.parametrize("name", ["kitti", "nyu"])
def test_paper_recipe_configs_keep_the_papers_steps_and_schedule(name):
    cfg = load_config(name)
    k = cfg.views.views_per_image
    assert cfg.recipe == "paper" and cfg.train.batch_size == 64 and cfg.views.rotation_deg == 1.0
    assert cfg.views.color is None and cfg.train.ema is None and cfg.train.flip_p == 0.5
    assert cfg.train.epochs * k == 10  # passes over the frames
    frames, batch = 6400, 64  # steps per epoch over K * frames views
    steps = k * frames // batch
    lrs = learning_rates(cfg.train, steps)
    for step in range(0, cfg.train.epochs * steps, 37):
        assert lrs[step] == pytest.approx(paper_lr(step * batch // frames))
    if name == "kitti":
        assert tuple(cfg.views.crop_size) == (352, 704) and cfg.views.mode == "random"


@pytest.mark.parametrize("name,batch,crop", [("kitti-release", 64, "eigen"), ("nyu-release", 32, "none")])
def test_release_recipe_configs(name, batch, crop):
    cfg = load_config(name)
    assert cfg.recipe == "release" and cfg.train.batch_size == batch
    assert cfg.train.epochs * cfg.views.views_per_image == 20
    assert (cfg.train.schedule, cfg.train.warmup_fraction, cfg.train.min_lr) == ("cosine_warmup", 0.05, 1e-6)
    assert (cfg.train.ema, cfg.train.ema_select) == (0.996, "better")
    assert cfg.views.rotation_deg == 1.0 and cfg.views.color.p == 0.5 and cfg.views.color.gain == (0.9, 1.1)
    assert cfg.views.flip == "extract" and not cfg.views.kb_crop
    assert cfg.pixel_flip_tta and cfg.eval_crop == crop
    if name == "nyu-release":  # the full 480 x 640 frame
        assert cfg.views.mode == "full" and cfg.data.test_image_root.endswith("official_splits/test")
    else:
        assert cfg.eval.gt_resolution == "352x704" and tuple(cfg.views.crop_size) == (352, 704)
    # the cosine schedule over 10 epochs of 2K views = their 20 epochs of N frames, step for step
    frames = 6400
    ours_steps, their_steps = cfg.views.views_per_image * frames // batch, frames // batch
    total = 20 * their_steps
    lrs = learning_rates(cfg.train, ours_steps)
    for step in (0, 5, total // 3, total - 1):
        warm = round(0.05 * total)
        ref = (1e-4 * (step + 1) / warm if step < warm else
               1e-6 + (1e-4 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm))))
        assert lrs[step] == pytest.approx(ref)


# ---- raw-vs-EMA selection (the release's eval_both_for_best) --------------------------------------------------------
@pytest.mark.parametrize("decay", [0.99, 0.3])
@pytest.mark.slow
def test_ema_select_better_keeps_the_weights_with_the_lower_validation_abs_rel(fast_cfg, decay):
    from safetensors.torch import load_file

    from pipeline.loader import CachedBatches
    from pipeline.train import STATE_NAME, load_state, train_variant, validate
    from spaceclip.decoder import SpaceClipDecoder

    cfg = config_from_dict(dump_config(fast_cfg), overrides=[
        f"sweep=ema-select-{decay}", "train.epochs=2", f"train.ema={decay}", "train.ema_select=better"])
    result = train_variant(cfg, "baseline", resume=False)
    state = load_state(result.run_dir / STATE_NAME)
    last = SpaceClipDecoder.from_pretrained(result.run_dir / "last")
    loader = CachedBatches(open_for(cfg, "val"), last.layers, 8, train=False)
    scores = {}
    for source in ("model", "ema"):  # the raw and the EMA weights of the last epoch, validated here
        m = SpaceClipDecoder(**last.config_dict())
        m.load_state_dict(state[source])
        scores[source] = validate(m.eval(), loader, cfg.data.depth_range)["abs_rel"]
    chosen = "ema" if scores["ema"] < scores["model"] else "model"
    extra = last.checkpoint_config
    assert extra["weights"] == {"model": "raw", "ema": "ema"}[chosen]
    assert extra["val_metric"]["value"] == pytest.approx(scores[chosen], rel=1e-6)
    saved = load_file(result.run_dir / "last" / "model.safetensors")
    assert all(torch.equal(saved[k], state[chosen][k].to(saved[k].dtype)) for k in saved if k in state[chosen])
    assert result.history[-1]["val_abs_rel"] == pytest.approx(min(scores.values()), rel=1e-6)
