import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from spaceclip.decoder import VARIANTS, SpaceClipDecoder

W = 64  # tiny-clip width: fast on CPU
G = 4  # a 4x4 grid decodes to 64x64: same code path as 14 -> 224 at a twelfth of the cost
SEMANTIC, STRUCTURAL, CH = (12, 9, 6, 3), (2, 1, 0), (256, 128, 64, 32)


def features(width=W, b=2, g=G, layers=range(13), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "tokens": {k: torch.randn(b, g, g, width, generator=gen).to(dtype) for k in layers},
        "global": torch.randn(b, width, generator=gen).to(dtype),
    }


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_forward_to_requested_size(variant):
    torch.manual_seed(0)
    model = SpaceClipDecoder(variant, width=W).eval()
    out = model(features(), out_size=(37, 123))
    assert out["depth"].shape == (2, 1, 37, 123)
    assert out["depth_224"].shape == (2, 1, 16 * G, 16 * G)
    assert [a.shape for a in out["aux"]] == [(2, 1, 37, 123)] * 3
    assert (out["depth"] >= 0).all()  # ReLU head: metric depth is never negative
    native = model(features())
    assert native["depth"].shape == native["aux"][0].shape == (2, 1, 16 * G, 16 * G)


def test_stage_resolutions_and_channels():
    model = SpaceClipDecoder("full", width=W).eval()
    with torch.no_grad():
        feats = features(b=1, g=14)
        stages = model.forward_features(feats)
        out = model.forward_head(stages)
    assert [tuple(s.shape[1:]) for s in stages] == [(256, 28, 28), (128, 56, 56), (64, 112, 112), (32, 224, 224)]
    assert out["depth_224"].shape == out["depth"].shape == (1, 1, 224, 224)


def test_layers_property_and_variant_flags():
    with torch.device("meta"):  # the models are built, never run: no weights are made or initialised
        assert SpaceClipDecoder("baseline", width=W).layers == (3, 6, 9, 12)
        assert SpaceClipDecoder("film", width=W).layers == (3, 6, 9, 12)
        assert SpaceClipDecoder("structural", width=W).layers == (0, 1, 2, 3, 6, 9, 12)
        assert SpaceClipDecoder("full", width=W).layers == (0, 1, 2, 3, 6, 9, 12)
        m = SpaceClipDecoder("full", width=W, film=False)
        assert (m.use_film, m.use_structural, m.variant) == (False, True, "structural")
        assert SpaceClipDecoder("baseline", width=W, structural=True, film=True).variant == "full"
        with pytest.raises(ValueError, match="baseline.*film.*structural.*full"):
            SpaceClipDecoder("dual", width=W)


def test_reads_only_its_layers_accepts_extras_and_half_precision():
    model = SpaceClipDecoder("film", width=W).eval()
    out = model(features(layers=model.layers, dtype=torch.float16), out_size=(20, 30))
    assert out["depth"].dtype == torch.float32 and out["depth"].shape == (2, 1, 20, 30)
    full = features(layers=range(13))
    only = {"tokens": {k: full["tokens"][k] for k in model.layers}, "global": full["global"]}
    with torch.no_grad():
        assert torch.equal(model(full)["depth"], model(only)["depth"])  # extra layers are ignored


def test_missing_layer_or_wrong_width_is_a_clear_error():
    model = SpaceClipDecoder("full", width=W)
    with pytest.raises(ValueError, match="layer 1"):
        model(features(layers=[0, 2, 3, 6, 9, 12]))
    with pytest.raises(ValueError, match=r"\(B, g, g, 64\)"):
        model(features(width=32))
    with pytest.raises(ValueError, match="global"):
        model({"tokens": features()["tokens"]})
    SpaceClipDecoder("structural", width=W).eval()({"tokens": features()["tokens"]})  # no FiLM: no global needed


def test_film_is_gamma_x_plus_beta_not_one_plus_gamma():
    torch.manual_seed(0)
    model = SpaceClipDecoder("film", width=W).eval()
    with torch.no_grad():
        for gen in model.film:
            gen[2].weight.zero_()
            gen[2].bias.zero_()  # gamma = beta = 0, so x' = 0 whatever the tokens
        a = model(features(seed=1))["depth"]
        b = model(features(seed=2))["depth"]
    assert torch.allclose(a, b)  # with x' = (1 + gamma) x + beta the tokens would still pass through


def test_structural_stream_starts_from_unprojected_layer2():
    model = SpaceClipDecoder("full", width=W)
    assert model.structural_blocks[0].up.upsample.in_channels == W
    assert [p.out_channels for p in model.structural_proj] == [256, 128, 64]
    assert [p.out_channels for p in model.semantic_proj] == [256, 128, 64, 32]
    assert model.semantic_blocks[3].struct_gate is None  # stage 3 has no structural input


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = SpaceClipDecoder("full", width=W).train()
    out = model(features(b=2), out_size=(32, 32))
    (out["depth"].mean() + sum(a.mean() for a in out["aux"])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def structural_pathway_params(width, ch=CH, n=3):
    """Everything the structural pathway adds to the baseline, counted by hand from the architecture."""
    total = 0
    for i in range(n):
        c, c_in = ch[i], (width if i == 0 else ch[i - 1])
        total += width * c + c  # 1x1 structural projection
        total += c_in * c * 4 + c + c * c * 9 + 2 * c  # Up: ConvT(k2) + Conv3x3 (no bias) + BN
        total += 2 * c * c * 9 + 2 * c  # fuse: Conv3x3(2c -> c, no bias) + BN
        total += c * c + c  # gate Conv1x1 for the structural skip in semantic block i
        total += c * c * 9  # semantic block i's fuse conv reads c more input channels
    return total


def film_params(width, hidden=256, n=4):
    return n * (width * hidden + hidden + hidden * 2 * width + 2 * width)


@pytest.mark.parametrize("width", [W, 768])
def test_parameter_counts(width):
    with torch.device("meta"):  # counted, never run: no weights are made or initialised
        counts = {v: SpaceClipDecoder(v, width=width).count_parameters() for v in VARIANTS}
    base = counts["baseline"]
    assert counts["film"] - base == film_params(width)
    assert counts["structural"] - base == structural_pathway_params(width)
    assert counts["full"] == base + film_params(width) + structural_pathway_params(width)
    if width == 768:
        print("width-768 decoder parameters:", counts)
        # full = 12,050,996: the trainable-parameter count the reference release reports (docs/efficiency.md)
        assert counts == {"baseline": 5_204_468, "film": 7_570_932, "structural": 9_684_532, "full": 12_050_996}
        assert film_params(768) == 2_366_464 and structural_pathway_params(768) == 4_480_064


def test_aux_heads_and_skip_gates_switch_off():
    m = SpaceClipDecoder("full", width=W, aux_heads=False, skip_gates=False).eval()
    out = m(features(), out_size=(16, 16))
    assert out["aux"] == [] and out["depth"].shape == (2, 1, 16, 16)
    assert all(b.skip_gate is None and b.struct_gate is None for b in m.semantic_blocks)


@pytest.mark.parametrize("variant", ["baseline", "full"])
def test_save_and_load_round_trip(tmp_path, variant):
    torch.manual_seed(0)
    model = SpaceClipDecoder(variant, width=W, channels=(32, 16, 16, 8))
    model.train()
    model(features())  # move BatchNorm running stats off their init so buffers are tested too
    model.eval()
    extra = {"encoder": {"name": "tiny-clip", "width": W}, "fingerprint": "abc123"}
    model.save_pretrained(tmp_path, extra=extra)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["decoder"] == model.config_dict() and config["fingerprint"] == "abc123"
    assert config["encoder"] == extra["encoder"]

    loaded = SpaceClipDecoder.from_pretrained(tmp_path).eval()
    assert loaded.config_dict() == model.config_dict()
    assert loaded.checkpoint_config["fingerprint"] == "abc123"
    feats = features(seed=5)
    with torch.no_grad():
        a, b = model(feats, out_size=(50, 60)), loaded(feats, out_size=(50, 60))
    assert torch.equal(a["depth"], b["depth"])
    assert all(torch.equal(x, y) for x, y in zip(a["aux"], b["aux"]))


def test_mismatched_checkpoint_fails_naming_the_key(tmp_path):
    model = SpaceClipDecoder("full", width=W, channels=(32, 16, 16, 8))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))

    bad = dict(state)
    bad["head.0.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"'head\.0\.weight' has shape \(3, 3, 3, 3\)"):
        SpaceClipDecoder.from_pretrained(tmp_path)

    bad = dict(state)
    del bad["film.0.0.weight"]
    save_file(bad, str(weights))
    with pytest.raises(ValueError, match=r"'film\.0\.0\.weight' missing"):
        SpaceClipDecoder.from_pretrained(tmp_path)

    save_file(state | {"extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
        SpaceClipDecoder.from_pretrained(tmp_path)

    # A config that describes a different variant than the weights (baseline config, full weights).
    save_file(state, str(weights))
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder"].update(variant="baseline", film=False, structural=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'semantic_blocks\.0\.fuse\.0\.0\.weight' has shape"):
        SpaceClipDecoder.from_pretrained(tmp_path)


def test_unknown_config_kwarg_is_a_clear_error(tmp_path):
    SpaceClipDecoder("baseline", width=W, channels=(16, 16, 8, 8)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["decoder"]["chanels"] = [1, 2]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chanels"):
        SpaceClipDecoder.from_pretrained(tmp_path)


def test_save_rejects_decoder_key_in_extra(tmp_path):
    with pytest.raises(ValueError, match="decoder"):
        SpaceClipDecoder("baseline", width=W).save_pretrained(tmp_path, extra={"decoder": {}})
