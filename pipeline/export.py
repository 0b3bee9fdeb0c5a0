"""ONNX export of a trained SPACE-CLIP decoder checkpoint, verified with onnxruntime against PyTorch.

    export_onnx("runs/demo/full/best", "spaceclip.onnx")                     # image tensor -> depth
    export_onnx("runs/demo/full/best", "decoder.onnx", decoder_only=True)    # cached features -> depth

Full model:    pixel_values (B, 3, S, S) float32, preprocessed exactly like `SpaceClip.preprocess` (RGB, bicubic
               squash to S x S, /255, the encoder's mean/std)  ->  depth (B, 1, 16g, 16g) metres (224 x 224 for
               ViT-B/16); bring it to the image size with a bilinear resize.
Decoder only:  tokens_L{k} (B, g, g, C) for exactly the decoder's layers (hidden state k without the CLS token,
               row-major grid, as `features_from_hidden_states` builds it) [+ global (B, C) = pooler_output for
               FiLM variants]  ->  depth (B, 1, 16g, 16g). For a larger system that already runs the encoder.

The batch axis is dynamic. The input names, layers, encoder identity and preprocessing are also written into
the ONNX file's metadata (`spaceclip.*` keys), so the file documents itself.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export). The TorchScript tracer (`dynamo=False`) fails on
this model: it turns the token count into a tensor, and the square-grid check in `features_from_hidden_states`
cannot `round()` it. The dynamo path exports both graphs and matches PyTorch to ~1e-7 relative.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import SpaceClipError
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.model import SpaceClip

OUTPUT_NAME = "depth"
PIXEL_NAME = "pixel_values"
GLOBAL_NAME = "global"


class ExportError(SpaceClipError, RuntimeError):
    """The export failed or the exported graph disagrees with PyTorch."""


def token_name(layer: int) -> str:
    return f"tokens_L{layer}"


class DecoderGraph(nn.Module):
    """The decoder with positional tensor inputs (ONNX has no dicts): tokens per layer [+ global] -> depth."""

    def __init__(self, decoder: SpaceClipDecoder):
        super().__init__()
        self.decoder = decoder
        self.layers = decoder.layers
        self.takes_global = decoder.use_film  # non-FiLM variants never read the global vector

    @property
    def input_names(self) -> list[str]:
        return [token_name(k) for k in self.layers] + ([GLOBAL_NAME] if self.takes_global else [])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        tokens = dict(zip(self.layers, inputs[: len(self.layers)]))  # {k: (B, g, g, C)}
        glob = inputs[len(self.layers)] if self.takes_global else None  # (B, C)
        return self.decoder({"tokens": tokens, "global": glob})["depth_224"]  # (B, 1, 16g, 16g)


@dataclass
class ExportReport:
    path: Path
    kind: str  # "full" | "decoder"
    input_names: list[str]
    input_shapes: list[tuple]
    output_shape: tuple
    max_abs: float  # max |onnxruntime - torch| over the verification batches
    max_rel: float  # max_abs / max |torch|: the error relative to the output's scale
    rtol: float
    seconds: float
    checked_batches: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.rtol

    def summary(self) -> str:
        return (
            f"{self.kind} model -> {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, {self.seconds:.0f} s)\n"
            f"  inputs:  " + ", ".join(f"{n} {s}" for n, s in zip(self.input_names, self.input_shapes)) + "\n"
            f"  output:  {OUTPUT_NAME} {self.output_shape} metres\n"
            f"  onnxruntime vs PyTorch (batch sizes {self.checked_batches}): max abs error {self.max_abs:.3g} m, "
            f"max rel error {self.max_rel:.3g} (max abs / max |depth|; tolerance {self.rtol:g}): "
            + ("OK" if self.ok else "FAILED")
        )


def example_inputs(model: SpaceClip, batch: int, decoder_only: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing and verification. Decoder inputs are the encoder's real features of random images, so
    the check runs on token statistics the decoder actually sees."""
    gen = torch.Generator().manual_seed(seed)
    s = model.image_size
    pixels = torch.randn(batch, 3, s, s, generator=gen)  # about the range of CLIP-normalised images
    if not decoder_only:
        return (pixels,)
    graph = DecoderGraph(model.decoder)
    feats = model.encoder(pixels, layers=graph.layers)
    return tuple(feats["tokens"][k].clone() for k in graph.layers) + (
        (feats["global"].clone(),) if graph.takes_global else ()
    )


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    decoder_only: bool = False,
    encoder: str | None = None,
    rtol: float = 1e-4,
    verify_batches: tuple[int, ...] = (1, 3),
    opset: int | None = None,
) -> ExportReport:
    """Export `checkpoint` (a decoder folder; its encoder is loaded as `SpaceClip.from_pretrained` does) to one
    self-contained `.onnx` file, then run it in onnxruntime on `verify_batches` batch sizes (not the traced
    batch of 2, so the dynamic axis is exercised) and compare with PyTorch."""
    import onnxruntime as ort

    start = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = SpaceClip.from_pretrained(checkpoint, device="cpu", encoder=encoder).eval()
    if decoder_only:
        graph: nn.Module = DecoderGraph(model.decoder).eval()
        input_names = graph.input_names
    else:
        graph, input_names = model, [PIXEL_NAME]
    args = example_inputs(model, 2, decoder_only)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter logs a warning per torchvision op it cannot register; torchvision is not a dependency here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Known noise of torch 2.13's exporter (a pytree deprecation, a dynamic-axis rename notice).
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message="# The axis name.*", category=UserWarning)
            program = torch.onnx.export(
                graph, args, dynamo=True, verbose=False, input_names=input_names, output_names=[OUTPUT_NAME],
                # DecoderGraph.forward(*inputs) takes varargs: torch.export wants their specs nested in one tuple
                dynamic_shapes=(tuple({0: batch} for _ in args),) if decoder_only else ({0: batch},),
                opset_version=opset, optimize=True,
            )
    except Exception as err:  # the exporter raises many types; say what was being exported
        raise ExportError(f"torch.onnx.export failed for the {'decoder' if decoder_only else 'full'} model of "
                          f"{checkpoint}: {type(err).__name__}: {err}") from err
    program.model.metadata_props.update(metadata(model, decoder_only, input_names))
    program.save(str(out), external_data=False)  # one file: ViT-B/16 + decoder is far below protobuf's 2 GB

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    max_abs = max_rel = 0.0
    for b in verify_batches:
        inputs = example_inputs(model, b, decoder_only, seed=1 + b)
        with torch.inference_mode():
            ref = graph(*inputs).numpy()  # (b, 1, S, S)
        got = session.run([OUTPUT_NAME], {n: t.numpy() for n, t in zip(input_names, inputs)})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{out}: onnxruntime returned shape {got.shape} for batch {b}, PyTorch {ref.shape}")
        err = float(np.abs(got - ref).max())
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / max(float(np.abs(ref).max()), 1e-12))
    return ExportReport(
        path=out, kind="decoder" if decoder_only else "full", input_names=input_names,
        input_shapes=[("B",) + tuple(t.shape[1:]) for t in args], output_shape=("B",) + tuple(ref.shape[1:]),
        max_abs=max_abs, max_rel=max_rel, rtol=rtol, seconds=time.perf_counter() - start,
        checked_batches=list(verify_batches),
    )


def metadata(model: SpaceClip, decoder_only: bool, input_names: list[str]) -> dict[str, str]:
    enc = model.encoder
    s, side = enc.image_size, model.decoder.upscale * enc.grid
    return {
        "spaceclip.kind": "decoder" if decoder_only else "full",
        "spaceclip.inputs": ", ".join(input_names),
        "spaceclip.layers": json.dumps(list(model.decoder.layers)),
        "spaceclip.output": f"{OUTPUT_NAME}: (B, 1, {side}, {side}) metric depth in metres; "
        "resize bilinearly to the image size",
        "spaceclip.preprocess": f"RGB, bicubic resize to {s}x{s} (aspect not kept), /255, mean "
        f"{list(enc.backbone.mean)}, std {list(enc.backbone.std)}",
        "spaceclip.tokens": f"tokens_L<k>: (B, {enc.grid}, {enc.grid}, {enc.width}) hidden state k (0 = embeddings) "
        f"without the first {enc.backbone.prefix_tokens} token(s), row-major; global: pooler_output (B, {enc.width})",
        "spaceclip.encoder": json.dumps({"name": enc.name, "revision": enc.revision,
                                         "weights_sha256": enc.weights_sha256()}),
        "spaceclip.decoder": json.dumps(model.decoder.config_dict()),
        "spaceclip.checkpoint": str(getattr(model, "checkpoint_dir", "")),
    }
