"""A training step reads nothing back from the device, skips bad batches exactly as before, and `train.deterministic`
sets the torch switches it names."""

import contextlib
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig
from pipeline.loader import Batch
from pipeline.train import (CUBLAS_DETERMINISTIC, determinism, ema_of, load_optimizer_state, make_optimizer,
                            train_step)
from spaceclip.decoder import SpaceClipDecoder
from spaceclip.losses import depth_loss
from test_losses import _old_depth_loss  # the losses of 0a0ead0, the reference there


def old_depth_loss(outputs, gt, *, min_depth, max_depth, aux_weights, **_):
    total = _old_depth_loss(outputs, gt, min_depth, max_depth, aux_weights)
    return total, {"valid_pixels": ((gt > min_depth) & (gt < max_depth)).sum()}

W, G, HW = 16, 2, (24, 28)  # a 2x2 grid decodes to 32x32, resized to the 24x28 targets (bilinear, as on KITTI)
LOSS = dict(min_depth=1e-3, max_depth=80.0, silog_weight=0.5, ssim_weight=0.5, aux_weights=(0.10, 0.05, 0.0))
TC = TrainConfig(lr=1e-3, weight_decay=0.01)
CUDA = torch.device("cuda")  # make_optimizer reads only its type: the GPU's optimiser, run on the CPU


@pytest.fixture(autouse=True)
def one_thread():
    """Steps of a tiny decoder: one thread (more only spin against each other on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed=0) -> SpaceClipDecoder:
    torch.manual_seed(seed)
    return SpaceClipDecoder("full", width=W, channels=(8, 8, 4, 4), film_hidden=8, dropout=0.1, head_bias=10.0)


def make_batch(seed: int, kind: str = "sparse", b: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    features = {"tokens": {k: torch.randn(b, G, G, W, generator=g) for k in range(13)},
                "global": torch.randn(b, W, generator=g)}
    depth = torch.rand(b, *HW, generator=g) * 60 + 1.0
    depth[torch.rand(b, *HW, generator=g) > 0.3] = 0.0  # sparse, KITTI-like
    if kind == "empty":  # no valid target pixel: skipped
        depth[:] = 0.0
    elif kind == "nan":  # a NaN feature: a NaN loss, skipped
        features["tokens"][12][0, 1, 1, 3] = float("nan")
    return Batch(features, depth, np.arange(b), torch.zeros(b, dtype=torch.bool))


# Batches of a short run: good ones and the two kinds that are skipped, one of them first (before any optimiser
# state exists) and one in the middle.
KINDS = ["empty", "sparse", "nan", "sparse", "empty", "sparse"]


# ---- the step of 0a0ead0, copied as the reference (today's loss; its host reads; torch's default AdamW) --------
def old_train_step(model, optimizer, batch, loss_kwargs, grad_clip, ema=None, loss_fn=depth_loss):
    gt = batch.depth[:, None]
    outputs = model(batch.features, out_size=tuple(gt.shape[-2:]))
    loss, parts = loss_fn(outputs, gt, **loss_kwargs)
    value, valid = torch.stack([loss.detach().float(), parts["valid_pixels"].float()]).tolist()
    if not np.isfinite(value) or valid == 0:
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    if ema is not None:
        ema.update_parameters(model)
    return value


def run(step, optimizer_of, kinds=KINDS, grad_clip=0.05):
    model = tiny_model()
    optimizer = optimizer_of(model)
    ema = ema_of(model, 0.9)
    torch.manual_seed(7)  # dropout's draws: the same stream in both runs
    out = []
    for i, kind in enumerate(kinds):
        r = step(model, optimizer, make_batch(i, kind), LOSS, grad_clip, ema)
        out.append(r if r is None or isinstance(r, float) else (r[0].item() if r[1].item() else None))
    return model, optimizer, ema, out


def assert_same_state(a, b):
    (ma, oa, ea, _), (mb, ob, eb, _) = a, b
    # Weights bit for bit. BatchNorm's running statistics differ by design: the old step's skipped batches moved
    # them (its train-mode forward ran before the skip; the NaN batch left them NaN), today's step puts them back
    # (`test_a_skipped_step_changes_nothing`); train-mode forwards never read them, so the weights agree.
    for old, new in ((ma, mb), (ea.module, eb.module)):
        for (key, x), y in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.isfinite(y.float()).all(), key
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    for p, q in zip(ma.parameters(), mb.parameters(), strict=True):
        sa, sb = oa.state[p], ob.state[q]  # (empty for the aux head of weight 0: it gets no gradient)
        assert sa.keys() == sb.keys()
        for key in sa:  # exp_avg, exp_avg_sq, step: skipped steps do not count
            assert torch.equal(sa[key].float(), sb[key].float()), key


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_train_step_is_the_old_step_bit_for_bit_skips_included(device):
    # The optimiser `make_optimizer` picks for the device (for "cuda" the fused AdamW, run here on the CPU) in both
    # runs: the old step skips by not stepping, the new one by the flag. Gradients are clipped on every step (clip
    # 0.05); the EMA's masked update against AveragedModel.update_parameters; BN statistics and EMA copies too.
    old = run(old_train_step, lambda m: make_optimizer(m, TC, torch.device(device)))
    new = run(train_step, lambda m: make_optimizer(m, TC, torch.device(device)))
    assert old[3] == new[3]  # the same loss values, None where skipped
    assert [v is None for v in new[3]] == [k != "sparse" for k in KINDS]
    assert_same_state(old, new)
    assert float(new[1].state[next(new[0].parameters())]["step"]) == KINDS.count("sparse")
    assert new[1].defaults["fused"] is (True if device == "cuda" else None)  # the CPU keeps torch's default AdamW


def test_a_skipped_step_changes_nothing():
    model = tiny_model()
    optimizer, ema = make_optimizer(model, TC, CUDA), ema_of(model, 0.9)
    train_step(model, optimizer, make_batch(0), LOSS, 1.0, ema)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, ema.module)]
    moments = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    for i, kind in enumerate(["empty", "nan"], 1):
        loss, taken = train_step(model, optimizer, make_batch(i, kind), LOSS, 1.0, ema)
        assert not taken.item() and (kind == "nan") == (not torch.isfinite(loss).item())
    for m, want in zip((model, ema.module), before):
        for k, v in m.state_dict().items():  # BatchNorm's running statistics too, though the forward ran
            assert torch.equal(v, want[k]), k
    for k, v in optimizer.state[next(model.parameters())].items():
        assert torch.equal(v, moments[k]), k


class HostReads:
    """Counts the ways Python code reads a tensor's value back to the host: item/tolist/bool/int/float/index,
    nonzero, and boolean-mask indexing (which sizes its result by a nonzero). On a GPU each waits for the queue."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        getitem = torch.Tensor.__getitem__

        def counted_getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append("bool-mask index")
            return getitem(t, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)
        self.on = False

    def _counting(self, name, original):
        def counted(t, *args, **kwargs):
            if self.on:
                self.calls.append(name)
            return original(t, *args, **kwargs)
        return counted

    @contextlib.contextmanager
    def counting(self):
        self.calls.clear()
        self.on = True
        try:
            yield self.calls
        finally:
            self.on = False


def test_train_step_reads_nothing_back_from_the_device(monkeypatch):
    model = tiny_model()
    optimizer, ema = make_optimizer(model, TC, CUDA), ema_of(model, 0.9)
    batches = [make_batch(i, kind) for i, kind in enumerate(["sparse", "empty", "nan", "sparse"])]
    reads = HostReads(monkeypatch)
    for batch in batches:
        with reads.counting() as calls:
            train_step(model, optimizer, batch, LOSS, 1.0, ema)
        assert calls == [], calls  # good or skipped, no value of the step is read on the host
    # The counter sees what the step of 0a0ead0 read: per step the loss and pixel count (tolist), the gradient
    # norm's isfinite, and in each SILog (main + 2 aux) `valid.any()` and two boolean gathers, in SSIM one of each.
    with reads.counting() as calls:
        old_train_step(model, optimizer, batches[0], LOSS, 1.0, None, loss_fn=old_depth_loss)
    assert sorted(calls) == sorted(["tolist", "__bool__"] + ["__bool__", "bool-mask index", "bool-mask index"] * 3
                                   + ["__bool__", "bool-mask index"]), calls
    # The CPU's optimiser (torch's default AdamW) takes one read of the step's own, the skip flag (AdamW itself reads
    # its host-side step counts).
    plain = make_optimizer(model, TC, torch.device("cpu"))
    with reads.counting() as calls:
        train_step(model, plain, batches[3], LOSS, 1.0, None)
    assert "tolist" not in calls and "bool-mask index" not in calls and "__bool__" not in calls and calls[0] == "item"


def test_resuming_a_state_saved_by_the_unfused_adamw_keeps_the_fused_kernel():
    # A GPU run saved before AdamW was fused: torch's load_state_dict would take the saved groups' fused=None, and
    # the next step would refuse the skip flag.
    model = tiny_model()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    torch.manual_seed(3)
    old_train_step(model, plain, make_batch(0), LOSS, 1.0)
    saved = plain.state_dict()
    raw = make_optimizer(model, TC, CUDA)
    raw.load_state_dict(saved)
    assert raw.param_groups[0]["fused"] is None  # the trap
    fused = make_optimizer(model, TC, CUDA)
    load_optimizer_state(fused, saved)
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["lr"] == 1e-3
    for p in model.parameters():
        for key, value in plain.state[p].items():
            assert torch.equal(fused.state[p][key].float(), value.float()), key
    loss, taken = train_step(model, fused, make_batch(1), LOSS, 1.0)
    assert taken.item() and float(fused.state[next(model.parameters())]["step"]) == 2.0


# ---- train.deterministic -----------------------------------------------------------------------------------------
@pytest.fixture
def torch_flags():
    """The global switches `determinism` touches, as they were (checked restored by the tests)."""
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_cpu_is_deterministic_by_default_and_can_be_switched_off(torch_flags):
    cpu = torch.device("cpu")
    with determinism(cpu, None):
        assert torch.are_deterministic_algorithms_enabled()
        with pytest.raises(RuntimeError, match="deterministic"):  # put_ has no deterministic kernel anywhere
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ or torch_flags[3] is not None
    with determinism(cpu, None, deterministic=False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert torch_flags[0] == torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("preset", [None, ":16:8"])
def test_cuda_deterministic_sets_algorithms_cublas_workspace_and_cudnn(monkeypatch, torch_flags, preset):
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)  # the user's own deterministic setting is kept
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    with determinism(cuda, None, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (preset or CUBLAS_DETERMINISTIC)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == preset
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic == torch_flags[1]
    assert torch.are_deterministic_algorithms_enabled() == torch_flags[0]


def test_cuda_default_is_not_deterministic(monkeypatch, torch_flags):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with determinism(torch.device("cuda"), None):
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        assert torch.backends.cudnn.deterministic == torch_flags[1]


def test_cuda_deterministic_warns_when_cuda_was_used_before_the_workspace_setting(monkeypatch, caplog):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        with determinism(torch.device("cuda"), None, deterministic=True):
            pass
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in caplog.text


def test_train_deterministic_config_key():
    assert TrainConfig().deterministic is None
    assert TrainConfig(deterministic=True).deterministic is True


def test_deterministic_bilinear_has_torch_forward_and_its_gradient():
    # The decoder's resize on a GPU under train.deterministic: run here on the CPU by calling the Function itself.
    from spaceclip.decoder import _DeterministicBilinear

    g = torch.Generator().manual_seed(0)
    for (h, w), size in [((32, 32), (24, 28)), ((7, 9), (40, 56)), ((16, 16), (16, 40))]:
        x = torch.randn(2, 3, h, w, generator=g, requires_grad=True)
        up = torch.randn(2, 3, *size, generator=g)
        want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        (want_grad,) = torch.autograd.grad((want * up).sum(), x)
        got = _DeterministicBilinear.apply(x, size)
        (got_grad,) = torch.autograd.grad((got * up).sum(), x)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_resize_takes_the_deterministic_backward_only_on_a_gpu_under_deterministic_algorithms(monkeypatch):
    from spaceclip import decoder

    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    with determinism(torch.device("cpu"), None):  # the CPU's own kernel is deterministic: kept
        assert decoder.resize(x, (12, 12)).grad_fn.name() == "UpsampleBilinear2DBackward0"
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))  # what resize reads
    with determinism(torch.device("cuda"), None, deterministic=True):
        assert decoder.resize(x, (12, 12)).grad_fn.name() == "_DeterministicBilinearBackward"
    assert decoder.resize(x, (12, 12)).grad_fn.name() == "UpsampleBilinear2DBackward0"  # the GPU's default
