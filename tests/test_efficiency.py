"""The efficiency table: the authors' parameter counts at the paper's widths, FLOPs of known layers against their
formulas, the live-tensor peak against a hand count, and a real (tiny) table written to disk."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from pipeline.config import DecoderConfig, config_from_dict
from pipeline.efficiency import (AUTHORS_ROWS, LiveTensorPeak, count_flops, measure_efficiency, parameter_counts,
                                 peak_memory, write_efficiency)
from pipeline.layout import encoder_for
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.encoder import BACKBONES, PRESETS, FrozenEncoder


def paper_width_model(variant: str = "full") -> tuple[FrozenEncoder, SpaceClipDecoder]:
    """CLIP ViT-B/16 (the `clip-vit-b16-random` preset's architecture) and the decoder at pipeline/config.py's
    defaults, channels [256, 128, 64, 32]; on the meta device: shapes without the cost of initialising 98 M
    weights."""
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(**PRESETS["clip-vit-b16-random"]))
        decoder = SpaceClipDecoder(variant, width=768, **DecoderConfig().kwargs())
    return FrozenEncoder(model, "clip-vit-b16-random", BACKBONES["clip_vision_model"]), decoder


def test_paper_widths_give_the_authors_parameter_counts():
    encoder, decoder = paper_width_model("full")
    assert DecoderConfig().channels == (256, 128, 64, 32)
    counts = parameter_counts(encoder.model, decoder)
    published = next(r for r in AUTHORS_ROWS if r["variant"] == "full (authors)")
    # 97,850,420 = the whole CLIPVisionModel (85,799,424, its post-layernorm included: the pooled vector FiLM reads
    # goes through it) + the full decoder (12,050,996); trainable = the decoder alone.
    assert counts == {"params_total": 97_850_420, "params_trainable": 12_050_996, "params_encoder": 85_799_424,
                      "params_decoder": 12_050_996}
    assert {k: published[k] for k in counts} == counts
    # ... and each against sum(p.numel()) of the modules, independently of the split into parts
    whole = nn.ModuleDict({"encoder": encoder.model, "decoder": decoder})
    assert counts["params_total"] == sum(p.numel() for p in whole.parameters())
    assert counts["params_trainable"] == sum(p.numel() for p in whole.parameters() if p.requires_grad)
    post_norm = sum(p.numel() for name, p in encoder.model.named_parameters() if "post_layernorm" in name)
    assert post_norm == 2 * 768 and counts["params_encoder"] - post_norm == 85_797_888


def test_flops_of_known_layers_match_their_formulas():
    b, cin, cout, k, h, w = 2, 3, 8, 3, 10, 12
    conv = nn.Conv2d(cin, cout, k, padding=1)
    x = torch.randn(b, cin, h, w)
    assert count_flops(lambda: conv(x)) == 2 * b * cout * h * w * cin * k * k  # 2 per multiply-add, bias free
    linear = nn.Linear(10, 20)
    assert count_flops(lambda: linear(torch.randn(4, 10))) == 2 * 4 * 10 * 20
    up = nn.ConvTranspose2d(4, 6, 2, stride=2)  # the decoder's Up: each input pixel feeds a 2 x 2 patch
    assert count_flops(lambda: up(torch.randn(1, 4, 5, 5))) == 2 * 1 * 4 * 6 * 2 * 2 * 5 * 5
    q, kk, v = (torch.randn(1, 2, 5, 4) for _ in range(3))  # (B, heads, L, E): Q K^T and A V, 2 L^2 E MACs a head
    attention = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, v)  # noqa: E731
    assert count_flops(attention) == 2 * (2 * 1 * 2 * 5 * 5 * 4)


def test_live_tensor_peak_counts_what_is_alive_at_once():
    model = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 10)).eval()
    x = torch.randn(4, 10)
    weights = [*model.parameters()]
    with torch.inference_mode(), LiveTensorPeak(weights + [x]) as tracker:
        model(x)
    # Linear 1's output (4 x 1000 float32) is still referenced while ReLU writes its own: 2 x 16,000 bytes at once;
    # Linear 2's (160 bytes) comes after the first is released.
    assert tracker.peak == 2 * 4 * 1000 * 4
    assert tracker.now == 0  # everything the forward allocated is released again
    resident = sum(p.numel() * 4 for p in weights) + x.numel() * 4
    with torch.inference_mode():
        assert peak_memory(lambda: model(x), torch.device("cpu"), weights + [x]) == resident + 32_000


def test_a_real_table_on_a_tiny_encoder(tmp_path):
    cfg = config_from_dict({"encoder": {"name": "tiny-clip-64"}, "decoder": {"channels": [8, 8, 8, 8]},
                            "train": {"device": "cpu"}, "eval": {"efficiency_batch": 2}})
    decoders = {"full": SpaceClipDecoder("full", width=64, **cfg.decoder.kwargs())}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the timings' values are not asserted; one thread keeps a shared machine's test short
    try:
        table = measure_efficiency(cfg, decoders, repeats=3, budget_s=0.0, warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert list(table["variant"]) == ["full"]
    encoder = encoder_for(cfg)
    for row, decoder in zip(table.to_dict("records"), decoders.values()):
        assert row["params_decoder"] == sum(p.numel() for p in decoder.parameters())
        assert row["params_encoder"] == sum(p.numel() for p in encoder.model.parameters())
        assert row["params_trainable"] == row["params_decoder"]
        assert row["gflops_total"] == pytest.approx(row["gflops_encoder"] + row["gflops_decoder"])
        for part in ("encoder", "decoder", "both"):
            assert 0 < row[f"{part}_b1_p50_ms"] <= row[f"{part}_b1_p95_ms"]
            assert row[f"{part}_b2_img_s"] > 0
        assert row["peak_b2_mib"] > row["peak_b1_mib"] > (row["params_total"] * 4) / 2 ** 20
        assert row["device"].startswith("cpu (") and row["device"].endswith(", 1 torch threads)")
        assert row["repeats"] == 3
    # The FLOPs column is the counter's, at batch 1, on the features the encoder gives
    features = encoder(torch.randn(1, 3, 64, 64), decoders["full"].layers)
    with torch.inference_mode():
        assert table["gflops_decoder"].iloc[0] * 1e9 == count_flops(lambda: decoders["full"](features))

    paths = write_efficiency(table, tmp_path)
    written = pd.read_csv(paths["efficiency_csv"])
    assert len(written) == 1 + len(AUTHORS_ROWS)
    assert written.loc[written["variant"] == "full (authors)", "params_total"].item() == 97_850_420
    text = paths["efficiency_md"].read_text()
    assert "| full (authors) | openai/clip-vit-base-patch16 | 97,850,420 | 12,050,996 | 85,799,424 |" in text
    assert "taewan2002/SPACE-CLIP docs/efficiency.md" in text and "TorchDispatchMode" in text
    assert f"| full | tiny-clip-64 | {table['params_total'].iloc[0]:,} |" in text


def test_cuda_peak_is_the_allocators_peak_over_the_call_less_unrelated_allocations(monkeypatch):
    """No GPU here: the allocator's counters are stood in for; the arithmetic is the real code's."""
    counters = {"allocated": 5_000, "peak": 0}  # 5,000 bytes allocated before the call, e.g. kept features
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counters.update(
        peak=counters["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counters["peak"])

    def call():  # allocates 32,000 bytes of activations at its peak
        counters["peak"] = counters["allocated"] + 32_000

    weights = [torch.zeros(100), torch.zeros(50)]  # 600 bytes, counted whatever the allocator held before
    assert peak_memory(call, torch.device("cuda"), weights) == 600 + 32_000
