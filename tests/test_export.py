"""ONNX export: onnxruntime equals PyTorch within 1e-4 relative, full model and decoder-only, dynamic batch, at an
input side other than the encoder's own (its position embeddings interpolated in the graph)."""


import numpy as np
import pytest
import torch

from pipeline.export import DecoderGraph, export_onnx
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.encoder import FrozenEncoder
from spaceclip.model import SpaceClip
from tests.conftest import keep_main_env

RTOL = 1e-4
SIDE = 112  # tiny-clip's own side is 224


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-clip (width 64) at 112 px input (its own side is 224: a 7 x 7 grid) + a small random decoder, saved with
    the encoder identity as training does. The ONNX packages are looked for here, not at import: importing
    onnxscript costs a second that `pytest -m "not slow"`, which collects this file too, would pay for nothing."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    encoder = FrozenEncoder.from_name("tiny-clip", image_size=SIDE)
    torch.manual_seed(0)
    decoder = SpaceClipDecoder("full", width=encoder.width, channels=(32, 16, 16, 8))
    return decoder.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny", extra={"encoder": encoder.identity()})


def relative_error(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def astronaut_batch(model, n=3):
    """Real photographs (scikit-image's astronaut, flipped/cropped variants) through the one preprocessing."""
    from skimage import data

    img = data.astronaut()
    return model.preprocess([img, img[:, ::-1].copy(), img[100:400, 50:500].copy()][:n])  # (n, 3, SIDE, SIDE)


@pytest.mark.slow
def test_full_model_onnx_matches_pytorch(checkpoint, tmp_path):
    import onnxruntime as ort

    report = export_onnx(checkpoint, tmp_path / "full.onnx")
    print(report.summary())
    assert report.ok and report.max_rel <= RTOL and report.checked_batches == [1, 3]
    assert report.input_shapes == [("B", 3, SIDE, SIDE)] and report.output_shape == ("B", 1, SIDE, SIDE)

    # Independently of the command's own check: real images, batch of 3 (the graph was traced with 2).
    model = SpaceClip.from_pretrained(checkpoint)
    pixels = astronaut_batch(model)
    with torch.inference_mode():
        ref = model(pixels).numpy()  # (3, 1, SIDE, SIDE)
    session = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    got = session.run(["depth"], {"pixel_values": pixels.numpy()})[0]
    assert got.shape == ref.shape == (3, 1, SIDE, SIDE)
    assert relative_error(got, ref) <= RTOL
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["spaceclip.kind"] == "full" and "tiny-clip" in meta["spaceclip.encoder"]


@pytest.mark.slow
def test_decoder_only_onnx_via_cli_matches_pytorch(checkpoint, tmp_path, monkeypatch, capsys):
    import onnxruntime as ort

    out = tmp_path / "decoder.onnx"
    from flows.cli import main

    keep_main_env(monkeypatch)
    rc = main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--decoder-only"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "max abs error" in printed and "max rel error" in printed and "OK" in printed

    # Cached-feature inputs: exactly the decoder's layers, named tokens_L<k>, plus the global vector for FiLM.
    model = SpaceClip.from_pretrained(checkpoint)
    graph = DecoderGraph(model.decoder).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == [f"tokens_L{k}" for k in model.decoder.layers] + ["global"]
    feats = model.encoder(astronaut_batch(model), layers=model.decoder.layers)
    inputs = [feats["tokens"][k] for k in model.decoder.layers] + [feats["global"]]
    with torch.inference_mode():
        ref = graph(*inputs).numpy()
    got = session.run(["depth"], {n: t.numpy() for n, t in zip(names, inputs)})[0]
    assert got.shape == (3, 1, SIDE, SIDE)
    assert relative_error(got, ref) <= RTOL
