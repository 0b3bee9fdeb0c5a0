"""`spaceclip import`: a checkpoint written in the authors' format (taewan2002/SPACE-CLIP train.py:
{"model": SPACECLIP.state_dict(), "optimizer": ..., "epoch": ...}, their module names, the frozen encoder under
clip_vision_model.) becomes a decoder checkpoint folder that gives the same depth as the source weights."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch

from flows.cli import main
from pipeline.importer import CheckpointImportError, import_checkpoint
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.encoder import FrozenEncoder

WIDTH = 64  # tiny-clip's hidden size
CHANNELS = (32, 16, 16, 8)


def authors_key(ours: str) -> str:
    """Our decoder key -> the name the authors' space_clip.py gives the same tensor (written out by hand from
    their module tree, independently of pipeline/importer.py)."""
    parts = ours.split(".")
    head, rest = parts[0], parts[1:]
    if head == "film":
        return ".".join(["film_param_generators", *rest])
    if head == "semantic_proj":
        return ".".join(["main_path_projections", *rest])
    if head == "structural_proj":
        return ".".join(["structural_path_projections", *rest])
    if head == "head":
        return ".".join(["depth_prediction_head", *rest])
    if head == "aux_heads":
        return ".".join(["aux_depth_heads", *rest])
    i, module, tail = rest[0], rest[1], rest[2:]
    if head == "structural_blocks":
        name = {"up": "upsample_low", "fuse": "fusion_conv"}[module]
        return ".".join(["structural_decoder_blocks", i, name, *tail])
    assert head == "semantic_blocks", ours
    if module == "up":
        return ".".join(["main_decoder_blocks", i, "upsample_low", *tail])
    if module == "skip_gate":  # their gate is Sequential(Conv2d, Sigmoid)
        return ".".join(["main_decoder_blocks", i, "skip_clip_gate", "0", *tail])
    if module == "struct_gate":
        return ".".join(["main_decoder_blocks", i, "skip_struct_gate", "0", *tail])
    assert module == "fuse", ours
    if tail[0] == "0":  # our conv_bn_relu (Sequential) = their fusion_conv.0 (Conv) / .1 (BN)
        return ".".join(["main_decoder_blocks", i, "fusion_conv", tail[1], *tail[2:]])
    return ".".join(["main_decoder_blocks", i, "fusion_conv", "3", *tail[1:]])  # Res = their ResidualConvBlock


def small_decoder(variant: str, seed: int) -> SpaceClipDecoder:
    torch.manual_seed(seed)
    model = SpaceClipDecoder(variant, width=WIDTH, channels=CHANNELS)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval-mode outputs depend on every buffer
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.1)
                module.num_batches_tracked.fill_(1234)
    return model.eval()


def authors_state(decoder: SpaceClipDecoder, encoder: FrozenEncoder | None, prefix: str = "") -> dict:
    state = {prefix + authors_key(k): v.clone() for k, v in decoder.state_dict().items()}
    if encoder is not None:
        state.update({f"{prefix}clip_vision_model.{k}": v.clone() for k, v in encoder.model.state_dict().items()})
    return state


def authors_optimizer_state(decoder: SpaceClipDecoder) -> dict:
    """A real AdamW state dict after one step, as their model_io.save_checkpoint stores it."""
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4, weight_decay=0.01)
    for p in decoder.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt.state_dict()


def features(seed: int = 7, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"tokens": {k: torch.randn(batch, 4, 4, WIDTH, generator=g) for k in (0, 1, 2, 3, 6, 9, 12)},
            "global": torch.randn(batch, WIDTH, generator=g)}


@pytest.fixture(scope="module")
def encoder():
    return FrozenEncoder.from_preset("tiny-clip")


@pytest.mark.parametrize("variant", ["baseline", "film", "structural", "full"])
def test_imported_decoder_gives_the_source_weights_outputs(tmp_path, encoder, variant):
    source = small_decoder(variant, seed=1)
    path = tmp_path / "best_checkpoint.pt"
    torch.save({"model": authors_state(source, encoder, prefix="module." if variant == "film" else ""),
                "optimizer": authors_optimizer_state(small_decoder(variant, seed=1)), "epoch": 19}, path)
    report = import_checkpoint(path, tmp_path / "out", encoder="tiny-clip")
    assert report.variant == variant and report.weights == "model" and report.epoch == 20
    assert report.encoder_checked and report.encoder["weights_sha256"] == encoder.weights_sha256()

    imported = SpaceClipDecoder.from_pretrained(tmp_path / "out").eval()
    assert imported.variant == variant and imported.channels == CHANNELS and imported.width == WIDTH
    assert imported.semantic_layers == (12, 9, 6, 3) and imported.structural_layers == (2, 1, 0)
    for key, t in source.state_dict().items():
        assert torch.equal(imported.state_dict()[key], t), key
    with torch.no_grad():
        want, got = source(features(), (30, 50)), imported(features(), (30, 50))
    assert torch.equal(want["depth"], got["depth"]) and want["depth"].shape == (2, 1, 30, 50)
    assert all(torch.equal(a, b) for a, b in zip(want["aux"], got["aux"])) and len(got["aux"]) == 3

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["imported"]["source"] == str(path) and config["imported"]["weights"] == "model"
    assert config["epoch"] == 20 and config["cache_fingerprint"] is None
    assert config["encoder"]["name"] == "tiny-clip"


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_ema_weights_are_imported_when_present_and_raw_on_request(tmp_path, encoder):
    raw, ema = small_decoder("full", seed=1), small_decoder("full", seed=2)
    path = tmp_path / "last_checkpoint.pt"
    torch.save({"model": authors_state(raw, encoder), "ema": authors_state(ema, encoder), "epoch": 4}, path)
    x = features(seed=3)
    with torch.no_grad():
        want_raw, want_ema = raw(x)["depth"], ema(x)["depth"]
    assert not torch.allclose(want_raw, want_ema)

    report = import_checkpoint(path, tmp_path / "ema", encoder="tiny-clip")
    assert report.weights == "ema" and report.epoch == 5
    with torch.no_grad():
        assert torch.equal(SpaceClipDecoder.from_pretrained(tmp_path / "ema").eval()(x)["depth"], want_ema)
    import_checkpoint(path, tmp_path / "raw", encoder="tiny-clip", weights="model")
    with torch.no_grad():
        assert torch.equal(SpaceClipDecoder.from_pretrained(tmp_path / "raw").eval()(x)["depth"], want_raw)

    plain = tmp_path / "plain.pt"
    torch.save({"model": authors_state(raw, encoder)}, plain)
    with pytest.raises(CheckpointImportError, match=r"no separate EMA weights.*'model' may already be them"):
        import_checkpoint(plain, tmp_path / "x", encoder="tiny-clip", weights="ema")


def test_imported_folder_is_a_spaceclip_model(tmp_path, encoder):
    from spaceclip.model import SpaceClip

    source = small_decoder("full", seed=4)
    path = tmp_path / "best_checkpoint.pt"
    torch.save({"model": authors_state(source, encoder), "epoch": 0}, path)
    import_checkpoint(path, tmp_path / "out", encoder="tiny-clip")
    model = SpaceClip.from_pretrained(tmp_path / "out")
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    depth = model.infer_image(image)
    pixel = model.preprocess([image])
    with torch.no_grad():
        feats = encoder(pixel, layers=source.layers)
        want = source(feats, (40, 60))["depth"][0, 0].numpy()
    assert depth.shape == (40, 60)
    np.testing.assert_allclose(depth, want, rtol=1e-5, atol=1e-6)


def test_wrong_encoder_variant_and_foreign_keys_are_refused(tmp_path, encoder):
    source = small_decoder("full", seed=1)
    other = {f"clip_vision_model.{k}": v + 1e-3 if v.is_floating_point() else v
             for k, v in encoder.model.state_dict().items()}
    path = tmp_path / "other_encoder.pt"
    torch.save({"model": {**authors_state(source, None), **other}}, path)
    with pytest.raises(CheckpointImportError,
                       match=r"clip_vision_model weights .* are not those of encoder 'tiny-clip'"):
        import_checkpoint(path, tmp_path / "a", encoder="tiny-clip")

    path = tmp_path / "full.pt"
    torch.save({"model": authors_state(source, encoder)}, path)
    with pytest.raises(CheckpointImportError, match=r"--variant baseline but the checkpoint holds FiLM generators "
                                                    r"\(film_param_generators\.\*\) and a structural pathway.*'full'"):
        import_checkpoint(path, tmp_path / "b", encoder="tiny-clip", variant="baseline")

    state = authors_state(source, encoder)
    state["main_decoder_blocks.0.extra_gate.weight"] = torch.zeros(1)
    path = tmp_path / "foreign.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointImportError,
                       match=re.escape(f"{path}: key 'main_decoder_blocks.0.extra_gate.weight'")):
        import_checkpoint(path, tmp_path / "c", encoder="tiny-clip")

    state = authors_state(source, encoder)
    del state["main_decoder_blocks.2.fusion_conv.3.norm2.running_var"]
    path = tmp_path / "short.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointImportError,
                       match=r"missing 'main_decoder_blocks\.2\.fusion_conv\.3\.norm2\.running_var'"):
        import_checkpoint(path, tmp_path / "d", encoder="tiny-clip")


def test_a_pickled_object_checkpoint_is_refused_in_one_line(tmp_path, encoder, capsys):
    source = small_decoder("baseline", seed=1)
    path = tmp_path / "with_args.pt"
    torch.save({"model": authors_state(source, encoder), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointImportError, match=rf"refusing {re.escape(str(path))}: loading it needs unpickling "
                                                    r"of code \(it pickles argparse\.Namespace\)"):
        import_checkpoint(path, tmp_path / "out", encoder="tiny-clip")
    assert not (tmp_path / "out").exists()

    assert main(["import", str(path), "--out", str(tmp_path / "cli"), "--encoder", "tiny-clip"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: refusing {path}")


def test_cli_import_then_predict(tmp_path, encoder, capsys):
    from PIL import Image

    source = small_decoder("structural", seed=5)
    path = tmp_path / "best_checkpoint.pt"
    torch.save({"model": authors_state(source, encoder), "optimizer": authors_optimizer_state(source), "epoch": 9},
               path)
    out = tmp_path / "ckpt"
    assert main(["import", str(path), "--out", str(out), "--encoder", "tiny-clip", "--variant", "structural"]) == 0
    printed = capsys.readouterr().out
    assert f"imported {path} -> {out}" in printed and "structural" in printed and "epoch 10" in printed
    assert main(["import", str(path), "--out", str(out), "--encoder", "tiny-clip"]) == 2  # not over a checkpoint
    assert "exists and is not empty" in capsys.readouterr().err

    Image.fromarray(np.full((32, 48, 3), 120, np.uint8)).save(tmp_path / "frame.png")
    assert main(["predict", str(tmp_path / "frame.png"), "--checkpoint", str(out), "--out", str(tmp_path / "d"),
                 "--device", "cpu"]) == 0
    assert np.load(tmp_path / "d" / "frame_depth.npy").shape == (32, 48)


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_evaluate_scores_an_imported_checkpoint_like_its_source_weights(demo_cfg, tmp_path):
    from pipeline.config import config_from_dict, dump_config
    from pipeline.evaluate import decoder_predictor, evaluate_run
    from pipeline.layout import RunContext
    from pipeline.tables import protocol_line

    cfg = config_from_dict(dump_config(demo_cfg), overrides=[f"train.out_dir={tmp_path / 'runs'}", "sweep=authors",
                                                               "eval.qualitative=0"])
    source = small_decoder("full", seed=6)
    path = tmp_path / "best_checkpoint.pt"
    torch.save({"model": authors_state(source, FrozenEncoder.from_preset("tiny-clip")), "epoch": 19}, path)
    import_checkpoint(path, RunContext.of(cfg).checkpoint_dir("full"), encoder="tiny-clip")

    imported = evaluate_run(cfg, ["full"])  # through load_checkpoints: the folder `spaceclip evaluate` reads
    direct = evaluate_run(cfg, predictors={"full": decoder_predictor(source, torch.device("cpu"))})
    assert len(imported.per_image) == direct.counts["evaluated"] > 0
    for col in ("id", "abs_rel", "rmse", "d1"):
        assert list(imported.per_image[col]) == list(direct.per_image[col]), col
    assert imported.checkpoints["full"]["epoch"] == 20
    assert "full: imported from the authors' checkpoint best_checkpoint.pt" in protocol_line(imported.protocol)


def test_layers_dropout_and_encoder_come_from_the_authors_training_yaml(tmp_path, encoder):
    source = small_decoder("full", seed=8)
    path = tmp_path / "best_checkpoint.pt"
    torch.save({"model": authors_state(source, encoder)}, path)
    yaml_path = tmp_path / "kitti.yaml"  # the keys of their configs/kitti.yaml that the weights cannot tell
    yaml_path.write_text("clip_model_name: tiny-clip\nmain_path_indices: [11, 8, 5, 3]\n"
                         "structural_path_indices: [2, 1, 0]\ndecoder_dropout: 0.2\nuse_film: true\n")
    report = import_checkpoint(path, tmp_path / "out", train_config=yaml_path)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["decoder"]["semantic_layers"] == [11, 8, 5, 3] and config["decoder"]["dropout"] == 0.2
    assert report.encoder["name"] == "tiny-clip" and report.encoder_checked
    yaml_path.write_text("structural_path_indices: [2, 1]\n")
    with pytest.raises(CheckpointImportError, match=r"3 structural projections .* structural layers \(2, 1\)"):
        import_checkpoint(path, tmp_path / "bad", train_config=yaml_path, encoder="tiny-clip")


def test_film_hidden_width_is_read_from_the_keys_or_refused(tmp_path, encoder):
    import inspect

    source = small_decoder("film", seed=9)
    state = authors_state(source, encoder)
    for i in range(4):  # a FiLM generator with hidden width 32 instead of 256 (their film_param_hidden_dim)
        g = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2 * WIDTH))
        for k, v in g.state_dict().items():
            state[f"film_param_generators.{i}.{k}"] = v
    path = tmp_path / "narrow.pt"
    torch.save({"model": state}, path)
    if "film_hidden" not in inspect.signature(SpaceClipDecoder).parameters:
        with pytest.raises(CheckpointImportError, match=r"FiLM hidden width 32 \(film_param_generators\.0\.0\.weight\)"):
            import_checkpoint(path, tmp_path / "out", encoder="tiny-clip")
        return
    import_checkpoint(path, tmp_path / "out", encoder="tiny-clip")
    imported = SpaceClipDecoder.from_pretrained(tmp_path / "out").eval()
    assert imported.film[0][0].weight.shape == (32, WIDTH)
    assert torch.equal(imported.film[2][2].bias, state["film_param_generators.2.2.bias"])


# ---- EMA over the frozen encoder (issue 27, item 3) -------------------------------------------------------------
def authors_ema(state: dict, steps: int, decay: float) -> dict:
    """Their train.py ExponentialMovingAverage: the shadow starts as a clone of state_dict() and every update runs
    over every floating-point entry, the frozen clip_vision_model included. The model does not change here (as the
    frozen encoder does not), so `x` is the same tensor at every step. The same float operations run on one flat
    tensor per dtype instead of one per entry: 400 calls instead of 80,000, with the same bits as the per-entry loop
    (`test_the_flat_ema_is_their_loop`)."""
    shadow = {name: tensor.detach().clone() for name, tensor in state.items()}
    groups: dict[torch.dtype, list[str]] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            groups.setdefault(tensor.dtype, []).append(name)
    with torch.no_grad():
        for names in groups.values():
            x = torch.cat([state[name].detach().reshape(-1) for name in names])
            average = x.clone()
            for _ in range(steps):
                average.mul_(decay).add_(x, alpha=1.0 - decay)
            for name, part in zip(names, average.split([state[name].numel() for name in names])):
                shadow[name] = part.view_as(state[name]).clone()
    return shadow


def test_the_flat_ema_is_their_loop(encoder):
    """`authors_ema` gives the bits of their per-entry loop (written out here, three updates)."""
    state = authors_state(small_decoder("full", seed=3), encoder)
    shadow = {name: tensor.clone() for name, tensor in state.items()}
    for _ in range(3):
        for name, tensor in state.items():
            if tensor.is_floating_point():
                shadow[name].mul_(0.996).add_(tensor, alpha=1.0 - 0.996)
    flat = authors_ema(state, 3, 0.996)
    assert flat.keys() == shadow.keys() and all(torch.equal(flat[k], shadow[k]) for k in shadow)
    assert any(not torch.equal(flat[k], state[k]) for k in state)  # the updates did change values


def test_an_ema_selected_checkpoint_imports_and_another_encoder_is_refused(tmp_path, encoder, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from spaceclip.encoder import PRESETS
    from spaceclip.model import SpaceClip

    source = small_decoder("full", seed=3)
    emad = authors_ema(authors_state(source, encoder), steps=200, decay=0.996)  # float32, as they train
    state = {k: v.clone() for k, v in emad.items()}
    path = tmp_path / "best_checkpoint.pt"
    torch.save({"model": state, "optimizer": authors_optimizer_state(source), "epoch": 4}, path)

    hub = {k: v.double().numpy() for k, v in encoder.model.state_dict().items()}
    ema = {k[len("clip_vision_model."):]: v.double().numpy() for k, v in state.items()
           if k.startswith("clip_vision_model.")}
    diffs = {k: np.abs(ema[k] - hub[k]) for k in hub}
    max_abs = max(float(d.max()) for d in diffs.values())
    max_rel = max(float((d[hub[k] != 0] / np.abs(hub[k][hub[k] != 0])).max(initial=0.0)) for k, d in diffs.items())
    n_diff = sum(int((d > 0).sum()) for d in diffs.values())
    assert 0 < max_abs < 1e-4 and 0 < max_rel < 1e-5 and n_diff > 1000  # the EMA did move the frozen weights

    report = import_checkpoint(path, tmp_path / "out", encoder="tiny-clip")
    assert report.encoder_checked and report.encoder["weights_sha256"] == encoder.weights_sha256()
    recorded = json.loads((tmp_path / "out" / "config.json").read_text())["imported"]["encoder_weights"]
    assert recorded["max_abs_diff"] == max_abs and recorded["max_rel_diff"] == max_rel
    assert recorded["elements_differing"] == n_diff and recorded["elements"] == sum(a.size for a in hub.values())
    assert recorded["sha256"] != encoder.weights_sha256()  # exact hashing would have refused it
    assert f"max difference {max_abs:.3g}" in report.summary()
    SpaceClip.from_pretrained(tmp_path / "out")  # the folder records the loaded encoder: its exact hash checks

    assert main(["import", str(path), "--out", str(tmp_path / "cli"), "--encoder", "tiny-clip"]) == 0
    assert f"max difference {max_abs:.3g}" in capsys.readouterr().out

    # tiny-clip's architecture from another seed, through the same EMA: refused, with how far it is
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = CLIPVisionModel(CLIPVisionConfig(**PRESETS["tiny-clip"]))
    state = authors_ema({**authors_state(source, None),
                         **{f"clip_vision_model.{k}": v for k, v in other.state_dict().items()}}, 200, 0.996)
    path = tmp_path / "other_seed.pt"
    torch.save({"model": state, "epoch": 4}, path)
    assert main(["import", str(path), "--out", str(tmp_path / "refused"), "--encoder", "tiny-clip"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "refused").exists()
    assert re.search(r"clip_vision_model weights .* are not those of encoder 'tiny-clip' .*: [\d,]+ of [\d,]+ "
                     r"elements differ, by at most .* beyond the 0\.002 of each element .*\(--encoder\)$", err), err

    # one element of the EMA'd encoder moved by 1 % of itself: refused too (the check is per element)
    state = {k: v.clone() for k, v in emad.items()}  # the EMA'd checkpoint of the start, computed once
    key = "clip_vision_model.encoder.layers.5.mlp.fc1.weight"
    state[key][3, 7] *= 1.01
    path = tmp_path / "one_element.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointImportError, match=re.escape("in encoder.layers.5.mlp.fc1.weight)")):
        import_checkpoint(path, tmp_path / "one", encoder="tiny-clip")
