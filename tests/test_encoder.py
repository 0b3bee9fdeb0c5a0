import time

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from spaceclip.encoder import CLIP_MEAN, CLIP_STD, PRESETS, EncoderLoadError, FrozenEncoder, preprocess


@pytest.fixture(scope="module")
def tiny():
    return FrozenEncoder.from_preset("tiny-clip")


def test_tokens_and_global_equal_a_direct_clip_call(tiny):
    reference = CLIPVisionModel(CLIPVisionConfig(**PRESETS["tiny-clip"]))
    reference.load_state_dict(tiny.model.state_dict())
    reference.eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = reference(pixel_values=pixels, output_hidden_states=True)
    assert len(out.hidden_states) == 13

    feats = tiny(pixels, layers=[0, 2, 3, 12])
    assert sorted(feats["tokens"]) == [0, 2, 3, 12]
    for k, grid in feats["tokens"].items():
        patches = out.hidden_states[k][:, 1:, :]  # drop CLS -> (2, 196, 64)
        want = torch.stack([patches[:, r * 14 : (r + 1) * 14, :] for r in range(14)], dim=1)  # row-major grid
        assert grid.shape == (2, 14, 14, 64)
        torch.testing.assert_close(grid, want, rtol=1e-5, atol=1e-5)
        # spot-check the row-major order by hand: patch (row 3, col 5) is token 1 + 3 * 14 + 5
        torch.testing.assert_close(grid[:, 3, 5], out.hidden_states[k][:, 1 + 3 * 14 + 5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["global"], out.pooler_output, rtol=1e-5, atol=1e-5)


def test_frozen_and_inference_mode(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.model.training
    feats = tiny(torch.zeros(1, 3, 224, 224), layers=[1])
    assert feats["tokens"][1].is_inference() and feats["global"].is_inference()
    assert feats["tokens"][1].dtype == torch.float32


def test_preset_is_deterministic(tiny):
    assert FrozenEncoder.from_preset("tiny-clip").weights_sha256() == tiny.weights_sha256()


def test_preprocess_shape_and_clip_normalisation():
    image = np.full((60, 90, 3), 128, dtype=np.uint8)  # constant: bicubic resizing keeps it at 128
    x = preprocess([image, image])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    for c in range(3):
        want = (128 / 255 - CLIP_MEAN[c]) / CLIP_STD[c]  # e.g. red: (0.50196 - 0.48145) / 0.26863 = 0.07634
        assert x[1, c, 17, 200].item() == pytest.approx(want, abs=1e-5)
    assert x[0, 0, 0, 0].item() == pytest.approx(0.0763, abs=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((4, 4, 3), dtype=np.float32))


def test_unknown_preset_raises():
    with pytest.raises(EncoderLoadError, match="tiny-clip"):
        FrozenEncoder.from_preset("tiny-clip-typo")


@pytest.mark.parametrize("name", ["not-a-preset-or-model", "/nonexistent/path/to/clip"])
def test_missing_model_fails_fast_with_actionable_message(name):
    start = time.monotonic()
    with pytest.raises(EncoderLoadError, match="HF_HUB_OFFLINE"):
        FrozenEncoder.from_name(name)
    assert time.monotonic() - start < 5.0


def test_empty_local_folder_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(EncoderLoadError, match="HF_HUB_OFFLINE"):
        FrozenEncoder.from_name(str(tmp_path))
    assert time.monotonic() - start < 5.0
