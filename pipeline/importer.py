"""Import a checkpoint saved by the authors' training script (github.com/taewan2002/SPACE-CLIP) as a decoder
checkpoint folder of this project (`model.safetensors` + `config.json`), usable by `spaceclip predict`,
`spaceclip evaluate` and `SpaceClip.from_pretrained`.

    import_checkpoint("best_checkpoint.pt", "runs/authors/full/best")  ->  ImportReport

Their format (`utils/model_io.py:save_checkpoint`, called by `train.py` for `last_checkpoint.pt` and
`best_checkpoint.pt`): `torch.save({"model": SPACECLIP.state_dict(), "optimizer": ..., "epoch": <0-based>})`.
`load_checkpoint` there also accepts a bare state dict and strips a `module.` prefix (DataParallel); so does this.
The state dict holds the whole `SPACECLIP` module: the frozen encoder under `clip_vision_model.` and the decoder
under their module names, which map one to one onto `spaceclip/decoder.py` (`AUTHORS_TO_OURS`).

EMA: their `train.py` keeps EMA weights in memory only; when the EMA weights validated better it copies them into
the model before saving, so `"model"` then *is* the EMA state and the file does not say so. A checkpoint that
carries a separate EMA state dict (`"ema"`, `"ema_state_dict"`, `"model_ema"`, `"ema_model"`, `"ema_shadow"`:
a full-model state dict, as their `ExponentialMovingAverage.shadow` is) is imported from it by default
(`weights="auto"`); `weights="model"` / `"ema"` choose explicitly. Their EMA runs over the frozen encoder too, so
the EMA state's `clip_vision_model.*` is the Hub's weights up to float32 rounding: the encoder is compared element by
element within that rounding (`spaceclip.encoder.compare_weights`), the difference is recorded in `config.json`
(`imported.encoder_weights`), and the folder records the loaded encoder's own identity (exact hash).

Nothing is unpickled: the file is read with `torch.load(weights_only=True)`; a checkpoint that needs code to load
(a pickled `argparse.Namespace`, a model object, ...) is refused with a one-line error naming the file.

What the file does not hold is taken from the authors' training YAML when given (`train_config=`:
`main_path_indices`, `structural_path_indices`, `decoder_dropout`, `clip_model_name`) or else the paper's
defaults: semantic layers [12, 9, 6, 3], structural [2, 1, 0], dropout 0.1, encoder openai/clip-vit-base-patch16.
The variant (FiLM / structural pathway), the width, the channels and the auxiliary heads are read from the keys.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import SpaceClipError
from spaceclip.decoder import FILM_HIDDEN, VARIANTS, SpaceClipDecoder

log = logging.getLogger(__name__)

FORMAT = "taewan2002/SPACE-CLIP train.py checkpoint (utils/model_io.py:save_checkpoint)"
ENCODER_PREFIX = "clip_vision_model."  # their frozen backbone: a transformers CLIPVisionModel / SiglipVisionModel
EMA_KEYS = ("ema", "ema_state_dict", "model_ema", "ema_model", "ema_shadow")
DEFAULT_ENCODER = "openai/clip-vit-base-patch16"
DEFAULT_SEMANTIC = (12, 9, 6, 3)
DEFAULT_STRUCTURAL = (2, 1, 0)

# Their module path (space_clip.py: SPACECLIP) -> ours (spaceclip/decoder.py: SpaceClipDecoder), applied to the key
# prefix; the parameter name after it (weight, bias, running_mean, ...) is the same in both.
AUTHORS_TO_OURS: tuple[tuple[str, str], ...] = (
    (r"film_param_generators\.(\d+)\.", r"film.\1."),  # Sequential(Linear, ReLU, Linear): .0 / .2 in both
    (r"main_path_projections\.(\d+)\.", r"semantic_proj.\1."),
    (r"structural_path_projections\.(\d+)\.", r"structural_proj.\1."),
    (r"structural_decoder_blocks\.(\d+)\.upsample_low\.", r"structural_blocks.\1.up."),  # .upsample / .conv.{0,1}
    (r"structural_decoder_blocks\.(\d+)\.fusion_conv\.", r"structural_blocks.\1.fuse."),  # Conv, BN: .0 / .1
    (r"main_decoder_blocks\.(\d+)\.upsample_low\.", r"semantic_blocks.\1.up."),
    (r"main_decoder_blocks\.(\d+)\.skip_clip_gate\.0\.", r"semantic_blocks.\1.skip_gate."),  # Seq(Conv1x1, Sigmoid)
    (r"main_decoder_blocks\.(\d+)\.skip_struct_gate\.0\.", r"semantic_blocks.\1.struct_gate."),
    # their fusion_conv = Sequential(Conv, BN, ReLU, ResidualConvBlock); ours fuse = Sequential(conv_bn_relu, Res)
    (r"main_decoder_blocks\.(\d+)\.fusion_conv\.([01])\.", r"semantic_blocks.\1.fuse.0.\2."),
    (r"main_decoder_blocks\.(\d+)\.fusion_conv\.3\.", r"semantic_blocks.\1.fuse.1."),  # conv1/norm1/conv2/norm2
    (r"depth_prediction_head\.", r"head."),  # Conv, BN, ReLU, Conv, ReLU: .0 .1 .3 in both
    (r"aux_depth_heads\.(\d+)\.", r"aux_heads.\1."),
)
_RULES = tuple((re.compile(rf"^{pattern}(.+)$"), repl) for pattern, repl in AUTHORS_TO_OURS)


class CheckpointImportError(SpaceClipError, ValueError):
    """The file is not an importable authors' checkpoint; the message names the file and the key or field."""


@dataclass
class ImportReport:
    source: Path
    out: Path
    variant: str
    weights: str  # "model" or the EMA key it was read from
    epoch: int | None  # 1-based, as this project counts (their file stores the 0-based loop index)
    encoder: dict
    encoder_checked: bool  # the named encoder was loaded and its weights equal the checkpoint's (within EMA rounding)
    parameters: int
    notes: list[str] = field(default_factory=list)
    encoder_weights: dict | None = None  # the checkpoint's encoder weights vs the loaded encoder's (compare_weights)

    def summary(self) -> str:
        enc = self.encoder
        diff = self.encoder_weights
        check = ((f"its weights match the checkpoint's clip_vision_model (max difference {diff['max_abs_diff']:.3g}"
                  f", {diff['max_rel_diff']:.3g} of the element; tolerance {diff['rtol']:g})" if diff else
                  "its weights match the checkpoint's clip_vision_model") if self.encoder_checked else
                 "not loaded here: the hash of the checkpoint's own clip_vision_model weights is recorded and "
                 "checked exactly when the folder is loaded (weights an EMA went over differ from the Hub's by "
                 "rounding: import where the encoder loads, so they are compared within it)")
        lines = [
            f"imported {self.source} -> {self.out}",
            f"  decoder: {self.variant} ({self.parameters:,} parameters), weights from {self.weights!r}"
            + (f", epoch {self.epoch}" if self.epoch is not None else ""),
            f"  encoder: {enc.get('name')} (weights sha256 {str(enc.get('weights_sha256'))[:12]}…): {check}",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ---- reading ---------------------------------------------------------------------------------------------------
def load_authors_file(path: str | Path) -> object:
    """`torch.load(path, weights_only=True)`, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = f" (it pickles {found.group(1)})" if found else ""
        raise CheckpointImportError(
            f"refusing {path}: loading it needs unpickling of code{what}; only checkpoints of tensors, numbers, "
            "strings and containers are imported (torch.load weights_only=True). Re-save just the state dict "
            "where you trust the file: torch.save({'model': ckpt['model']}, 'plain.pt')"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointImportError(f"cannot read {path} as a PyTorch checkpoint: {first}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_module(state: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def select_state(ckpt, path: Path, weights: str = "auto") -> tuple[dict, str, int | None]:
    """(full-model state dict, where it came from, 1-based epoch) of a loaded authors' checkpoint."""
    if weights not in ("auto", "model", "ema"):
        raise CheckpointImportError(f"weights must be 'auto', 'model' or 'ema', got {weights!r}")
    if _is_state_dict(ckpt):  # a bare state dict (their load_checkpoint accepts it too)
        if weights == "ema":
            raise CheckpointImportError(f"{path} is a bare state dict: it holds no separate EMA weights")
        return _strip_module(ckpt), "state dict", None
    if not isinstance(ckpt, dict):
        raise CheckpointImportError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")
    ema_key = next((k for k in EMA_KEYS if k in ckpt), None)
    if weights == "ema" or (weights == "auto" and ema_key is not None):
        if ema_key is None:
            raise CheckpointImportError(
                f"{path} has no separate EMA weights (none of the keys {list(EMA_KEYS)}; top-level keys "
                f"{sorted(map(str, ckpt))}). The authors' train.py writes the EMA weights into 'model' when they "
                "validated better, so 'model' may already be them: import with weights='model'")
        source = ema_key
    else:
        if "model" not in ckpt:
            raise CheckpointImportError(
                f"{path} has no 'model' entry (top-level keys {sorted(map(str, ckpt))}); expected the authors' "
                "{'model': state_dict, 'optimizer': ..., 'epoch': ...}")
        source = "model"
    state = ckpt[source]
    if not _is_state_dict(state):
        raise CheckpointImportError(f"{path}: {source!r} is not a state dict of named tensors")
    epoch = ckpt.get("epoch")
    epoch = int(epoch) + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) else None
    return _strip_module(state), source, epoch


# ---- keys --------------------------------------------------------------------------------------------------------
def ours_key(theirs: str) -> str | None:
    """Their decoder key -> ours; None for a key no rule maps."""
    for pattern, repl in _RULES:
        if pattern.match(theirs):
            return pattern.sub(repl + r"\g<" + str(pattern.groups) + ">", theirs)
    return None


def encoder_weights_sha256(encoder_state: dict) -> str:
    """The hash `FrozenEncoder.weights_sha256` computes, over the encoder's own state dict (keys without the
    `clip_vision_model.` prefix): the same weights give the same hash, so a checkpoint proves its encoder."""
    h = hashlib.sha256()
    for key, t in sorted(encoder_state.items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def split_state(state: dict, path: Path) -> tuple[dict, dict]:
    """(decoder state in our key names, encoder state without the prefix). Every decoder key must map."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    decoder = {}
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            continue
        ours = ours_key(key)
        if ours is None:
            raise CheckpointImportError(
                f"{path}: key {key!r} is not part of the authors' SPACECLIP decoder (space_clip.py); cannot map it")
        decoder[ours] = value
    if not decoder:
        raise CheckpointImportError(f"{path}: no decoder weights (only {len(encoder)} encoder tensors)")
    return decoder, encoder


def _indexed(decoder: dict, prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in decoder if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))})


def decoder_kwargs(decoder: dict, path: Path, semantic_layers, structural_layers, dropout: float) -> dict:
    """Constructor kwargs of the decoder the (mapped) state dict holds."""
    def need(key: str) -> torch.Tensor:
        if key not in decoder:
            raise CheckpointImportError(f"{path}: the decoder state has no {key!r}")
        return decoder[key]

    stages = _indexed(decoder, "semantic_proj")
    if not stages or stages != list(range(len(stages))):
        raise CheckpointImportError(f"{path}: main_path_projections.* missing or not numbered 0..n-1 ({stages})")
    channels = [int(need(f"semantic_proj.{i}.weight").shape[0]) for i in stages]
    width = int(need("semantic_proj.0.weight").shape[1])
    film = bool(_indexed(decoder, "film"))
    n_struct = len(_indexed(decoder, "structural_proj"))
    structural = n_struct > 0
    extra = {}
    if film:
        hidden = int(need("film.0.0.weight").shape[0])
        if "film_hidden" in inspect.signature(SpaceClipDecoder).parameters:
            extra["film_hidden"] = hidden
        elif hidden != FILM_HIDDEN:
            raise CheckpointImportError(f"{path}: FiLM hidden width {hidden} (film_param_generators.0.0.weight); "
                                        f"this decoder is built with {FILM_HIDDEN} (film_param_hidden_dim)")
    semantic_layers = tuple(int(k) for k in semantic_layers)
    structural_layers = tuple(int(k) for k in structural_layers)
    if len(semantic_layers) != len(channels):
        raise CheckpointImportError(
            f"{path}: {len(channels)} decoder stages (main_path_projections) but semantic layers {semantic_layers}")
    if structural and len(structural_layers) != n_struct:
        raise CheckpointImportError(
            f"{path}: {n_struct} structural projections (structural_path_projections) but structural layers "
            f"{structural_layers}")
    variant = next(name for name, flags in VARIANTS.items() if flags == (film, structural))
    return dict(variant=variant, width=width, semantic_layers=list(semantic_layers),
                structural_layers=list(structural_layers), channels=channels, dropout=float(dropout),
                skip_gates="semantic_blocks.0.skip_gate.weight" in decoder,
                aux_heads=bool(_indexed(decoder, "aux_heads")), film=film, structural=structural, **extra)


def build_decoder(decoder: dict, kwargs: dict, path: Path) -> SpaceClipDecoder:
    """Our decoder with the given weights; every key and shape checked (with their key names in the errors)."""
    model = SpaceClipDecoder(**kwargs)
    expected = model.state_dict()
    for key, t in expected.items():
        if key not in decoder:
            raise CheckpointImportError(
                f"{path}: missing {_their_name(key)!r} for a {kwargs['variant']!r} decoder (expected shape "
                f"{tuple(t.shape)})")
        if decoder[key].shape != t.shape:
            raise CheckpointImportError(
                f"{path}: {_their_name(key)!r} has shape {tuple(decoder[key].shape)}, expected {tuple(t.shape)}")
    extra = sorted(set(decoder) - set(expected))
    if extra:
        raise CheckpointImportError(f"{path}: unexpected {_their_name(extra[0])!r} for a {kwargs['variant']!r} "
                                    f"decoder (+{len(extra) - 1} more)")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in decoder.items()}, strict=True)
    return model.eval()


_REVERSE = (
    (r"semantic_blocks\.(\d+)\.fuse\.0\.([01])\.", r"main_decoder_blocks.\1.fusion_conv.\2."),
    (r"semantic_blocks\.(\d+)\.fuse\.1\.", r"main_decoder_blocks.\1.fusion_conv.3."),
    (r"semantic_blocks\.(\d+)\.skip_gate\.", r"main_decoder_blocks.\1.skip_clip_gate.0."),
    (r"semantic_blocks\.(\d+)\.struct_gate\.", r"main_decoder_blocks.\1.skip_struct_gate.0."),
    (r"semantic_blocks\.(\d+)\.up\.", r"main_decoder_blocks.\1.upsample_low."),
    (r"structural_blocks\.(\d+)\.up\.", r"structural_decoder_blocks.\1.upsample_low."),
    (r"structural_blocks\.(\d+)\.fuse\.", r"structural_decoder_blocks.\1.fusion_conv."),
    (r"structural_proj\.", "structural_path_projections."), (r"semantic_proj\.", "main_path_projections."),
    (r"film\.", "film_param_generators."), (r"head\.", "depth_prediction_head."), (r"aux_heads\.", "aux_depth_heads."),
)


def _their_name(ours: str) -> str:
    """Our key -> the authors' name, for error messages (the user's file uses theirs)."""
    for pattern, repl in _REVERSE:
        if re.match(rf"^{pattern}", ours):
            return re.sub(rf"^{pattern}", repl, ours)
    return ours


# ---- the encoder -----------------------------------------------------------------------------------------------
def encoder_identity(
    name: str, encoder_state: dict, path: Path, load: bool = True
) -> tuple[dict, bool, list[str], dict | None]:
    """(identity to record, checked, notes, difference). With the encoder's weights in the checkpoint, they are what
    the decoder was trained on; when the named encoder can be loaded here, its weights must equal them within the
    rounding an EMA over the frozen encoder leaves (`spaceclip.encoder.compare_weights`), and its own identity (its
    exact hash) is recorded, so loading the folder later checks the encoder exactly. `difference` is that
    comparison's record (max abs / rel difference), None when nothing was compared."""
    from spaceclip.encoder import EMA_RTOL, EncoderLoadError, FrozenEncoder, compare_weights

    notes: list[str] = []
    stored = encoder_weights_sha256(encoder_state) if encoder_state else None
    encoder = None
    if load:
        try:
            encoder = FrozenEncoder.from_name(name)
        except EncoderLoadError as err:
            if stored is None:
                raise CheckpointImportError(
                    f"{path} holds no encoder weights (no {ENCODER_PREFIX}* keys) and encoder {name!r} cannot be "
                    f"loaded here to record its identity: {str(err).splitlines()[0]}") from None
            notes.append(f"encoder {name!r} could not be loaded here ({str(err).splitlines()[0]})")
    if encoder is not None:
        identity = encoder.identity()
        if stored is None:
            return identity, False, notes, None
        diff = compare_weights(encoder.model.state_dict(), encoder_state)
        if not diff.within_tolerance:
            raise CheckpointImportError(
                f"{path}: its clip_vision_model weights (sha256 {stored[:12]}…) are not those of encoder {name!r} "
                f"(sha256 {identity['weights_sha256'][:12]}…): {diff.describe()}, beyond the {EMA_RTOL:g} of each "
                "element that rounding by an EMA can explain; name the encoder it was trained with (--encoder)")
        record = {"sha256": stored, **diff.record()}
        if diff.differing:
            notes.append(f"the checkpoint's clip_vision_model weights are {name!r}'s up to float32 rounding (as "
                         f"their EMA over the frozen encoder leaves it): {diff.describe()}; the decoder runs on "
                         f"{name!r}'s own weights")
        return identity, True, notes, record
    width = next((int(t.shape[-1]) for k, t in encoder_state.items() if k.endswith("post_layernorm.weight")), None)
    return {"name": name, "revision": None, "width": width, "weights_sha256": stored,
            "source": f"{ENCODER_PREFIX}* weights of {path.name}"}, False, notes, None


# ---- the whole import ------------------------------------------------------------------------------------------
def read_train_config(path: str | Path | None) -> dict:
    """The authors' training YAML (configs/kitti.yaml etc.), or {}."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointImportError(f"cannot read the authors' training config {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointImportError(f"{path}: expected a mapping at the top level")
    return data


def convert(
    path: str | Path,
    *,
    variant: str | None = None,
    weights: str = "auto",
    train_config: dict | None = None,
    semantic_layers=None,
    structural_layers=None,
) -> tuple[SpaceClipDecoder, dict, str, int | None]:
    """(our decoder, encoder state, weights source, epoch) of an authors' checkpoint; no encoder is loaded."""
    path = Path(path)
    tc = train_config or {}
    state, source, epoch = select_state(load_authors_file(path), path, weights)
    decoder_state, encoder_state = split_state(state, path)
    kwargs = decoder_kwargs(
        decoder_state, path,
        semantic_layers or tc.get("main_path_indices") or DEFAULT_SEMANTIC,
        structural_layers or tc.get("structural_path_indices") or DEFAULT_STRUCTURAL,
        float(tc.get("decoder_dropout", 0.1)),
    )
    if variant is not None:
        if variant not in VARIANTS:
            raise CheckpointImportError(f"unknown variant {variant!r}; valid variants: {list(VARIANTS)}")
        if variant != kwargs["variant"]:
            found = []
            found.append("FiLM generators (film_param_generators.*)" if kwargs["film"] else "no FiLM generators")
            found.append("a structural pathway (structural_path_projections.*)" if kwargs["structural"]
                         else "no structural pathway")
            raise CheckpointImportError(
                f"{path}: --variant {variant} but the checkpoint holds {' and '.join(found)}: it is a "
                f"{kwargs['variant']!r} decoder")
    return build_decoder(decoder_state, kwargs, path), encoder_state, source, epoch


def import_checkpoint(
    path: str | Path,
    out: str | Path,
    *,
    variant: str | None = None,
    weights: str = "auto",
    encoder: str | None = None,
    train_config: str | Path | None = None,
    load_encoder: bool = True,
    force: bool = False,
) -> ImportReport:
    """Convert `path` (an authors' `.pt`) into the checkpoint folder `out`."""
    from pipeline.train import save_checkpoint

    path, out = Path(path), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointImportError(f"{out} exists and is not empty; choose another --out or pass --force")
    tc = read_train_config(train_config)
    model, encoder_state, source, epoch = convert(path, variant=variant, weights=weights, train_config=tc)
    name = encoder or tc.get("clip_model_name") or DEFAULT_ENCODER
    identity, checked, notes, difference = encoder_identity(name, encoder_state, path, load=load_encoder)
    if source == "model":
        notes.append("their train.py saves the EMA weights as 'model' when EMA validated better; the file does "
                     "not say which these are")
    file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    extra = {
        "variant": model.variant, "encoder": identity, "cache_fingerprint": None, "epoch": epoch,
        "imported": {"format": FORMAT, "source": str(path), "sha256": file_sha, "weights": source,
                     "train_config": str(train_config) if train_config else None,
                     # the checkpoint's own clip_vision_model weights against the encoder recorded above
                     "encoder_weights": difference,
                     "selection": "the authors' (their best_checkpoint.pt is chosen on the split their config "
                                  "validates on, the test split in their release configs)"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, out, extra)
    log.info("imported %s (%s, weights %s) into %s", path, model.variant, source, out)
    return ImportReport(path, out, model.variant, source, epoch, identity, checked, model.count_parameters(False),
                        notes, difference)
