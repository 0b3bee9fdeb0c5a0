"""The SPACE-CLIP dual-pathway decoder: one class, four ablation variants.

Mirrors the reference release (`space_clip.py` in github.com/taewan2002/SPACE-CLIP) module for module, so that
parameter counts and state-dict shapes match, but reads the encoder's features from the feature dict

    {"tokens": {layer: (B, g, g, C) channels-last}, "global": (B, C)}

(from `FrozenEncoder` or from the Zarr cache) instead of running CLIP itself.

    semantic pathway    layers [12, 9, 6, 3] --FiLM(global)--> 1x1 proj -> [256, 128, 64, 32] ch, one per stage
    structural pathway  layers [2, 1, 0]      --------------> 1x1 proj -> [256, 128, 64] ch, stages 0-2
                        stream starts from the *unprojected* layer-2 grid (C ch)
    stage i:  r_i = StructuralBlock(r_{i-1}, struct_proj_i)            14 -> 28 -> 56 -> 112
              x_i = SemanticBlock(x_{i-1}, sem_proj_i, r_i)             14 -> 28 -> 56 -> 112 -> 224
    head:     x_3 -> metric depth at 16g x 16g (224 x 224 for a 14 x 14 grid), bilinearly resized to the target
    aux:      x_0, x_1, x_2 -> coarse depth (multi-scale supervision)

Ablations (paper Table 2) are configurations of this one class: `baseline` (neither FiLM nor structural path),
`film`, `structural`, `full`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# variant -> (film, structural)
VARIANTS: dict[str, tuple[bool, bool]] = {
    "baseline": (False, False),
    "film": (True, False),
    "structural": (False, True),
    "full": (True, True),
}

FILM_HIDDEN = 256  # hidden width of each FiLM generator (reference `film_param_hidden_dim`)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ---- blocks (1:1 with the paper's figure) ---------------------------------------------------------------------
class Up(nn.Module):
    """x2 upsampling: ConvTranspose2d(k2, s2) -> Conv3x3 (no bias) -> BN -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsample(x))  # (B, in, h, w) -> (B, out, 2h, 2w)


class Res(nn.Module):
    """Conv3x3 -> BN -> ReLU -> Dropout -> Conv3x3 -> BN, + input, ReLU."""

    def __init__(self, ch: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.norm1(self.conv1(x))))
        return F.relu(self.norm2(self.conv2(y)) + x)


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
    )


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.requires_grad and x.device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        return _DeterministicBilinear.apply(x, tuple(size))  # torch has no deterministic CUDA backward of its own
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _linear_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): 1-D linear interpolation (align_corners=False) as a matrix, read off torch's own kernel applied
    to the identity. Bilinear is this along H times this along W."""
    eye = torch.eye(n_in, device=like.device, dtype=torch.float32)[None]  # (1, n_in, n_in): basis vectors as channels
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


class _DeterministicBilinear(torch.autograd.Function):
    """`F.interpolate(x, size, "bilinear")` with the same forward and a backward of two matrix products with the
    interpolation weights, instead of CUDA's atomic scatter-add, whose summation order varies from run to run (torch
    refuses it under `torch.use_deterministic_algorithms`: `train.deterministic` on a GPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        ctx.in_hw = tuple(x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h, w), (H, W) = ctx.in_hw, grad.shape[-2:]
        a_h, a_w = _linear_weights(h, H, grad), _linear_weights(w, W, grad)  # (H, h), (W, w)
        with torch.autocast(grad.device.type, enabled=False):
            dx = a_h.T @ grad.float() @ a_w  # (h, H) @ (B, C, H, W) @ (W, w) -> (B, C, h, w)
        return dx.to(grad.dtype), None


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return resize(x, like.shape[-2:])


def to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(B, g, g, C) -> (B, C, g, g) as a view, i.e. in channels-last memory order, which every layer after it
    keeps: oneDNN's channels-last kernels run this decoder's narrow convolutions ~1.2x faster on a CPU than NCHW."""
    return tokens.permute(0, 3, 1, 2)


class StructuralBlock(nn.Module):
    """u = Up(r); concat with the structural projection (resized to u) -> Conv3x3 -> BN -> ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.up = Up(in_ch, out_ch)
        self.fuse = conv_bn_relu(out_ch + skip_ch, out_ch)

    def forward(self, r: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        u = self.up(r)  # (B, out, 2h, 2w)
        return self.fuse(torch.cat([u, resize_to(skip, u)], dim=1))  # (B, out, 2h, 2w)


class SemanticBlock(nn.Module):
    """u = Up(x); skips gated by (1 + sigmoid(Conv1x1(u))); concat[u, s, r] -> Conv3x3 -> BN -> ReLU -> Res.

    The gate is 1 + sigmoid, not sigmoid: a skip can be amplified up to x2 but never switched off, which is what
    the reference release does (`skip * (1.0 + gate)`).
    """

    def __init__(self, in_ch: int, skip_ch: int, struct_ch: int, out_ch: int, dropout: float, skip_gates: bool):
        super().__init__()
        self.up = Up(in_ch, out_ch)
        self.skip_gate = nn.Conv2d(out_ch, skip_ch, 1) if skip_gates else None
        self.struct_gate = nn.Conv2d(out_ch, struct_ch, 1) if skip_gates and struct_ch > 0 else None
        self.fuse = nn.Sequential(conv_bn_relu(out_ch + skip_ch + struct_ch, out_ch), Res(out_ch, dropout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, struct: torch.Tensor | None) -> torch.Tensor:
        u = self.up(x)  # (B, out, 2h, 2w)
        parts = [u, self._gated(resize_to(skip, u), u, self.skip_gate)]
        if struct is not None:
            parts.append(self._gated(resize_to(struct, u), u, self.struct_gate))
        return self.fuse(torch.cat(parts, dim=1))  # (B, out, 2h, 2w)

    @staticmethod
    def _gated(s: torch.Tensor, u: torch.Tensor, gate: nn.Conv2d | None) -> torch.Tensor:
        return s if gate is None else s * (1.0 + torch.sigmoid(gate(u)))


def film_generator(width: int, hidden: int = FILM_HIDDEN) -> nn.Sequential:
    """global (B, C) -> [gamma | beta] (B, 2C)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * width))


def depth_head(in_ch: int) -> nn.Sequential:
    """Conv3x3(C -> C/2) -> BN -> ReLU -> Conv3x3(C/2 -> 1) -> ReLU: non-negative metric depth."""
    mid = in_ch // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, 1, 3, padding=1), nn.ReLU(),
    )


def aux_head(in_ch: int) -> nn.Sequential:
    """Conv3x3(C -> max(C/2, 16)) -> BN -> ReLU -> Conv1x1(-> 1) -> ReLU."""
    mid = max(in_ch // 2, 16)
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, 1, 1), nn.ReLU(),
    )


# ---- the decoder ----------------------------------------------------------------------------------------------
class SpaceClipDecoder(nn.Module):
    """SPACE-CLIP decoder over cached (or live) encoder features.

    `variant` picks FiLM / structural pathway per paper Table 2; `film=` / `structural=` override it.
    `forward(features, out_size)` -> {"depth": (B,1,H,W), "aux": [(B,1,H,W)] * 3, "depth_224": (B,1,16g,16g)}.
    """

    def __init__(
        self,
        variant: str = "full",
        width: int = 768,
        semantic_layers: Sequence[int] = (12, 9, 6, 3),
        structural_layers: Sequence[int] = (2, 1, 0),
        channels: Sequence[int] = (256, 128, 64, 32),
        dropout: float = 0.1,
        film_hidden: int = FILM_HIDDEN,
        skip_gates: bool = True,
        aux_heads: bool = True,
        head_bias: float | None = None,
        film: bool | None = None,
        structural: bool | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown decoder variant {variant!r}; valid variants: {list(VARIANTS)}")
        default_film, default_structural = VARIANTS[variant]
        self.use_film = default_film if film is None else bool(film)
        self.use_structural = default_structural if structural is None else bool(structural)
        self.width = int(width)
        self.semantic_layers = tuple(int(k) for k in semantic_layers)
        self.structural_layers = tuple(int(k) for k in structural_layers)
        self.channels = tuple(int(c) for c in channels)
        self.dropout = float(dropout)
        self.film_hidden = int(film_hidden)
        self.skip_gates = bool(skip_gates)
        self.aux_heads_on = bool(aux_heads)
        self.head_bias = None if head_bias is None else float(head_bias)
        if len(self.semantic_layers) != len(self.channels):
            raise ValueError(
                f"one semantic layer per decoder stage: got {len(self.semantic_layers)} semantic layers "
                f"{self.semantic_layers} for {len(self.channels)} channel stages {self.channels}"
            )
        if self.use_structural and not 0 < len(self.structural_layers) <= len(self.channels):
            raise ValueError(
                f"the structural pathway needs 1..{len(self.channels)} structural layers, got {self.structural_layers}"
            )
        n_struct = len(self.structural_layers) if self.use_structural else 0
        C, ch = self.width, self.channels

        # Semantic pathway: FiLM (optional) then one 1x1 projection per stage.
        self.film = nn.ModuleList(film_generator(C, self.film_hidden) for _ in self.semantic_layers) if self.use_film else None
        self.semantic_proj = nn.ModuleList(nn.Conv2d(C, c, 1) for c in ch)
        # Structural pathway: projections for stages 0..n_struct-1; block 0 upsamples the raw C-channel grid.
        if self.use_structural:
            self.structural_proj = nn.ModuleList(nn.Conv2d(C, c, 1) for c in ch[:n_struct])
            self.structural_blocks = nn.ModuleList(
                StructuralBlock(C if i == 0 else ch[i - 1], ch[i], ch[i]) for i in range(n_struct)
            )
        else:
            self.structural_proj = self.structural_blocks = None
        # The semantic stream starts from the stage-0 projection, so stage 0 goes ch[0] -> ch[0].
        self.semantic_blocks = nn.ModuleList(
            SemanticBlock(
                in_ch=ch[i - 1] if i > 0 else ch[0], skip_ch=ch[i], struct_ch=ch[i] if i < n_struct else 0,
                out_ch=ch[i], dropout=self.dropout, skip_gates=self.skip_gates,
            )
            for i in range(len(ch))
        )
        self.head = depth_head(ch[-1])
        self.aux_heads = nn.ModuleList(aux_head(c) for c in ch[:-1]) if self.aux_heads_on else None
        if self.head_bias is not None:
            # Every head ends in Conv -> ReLU. With PyTorch's default bias init (the reference's) about half the
            # pixels start at exactly 0, where the ReLU passes no gradient; SILog's variance term then pulls the
            # living pixels down to the dead ones and a variant can collapse to an all-zero map. A bias at a
            # typical depth (the training targets' median) starts every pixel alive and at the right scale.
            for head in [self.head] + list(self.aux_heads or []):
                nn.init.constant_(head[-2].bias, self.head_bias)

    # ---- configuration ----------------------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        """The Table-2 name of what was actually built (after any film=/structural= override)."""
        return next(name for name, flags in VARIANTS.items() if flags == (self.use_film, self.use_structural))

    @property
    def upscale(self) -> int:
        """Native depth size / token grid: x2 per stage, 16 for the paper's four (224 x 224 from a 14 x 14 grid)."""
        return 2 ** len(self.channels)

    @property
    def layers(self) -> tuple[int, ...]:
        """Hidden-state indices this variant reads: the cache only needs to serve these."""
        used = set(self.semantic_layers) | (set(self.structural_layers) if self.use_structural else set())
        return tuple(sorted(used))

    def config_dict(self) -> dict:
        """Constructor kwargs that rebuild exactly this decoder (JSON-safe)."""
        return dict(
            variant=self.variant, width=self.width, semantic_layers=list(self.semantic_layers),
            structural_layers=list(self.structural_layers), channels=list(self.channels), dropout=self.dropout,
            film_hidden=self.film_hidden, skip_gates=self.skip_gates, aux_heads=self.aux_heads_on,
            head_bias=self.head_bias, film=self.use_film, structural=self.use_structural,
        )

    def count_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- forward ----------------------------------------------------------------------------------------------
    def _grid(self, features: dict, layer: int) -> torch.Tensor:
        tokens = features.get("tokens", {})
        if layer not in tokens:
            raise ValueError(
                f"decoder variant {self.variant!r} needs encoder layer {layer}, but the features hold layers "
                f"{sorted(tokens)}; it reads layers {list(self.layers)}"
            )
        x = tokens[layer]
        if x.ndim != 4 or x.shape[-1] != self.width:
            raise ValueError(
                f"layer {layer}: expected channels-last tokens (B, g, g, {self.width}), got {tuple(x.shape)}"
            )
        dtype = self.semantic_proj[0].weight.dtype  # the cache stores float16; compute in the decoder's dtype
        return x.to(dtype)  # (B, g, g, C)

    def forward_features(self, features: dict) -> list[torch.Tensor]:
        """Feature dict -> the semantic stream's output after each stage: [(B, ch_i, 2^(i+1) g, 2^(i+1) g)]."""
        sem = []
        for i, k in enumerate(self.semantic_layers):
            tokens = self._grid(features, k)  # (B, g, g, C)
            if self.film is not None:
                if features.get("global") is None:
                    raise ValueError("FiLM variants need the pooled global vector features['global'] (B, C)")
                g = features["global"].to(tokens.dtype)  # (B, C)
                gamma, beta = self.film[i](g).chunk(2, dim=-1)  # (B, C) each
                tokens = gamma[:, None, None, :] * tokens + beta[:, None, None, :]  # x' = γ·x + β, not (1+γ)
            sem.append(self.semantic_proj[i](to_map(tokens)))  # (B, ch_i, g, g)

        structs: list[torch.Tensor | None] = [None] * len(self.channels)
        if self.structural_blocks is not None:
            r = to_map(self._grid(features, self.structural_layers[0]))  # (B, C, g, g): unprojected layer-2 grid
            for i, (k, proj, block) in enumerate(
                zip(self.structural_layers, self.structural_proj, self.structural_blocks)
            ):
                skip = proj(to_map(self._grid(features, k)))  # (B, ch_i, g, g)
                r = block(r, skip)  # (B, ch_i, 2^(i+1) g, 2^(i+1) g)
                structs[i] = r

        x = sem[0]  # (B, ch_0, g, g)
        stages = []
        for i, block in enumerate(self.semantic_blocks):
            x = block(x, sem[i], structs[i])  # (B, ch_i, 2^(i+1) g, 2^(i+1) g)
            stages.append(x)
        return stages

    def forward_head(self, stages: list[torch.Tensor], out_size: tuple[int, int] | None = None) -> dict:
        """Stage outputs -> depth at native 16g (224 for g = 14), the target size, and the auxiliary maps."""
        depth_native = self.head(stages[-1])  # (B, 1, 16g, 16g)
        size = tuple(out_size) if out_size is not None else tuple(depth_native.shape[-2:])
        # Aux maps are brought to the same size as the main depth so the loss compares them with the same target.
        aux = [resize(h(s), size) for h, s in zip(self.aux_heads, stages[:-1])] if self.aux_heads is not None else []
        return {"depth": resize(depth_native, size), "aux": aux, "depth_224": depth_native}

    def forward(self, features: dict, out_size: tuple[int, int] | None = None) -> dict:
        """{"tokens": {k: (B,g,g,C)}, "global": (B,C)} -> {"depth": (B,1,H,W), "aux": [...], "depth_224": ...}."""
        return self.forward_head(self.forward_features(features), out_size)

    # ---- checkpoints (safetensors + JSON only: nothing is ever unpickled) ------------------------------------
    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write `model.safetensors` + `config.json` ({"decoder": kwargs, **extra}) into `directory`."""
        from safetensors.torch import save_file

        extra = dict(extra or {})
        if "decoder" in extra:
            raise ValueError("extra may not contain the key 'decoder': it holds the decoder's own kwargs")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"decoder": self.config_dict(), **extra}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory

    @staticmethod
    def load_config(directory: str | Path) -> dict:
        """The whole `config.json` of a checkpoint folder (decoder kwargs + whatever `extra` was saved)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"decoder config missing: {path}")
        config = json.loads(path.read_text())
        if not isinstance(config.get("decoder"), dict):
            raise ValueError(f"{path} has no 'decoder' section with the decoder's constructor kwargs")
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "SpaceClipDecoder":
        """Rebuild from `config.json`, then load the weights with `load_state_dict(strict=True)`: every key name and
        shape must match, and a mismatch fails naming the file and the first key that differs."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = cls.load_config(directory)
        try:
            model = cls(**config["decoder"])
        except TypeError as e:  # an unknown or misspelt kwarg in config.json
            raise ValueError(f"{directory / CONFIG_NAME}: bad 'decoder' kwargs: {e}") from None
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"decoder weights missing: {weights}")
        try:
            loaded = load_file(str(weights), device="cpu")
        except Exception as e:  # safetensors' own error type: a truncated file, a damaged header, not safetensors
            raise ValueError(f"{weights}: damaged checkpoint, safetensors cannot read it ({e}); train or copy it "
                             "again") from None
        try:
            model.load_state_dict(loaded, strict=True)
        except RuntimeError:  # torch's message lists every key; say which one first, in one line
            expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
            found = {k: tuple(t.shape) for k, t in loaded.items()}
            first = next((k for k in expected if found.get(k) != expected[k]), None)
            if first is not None:
                problem = (f"key {first!r} missing (expected shape {expected[first]})" if first not in found else
                           f"key {first!r} has shape {found[first]}, expected {expected[first]}")
            else:
                unexpected = sorted(set(found) - set(expected))
                problem = f"unexpected key {unexpected[0]!r} (+{len(unexpected) - 1} more)"
            raise ValueError(f"{weights}: {problem}") from None
        model.checkpoint_config = config  # encoder identity, cache fingerprint, ... as saved in `extra`
        return model.to(map_location)
