"""SPACE-CLIP as one object: the frozen encoder + a trained decoder, from a decoder checkpoint folder.

    model = SpaceClip.from_pretrained("runs/demo/full/best")     # reads the encoder name/revision it records
    depth = model.infer_image(pil_image)                          # (H, W) float32 metres at the input's size
    depths = model.predict(images, batch_size=8)                  # one (H_i, W_i) array per image

The decoder checkpoint records the encoder it was trained on (`config.json["encoder"]`, `FrozenEncoder.identity()`
as written by `pipeline/train.py`). Loading checks that the encoder now loaded has the same weights
(`weights_sha256`) and **raises** on a mismatch: a decoder fed another encoder's features returns confident
garbage, which is worse than an error. `check_encoder=False` turns the error into a warning (e.g. for a
re-saved copy of the same weights in another dtype).

Shared backbone (the paper's plug-in use): a larger model that already ran a Hugging Face vision model with
`output_hidden_states=True` on `model.preprocess(images)` passes its own outputs and skips a second encoder pass:

    out = clip_vision(pixel_values=model.preprocess(images), output_hidden_states=True,
                      **model.encoder.model_kwargs())  # interpolate_pos_encoding at a non-native image_size
    depth = model.decode_hidden_states(out.hidden_states, out.pooler_output, out_size=(H, W))  # (B, 1, H, W)

Pure torch/numpy: the only file access is reading the checkpoint in `from_pretrained`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from spaceclip.decoder import SpaceClipDecoder, resize
from spaceclip.encoder import EncoderLoadError, FrozenEncoder, features_from_hidden_states


class EncoderMismatchError(ValueError):
    """The encoder loaded for a decoder checkpoint is not the one the decoder was trained on."""


def encoder_spec(config: dict, directory: str | Path = "") -> tuple[str, str | None, dict]:
    """A checkpoint config -> (encoder name, revision, recorded identity).

    Accepts `{"encoder": {"name": ..., "revision": ..., ...}}` (what training writes) and `{"encoder": "name"}`.
    """
    enc = config.get("encoder")
    if isinstance(enc, str) and enc:
        return enc, None, {"name": enc}
    if isinstance(enc, dict) and isinstance(enc.get("name"), str) and enc["name"]:
        return enc["name"], enc.get("revision"), enc
    raise ValueError(
        f"{Path(directory) / 'config.json'} does not say which encoder the decoder was trained on (expected "
        "'encoder': {'name': ..., 'revision': ...} or 'encoder': 'name'); pass encoder=<Hub id, folder or preset> "
        "(`--encoder` on the command line)"
    )


class SpaceClip(nn.Module):
    """Frozen encoder + SPACE-CLIP decoder: image -> metric depth."""

    def __init__(self, encoder: FrozenEncoder, decoder: SpaceClipDecoder):
        super().__init__()
        if encoder.width != decoder.width:
            raise ValueError(
                f"encoder {encoder.name!r} has width {encoder.width} but the decoder expects {decoder.width}-channel "
                "features: it was trained on another encoder"
            )
        top = max(decoder.layers)
        if top > encoder.num_layers:
            raise ValueError(f"the decoder reads layer {top} but encoder {encoder.name!r} has {encoder.num_layers}")
        self.encoder = encoder
        self.decoder = decoder.eval()
        for p in self.decoder.parameters():
            p.requires_grad_(False)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        checkpoint_dir: str | Path,
        device: str | torch.device = "cpu",
        encoder: str | FrozenEncoder | None = None,
        check_encoder: bool = True,
    ) -> "SpaceClip":
        """Decoder from `checkpoint_dir` (model.safetensors + config.json) + the encoder its config records.

        `encoder` overrides the recorded one (a Hub id, a local folder, a preset, or a loaded `FrozenEncoder`),
        e.g. a local copy of the weights the checkpoint names by Hub id; the weights hash still has to match.
        """
        checkpoint_dir = Path(checkpoint_dir)
        decoder = SpaceClipDecoder.from_pretrained(checkpoint_dir)
        config = decoder.checkpoint_config
        recorded: dict = {}
        if encoder is None:
            name, revision, recorded = encoder_spec(config, checkpoint_dir)
            try:
                # The input side the decoder was trained at (its token grid), not necessarily the model's own.
                encoder = FrozenEncoder.from_name(name, revision, image_size=recorded.get("image_size"))
            except EncoderLoadError as err:
                raise EncoderLoadError(
                    f"{err} (the decoder in {checkpoint_dir} records encoder {name!r}; if its weights live elsewhere "
                    "on this machine, pass encoder=<folder> / `--encoder FOLDER`)"
                ) from None
        else:
            if config.get("encoder") is not None:
                recorded = encoder_spec(config, checkpoint_dir)[2]
            if isinstance(encoder, str):
                encoder = FrozenEncoder.from_name(encoder, image_size=recorded.get("image_size"))
        expected = recorded.get("weights_sha256")
        if expected and encoder.weights_sha256() != expected:
            msg = (
                f"encoder {encoder.name!r} (weights sha256 {encoder.weights_sha256()[:12]}…) is not the encoder the "
                f"decoder in {checkpoint_dir} was trained on ({recorded.get('name')!r} revision "
                f"{recorded.get('revision')!r}, sha256 {expected[:12]}…): its depth would be meaningless. Load "
                "the recorded weights, or pass check_encoder=False if you know they are equivalent"
            )
            if check_encoder:
                raise EncoderMismatchError(msg)
            warnings.warn(msg, stacklevel=2)
        model = cls(encoder, decoder)
        model.checkpoint_dir = checkpoint_dir
        return model.to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    def preprocess(self, images) -> torch.Tensor:
        """RGB image(s) -> (B, 3, S, S): the project's one preprocessing function, with this encoder's mean/std."""
        return self.encoder.preprocess(images)

    # ---- tensors in, tensors out ----------------------------------------------------------------------------
    def decode_features(self, features: dict, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """{"tokens": {k: (B,g,g,C)}, "global": (B,C)} -> depth (B, 1, H, W) metres (16g x 16g if no out_size)."""
        return self.decoder(features, out_size)["depth"]

    def decode_hidden_states(
        self,
        hidden_states: Sequence[torch.Tensor],
        pooler_output: torch.Tensor,
        out_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Shared backbone: a HF vision model's `hidden_states` tuple + `pooler_output` -> depth (B, 1, H, W).

        The caller ran the encoder itself (`output_hidden_states=True`) on `self.preprocess(images)`; hidden state
        0 is the embedding output, state k the output of block k, each (B, prefix + g*g, C).
        """
        if len(hidden_states) != self.encoder.num_layers + 1:
            raise ValueError(
                f"expected {self.encoder.num_layers + 1} hidden states (embeddings + {self.encoder.num_layers} "
                f"blocks) from encoder {self.encoder.name!r}, got {len(hidden_states)}: pass the full "
                "`hidden_states` tuple of a forward with output_hidden_states=True"
            )
        features = features_from_hidden_states(
            hidden_states, pooler_output, self.decoder.layers, prefix_tokens=self.encoder.backbone.prefix_tokens
        )
        return self.decode_features(features, out_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> depth (B, 1, S, S) metres at the decoder's native resolution."""
        out = self.encoder.model(pixel_values=pixel_values, output_hidden_states=True, **self.encoder.model_kwargs())
        return self.decode_hidden_states(out.hidden_states, out.pooler_output)  # (B, 1, 16g, 16g)

    # ---- images in, arrays out ------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, images: Sequence[Image.Image | np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """RGB images (PIL or (H, W, 3) uint8) -> one float32 (H_i, W_i) depth map in metres per image.

        The whole frame is squashed to S x S (as at evaluation), decoded at 16g x 16g, and bilinearly resized
        back to each input's own size, exactly like the decoder's `out_size` path.
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            raise TypeError("predict() takes a sequence of images; use infer_image() for one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        depths: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            native = self(self.preprocess(chunk).to(self.device))  # (b, 1, S, S)
            for img, d in zip(chunk, native):
                h, w = _image_hw(img)
                depths.append(resize(d[None], (h, w))[0, 0].float().cpu().numpy())  # (H, W)
        return depths

    def infer_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One RGB image (PIL or (H, W, 3) uint8) -> float32 (H, W) depth in metres at the input's size."""
        return self.predict([image], batch_size=1)[0]


def _image_hw(image: Image.Image | np.ndarray) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])
