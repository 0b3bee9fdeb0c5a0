"""SpaceClip (encoder + decoder checkpoint), the shared-backbone call, and `spaceclip predict` on a folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from spaceclip.decoder import SpaceClipDecoder
from spaceclip.encoder import FrozenEncoder
from spaceclip.model import EncoderMismatchError, SpaceClip
from tests.conftest import keep_main_env

CHANNELS = (32, 16, 16, 8)  # a small decoder over tiny-clip's 64-wide tokens: fast on 2 CPU cores


def make_checkpoint(directory, encoder_extra="identity", variant="full"):
    """A randomly initialised decoder saved the way training saves it (encoder identity in `extra`)."""
    encoder = FrozenEncoder.from_name("tiny-clip")
    torch.manual_seed(0)
    decoder = SpaceClipDecoder(variant, width=encoder.width, channels=CHANNELS)
    extra = {"identity": {"encoder": encoder.identity()}, "name": {"encoder": "tiny-clip"}, "none": {}}[encoder_extra]
    decoder.save_pretrained(directory, extra=extra)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def model(checkpoint):
    return SpaceClip.from_pretrained(checkpoint)


def photo(h, w, seed=0):
    """A smooth RGB picture (a gradient plus a little noise): realistic enough for CLIP preprocessing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


# ---- the model object -----------------------------------------------------------------------------------------
def test_infer_image_returns_depth_at_input_size(model):
    for h, w in [(37, 61), (240, 320)]:
        depth = model.infer_image(photo(h, w))
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert np.isfinite(depth).all() and (depth >= 0).all() and depth.max() > 0
    pil = Image.fromarray(photo(50, 90)).convert("L")  # not RGB: converted by the one preprocessing function
    assert model.infer_image(pil).shape == (50, 90)


def test_batched_predict_equals_one_by_one(model):
    images = [photo(40, 60, 0), photo(64, 32, 1), Image.fromarray(photo(30, 30, 2))]
    batched = model.predict(images, batch_size=2)
    for img, depth in zip(images, batched):
        np.testing.assert_allclose(depth, model.infer_image(img), rtol=1e-5, atol=1e-6)


def test_shared_backbone_call_equals_infer_image(model, tmp_path):
    """A caller that runs its own HF CLIPVisionModel reuses that pass: same depth as `infer_image`."""
    from transformers import CLIPVisionModel

    model.encoder.model.save_pretrained(tmp_path / "clip")  # "the caller's own encoder", loaded by transformers
    clip = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    image = photo(120, 200, 3)
    with torch.no_grad():
        out = clip(pixel_values=model.preprocess(image), output_hidden_states=True)
        depth = model.decode_hidden_states(out.hidden_states, out.pooler_output, out_size=(120, 200))
    assert depth.shape == (1, 1, 120, 200)
    np.testing.assert_allclose(depth[0, 0].numpy(), model.infer_image(image), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="hidden states"):
        model.decode_hidden_states(out.hidden_states[:5], out.pooler_output)


def test_checkpoint_encoder_record(tmp_path):
    # A plain name is enough (no hash recorded, so nothing to compare).
    m = SpaceClip.from_pretrained(make_checkpoint(tmp_path / "name", "name"))
    assert m.encoder.name == "tiny-clip"
    # No encoder recorded: a clear error, unless the caller names one.
    bare = make_checkpoint(tmp_path / "bare", "none")
    with pytest.raises(ValueError, match="does not say which encoder"):
        SpaceClip.from_pretrained(bare)
    assert SpaceClip.from_pretrained(bare, encoder="tiny-clip").encoder.name == "tiny-clip"
    # A recorded hash that the loaded weights do not have: refuse, or warn with check_encoder=False.
    wrong = make_checkpoint(tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["encoder"]["weights_sha256"] = "0" * 64
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderMismatchError, match="not the encoder the decoder"):
        SpaceClip.from_pretrained(wrong)
    with pytest.warns(UserWarning, match="not the encoder the decoder"):
        SpaceClip.from_pretrained(wrong, check_encoder=False)


# ---- an encoder at an input side other than its own (issue 27, item 10b) -----------------------------------------
def checkpoint_at(directory, image_size: int):
    """A decoder trained (here: initialised) on tiny-clip features at `image_size` px, recorded as training does:
    `encoder.image_size` in the identity, a (image_size/16)-wide token grid."""
    encoder = FrozenEncoder.from_name("tiny-clip", image_size=image_size)
    torch.manual_seed(0)
    decoder = SpaceClipDecoder("full", width=encoder.width, channels=CHANNELS)
    decoder.save_pretrained(directory, extra={"encoder": encoder.identity()})
    return directory


def test_predict_at_a_non_native_image_size_matches_the_extraction_path(tmp_path, monkeypatch):
    ckpt = checkpoint_at(tmp_path / "ckpt112", 112)
    model = SpaceClip.from_pretrained(ckpt)
    assert model.image_size == 112 and model.encoder.grid == 7
    img = photo(40, 90, seed=3)
    depth = model.infer_image(img)  # tiny-clip's own side is 224: its position embeddings must be interpolated
    assert depth.shape == (40, 90) and np.isfinite(depth).all()
    # the same pixels through the encoder as extraction runs it, then the decoder: the same depth
    pixels = model.preprocess([img])
    with torch.inference_mode():
        feats = model.encoder(pixels, layers=model.decoder.layers)
        want = model.decoder(feats, (40, 90))["depth"][0, 0].numpy()
        native = model(pixels)
    assert native.shape == (1, 1, 112, 112)
    np.testing.assert_allclose(depth, want, rtol=1e-5, atol=1e-6)

    Image.fromarray(img).save(tmp_path / "frame.png")
    assert run_cli(["predict", str(tmp_path / "frame.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "d"),
                    "--device", "cpu"], monkeypatch) == 0
    np.testing.assert_allclose(np.load(tmp_path / "d" / "frame_depth.npy"), depth, rtol=1e-5, atol=1e-6)


# ---- what ONNX export traces (the ONNX round trip, at a non-native side: tests/test_export.py, slow tier) ------------
def test_decoder_graph_is_the_decoder_with_positional_inputs(model):
    from pipeline.export import DecoderGraph, example_inputs, metadata

    graph = DecoderGraph(model.decoder).eval()
    layers = list(model.decoder.layers)
    assert graph.input_names == [f"tokens_L{k}" for k in layers] + ["global"]  # "full" reads the global vector
    inputs = example_inputs(model, 2, decoder_only=True)  # the encoder's features of seeded random images
    g, width = model.encoder.grid, model.encoder.width
    assert [tuple(x.shape) for x in inputs] == [(2, g, g, width)] * len(layers) + [(2, width)]
    (pixels,) = example_inputs(model, 2, decoder_only=False)  # the same seed: the images behind those features
    with torch.inference_mode():
        got = graph(*inputs)
        want = model.decoder(model.encoder(pixels, layers=layers))["depth_224"]
    assert got.shape == (2, 1, 16 * g, 16 * g)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    meta = metadata(model, True, graph.input_names)
    assert meta["spaceclip.kind"] == "decoder" and json.loads(meta["spaceclip.layers"]) == layers
    assert json.loads(meta["spaceclip.encoder"])["weights_sha256"] == model.encoder.weights_sha256()


# ---- spaceclip predict ----------------------------------------------------------------------------------------
def run_cli(argv, monkeypatch):
    from flows.cli import main

    keep_main_env(monkeypatch)
    return main(argv)


def test_predict_folder_with_a_corrupt_file(model, checkpoint, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photo(48, 80, 0)).save(src / "a.png")
    Image.fromarray(photo(60, 44, 1)).convert("RGBA").save(src / "sub" / "b.png")  # alpha: dropped
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (src / "notes.txt").write_text("not an image extension: ignored inside folders")
    out = tmp_path / "out"

    rc = run_cli([
        "predict", str(src), "--checkpoint", str(checkpoint), "--out", str(out), "--side-by-side",
        "--range", "0.1", "0.3", "--pointcloud", "--focal", "50", "--batch-size", "2",
    ], monkeypatch)
    captured = capsys.readouterr()
    assert rc == 1  # finished, but says something was skipped
    assert "broken.jpg" in captured.err and "not a readable image" in captured.err
    assert "predicted 2 image(s)" in captured.out and "1 skipped" in captured.out
    assert "metres = value / 256" in captured.out
    assert not list(out.glob("broken*"))

    for stem, (h, w) in {"a": (48, 80), "b": (60, 44)}.items():
        depth = np.load(out / f"{stem}_depth.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32
        image = Image.open(src / ("a.png" if stem == "a" else "sub/b.png")).convert("RGB")
        np.testing.assert_allclose(depth, model.infer_image(image), rtol=1e-5, atol=1e-6)
        with Image.open(out / f"{stem}_depth.png") as png:
            assert png.mode.startswith("I;16") and png.text["depth_scale"] == "256"
            raw = np.asarray(png)
        assert raw.dtype == np.uint16
        # The 16-bit PNG read back equals the prediction to half its quantisation step.
        assert np.abs(raw / 256.0 - depth).max() <= 0.5 / 256 + 1e-6
        assert Image.open(out / f"{stem}_color.png").size == (w, h)
        side = Image.open(out / f"{stem}_side.png")
        assert side.height == h and side.width > 2 * w
        assert (out / f"{stem}.ply").read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")


def test_collect_inputs_globs_missing_and_duplicate_stems(tmp_path):
    from pipeline.predict import collect_inputs, output_stems

    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        Image.fromarray(photo(8, 8)).save(tmp_path / d / "frame.png")
    (tmp_path / "x" / "frame.jpg").write_bytes(b"")
    files, problems = collect_inputs(
        [str(tmp_path / "*/frame.png"), str(tmp_path / "x"), str(tmp_path / "nope.png"), str(tmp_path / "*.gif")],
        exclude=tmp_path / "y",
    )
    assert files == [tmp_path / "x" / "frame.png", tmp_path / "x" / "frame.jpg"]  # y/ is the output folder
    assert [p for p, _ in problems] == [str(tmp_path / "nope.png"), str(tmp_path / "*.gif")]
    assert output_stems(files) == ["frame", "frame-2"]


def test_predict_rejects_pointcloud_without_focal(checkpoint, tmp_path, monkeypatch, capsys):
    rc = run_cli(["predict", str(tmp_path), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"),
                  "--pointcloud"], monkeypatch)
    assert rc == 2 and "--focal" in capsys.readouterr().err
