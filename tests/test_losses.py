import numpy as np
import pytest
import torch

from spaceclip.losses import depth_loss, silog_loss, ssim_loss, ssim_map


def sparse_pair(seed=0, b=2, h=48, w=64, density=0.3):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(b, 1, h, w, generator=g) * 90 + 0.5
    gt[torch.rand(b, 1, h, w, generator=g) > density] = 0.0  # KITTI-like: 0 = no measurement
    pred = (gt.clamp(min=1.0) * torch.exp(0.3 * torch.randn(b, 1, h, w, generator=g))).requires_grad_(True)
    return pred, gt


def test_silog_matches_formula_pooled_over_batch():
    pred, gt = sparse_pair()
    p, t = pred.detach().numpy().astype(np.float64), gt.numpy().astype(np.float64)
    valid = (t > 1e-3) & (t < 80.0)
    g = np.log(p[valid]) - np.log(t[valid])  # all valid pixels of both images in one pool
    want = 10 * np.sqrt(np.mean(g**2) - 0.85 * np.mean(g) ** 2)
    got = silog_loss(pred, gt, 1e-3, 80.0)
    assert got.item() == pytest.approx(want, rel=1e-4)
    got.backward()
    assert pred.grad.abs().sum() > 0
    assert pred.grad[torch.from_numpy(~valid)].abs().sum() == 0  # invalid pixels get no gradient


def test_silog_accepts_bhw_and_rejects_mismatch():
    pred, gt = sparse_pair()
    assert silog_loss(pred[:, 0], gt[:, 0], 1e-3, 80.0).item() == pytest.approx(silog_loss(pred, gt, 1e-3, 80.0).item())
    with pytest.raises(ValueError, match="differ"):
        silog_loss(pred[..., :32], gt, 1e-3, 80.0)


def test_ssim_identical_is_zero_different_is_positive():
    pred, gt = sparse_pair()
    valid = (gt > 1e-3) & (gt < 80)
    assert ssim_loss(gt.clone(), gt, valid).item() == pytest.approx(0.0, abs=1e-5)
    loss = ssim_loss(pred, gt, valid)
    assert 0 < loss.item() <= 2.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ssim_map_matches_skimage_interior():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 40, 50, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(1, 1, 40, 50, generator=g, dtype=torch.float64)).clamp(0, 1)
    _, ref = skimage_metrics.structural_similarity(
        a[0, 0].numpy(), b[0, 0].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )
    ours = ssim_map(a, b)[0, 0].numpy()
    # Borders differ only by padding (zeros here, reflection in skimage): compare the 11x11-window interior.
    np.testing.assert_allclose(ours[5:-5, 5:-5], ref[5:-5, 5:-5], rtol=1e-6, atol=1e-8)


def test_depth_loss_combines_parts_with_sparse_gt():
    pred, gt = sparse_pair()
    aux = [(pred.detach() * s).requires_grad_(True) for s in (1.2, 0.8, 1.5)]
    outputs = {"depth": pred, "aux": aux}
    total, parts = depth_loss(outputs, gt, min_depth=1e-3, max_depth=80.0)
    valid = (gt > 1e-3) & (gt < 80.0)
    want = (
        0.5 * silog_loss(pred, gt, 1e-3, 80.0) + 0.5 * ssim_loss(pred, gt, valid)
        + 0.10 * silog_loss(aux[0], gt, 1e-3, 80.0) + 0.05 * silog_loss(aux[1], gt, 1e-3, 80.0)
    )
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(parts) == {"silog", "ssim", "aux", "total", "valid_pixels"}
    assert parts["valid_pixels"].item() == valid.sum().item()
    total.backward()
    assert pred.grad.abs().sum() > 0 and aux[0].grad.abs().sum() > 0
    assert aux[2].grad is None  # weight 0.0: not even in the graph


def test_no_valid_pixels_gives_zero_that_keeps_the_graph():
    pred = torch.rand(2, 1, 16, 16, requires_grad=True)
    gt = torch.zeros(2, 1, 16, 16)
    total, parts = depth_loss({"depth": pred, "aux": [pred]}, gt, min_depth=1e-3, max_depth=80.0)
    assert total.item() == 0.0 and parts["valid_pixels"].item() == 0
    total.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_one_sample_without_valid_pixels_does_not_poison_the_batch():
    pred, gt = sparse_pair()
    gt[1] = 0.0
    total, _ = depth_loss({"depth": pred, "aux": []}, gt, min_depth=1e-3, max_depth=80.0)
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(pred.grad).all()


def test_loss_is_float32_under_autocast():
    pred, gt = sparse_pair()
    valid = (gt > 1e-3) & (gt < 80.0)
    want = ssim_loss(pred, gt, valid).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim_loss(pred.to(torch.bfloat16), gt, valid)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, abs=5e-3)  # only the bf16 rounding of pred itself remains


def test_too_few_aux_weights_is_an_error():
    pred, gt = sparse_pair()
    with pytest.raises(ValueError, match="aux_weights"):
        depth_loss({"depth": pred, "aux": [pred] * 3}, gt, min_depth=1e-3, max_depth=80.0, aux_weights=(0.1,))


# ---- the masked-sum losses against the boolean-indexing ones they replaced (0a0ead0), copied as the reference ----
def _old_silog(pred, gt, min_depth, max_depth, variance_focus=0.85):
    pred, gt = pred.float(), gt.float()
    valid = (gt > min_depth) & (gt < max_depth)
    if not valid.any():
        return pred.sum() * 0.0
    g = torch.log(pred[valid].clamp(min=1e-7)) - torch.log(gt[valid])
    d = (g**2).mean() - variance_focus * g.mean() ** 2
    return 10.0 * torch.sqrt(d.clamp(min=1e-7))


def _old_ssim(pred, gt, valid):
    pred, gt, valid = pred.float(), gt.float(), valid.to(torch.bool)
    if not valid.any():
        return pred.sum() * 0.0
    inf = torch.tensor(float("inf"))
    lo = torch.where(valid, gt, inf).amin(dim=(1, 2, 3), keepdim=True)
    hi = torch.where(valid, gt, -inf).amax(dim=(1, 2, 3), keepdim=True)
    has_valid = valid.any(dim=(1, 2, 3), keepdim=True)
    lo, hi = torch.where(has_valid, lo, 0.0), torch.where(has_valid, hi, 1.0)
    scale = (hi - lo).clamp(min=1e-6)
    norm_pred = ((pred - lo) / scale).clamp(0, 1)
    norm_gt = ((gt - lo) / scale).clamp(0, 1)
    return 1.0 - ssim_map(norm_pred, norm_gt)[valid].mean()


def _old_depth_loss(outputs, gt, min_depth, max_depth, aux_weights=(0.10, 0.05, 0.0)):
    depth = outputs["depth"]
    valid = (gt > min_depth) & (gt < max_depth)
    total = 0.5 * _old_silog(depth, gt, min_depth, max_depth) + 0.5 * _old_ssim(depth, gt, valid)
    aux = depth.sum() * 0.0
    for w, p in zip(aux_weights, outputs["aux"]):
        if w > 0:
            aux = aux + w * _old_silog(p, gt, min_depth, max_depth)
    return total + aux


def _case(kind: str, seed: int):
    pred, gt = sparse_pair(seed=seed, density=0.3)
    pred = pred.detach()
    if kind == "none":
        gt[:] = 0.0
    elif kind == "one":
        gt[:] = 0.0
        gt[1, 0, 7, 9] = 12.5
    elif kind == "all":
        gt = torch.rand(gt.shape, generator=torch.Generator().manual_seed(seed)) * 70 + 1.0
    elif kind == "one_sample_empty":
        gt[0] = 0.0
    elif kind == "nonfinite_gt":  # NaN / inf targets are invalid pixels, never a NaN loss
        gt[0, 0, :4] = float("nan")
        gt[1, 0, :4] = float("inf")
    elif kind == "nonfinite_pred_invalid":  # a NaN prediction where there is no target: today's loss ignores it
        pred[gt <= 1e-3] = float("nan")
    elif kind == "nonfinite_pred_valid":
        pred[0, 0][gt[0, 0] > 1e-3] = float("inf")
    return pred, gt


CASES = ["sparse", "none", "one", "all", "one_sample_empty", "nonfinite_gt", "nonfinite_pred_valid"]


def _same(new: torch.Tensor, old: torch.Tensor) -> None:
    # Float rounding of a differently ordered float32 sum: SSIM's 1 - mean over ~1000 values near 1 moves by a few
    # ulps of 1 (6e-8 each), SILog by a few ulps of itself.
    if torch.isfinite(old):
        assert new.item() == pytest.approx(old.item(), rel=1e-6, abs=5e-7)
    else:  # a non-finite loss stays non-finite (the trainer skips the step on it)
        assert not torch.isfinite(new)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_losses_equal_the_indexing_ones_and_their_gradients(kind, seed):
    pred, gt = _case(kind, seed)
    # A NaN target is an invalid pixel; the old SSIM let it spread through its window into a NaN loss, the new one
    # reads it as 0 (a missing return): the reference gets the 0 it now stands for.
    gt_old = torch.nan_to_num(gt, nan=0.0) if kind == "nonfinite_gt" else gt
    aux = [pred * s for s in (1.2, 0.8, 1.5)]
    grads = []
    for fn in (lambda o: depth_loss(o, gt, min_depth=1e-3, max_depth=80.0)[0],
               lambda o: _old_depth_loss(o, gt_old, 1e-3, 80.0)):
        p = pred.clone().requires_grad_(True)
        a = [x.clone().requires_grad_(True) for x in aux]
        loss = fn({"depth": p, "aux": a})
        loss.backward()
        grads.append((loss.detach(), p.grad, a[0].grad))
    (new, gp_new, ga_new), (old, gp_old, ga_old) = grads
    _same(new, old)
    valid = (gt > 1e-3) & (gt < 80.0)
    _same(silog_loss(pred, gt, 1e-3, 80.0), _old_silog(pred, gt, 1e-3, 80.0))
    _same(ssim_loss(pred, gt, valid), _old_ssim(pred, gt_old, valid))
    if torch.isfinite(old):
        torch.testing.assert_close(gp_new, gp_old, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(ga_new, ga_old, rtol=1e-4, atol=1e-9)
    if kind == "none":  # exactly 0 with exactly 0 gradients, as before
        assert new.item() == 0.0 and torch.equal(gp_new, torch.zeros_like(gp_new))
    if kind == "nonfinite_gt":
        assert torch.isfinite(new) and not torch.isfinite(_old_ssim(pred, gt, valid))


def test_a_nan_prediction_without_a_target_leaves_the_silog_gradient_finite():
    # where the masked sum would multiply 0 by a NaN, the selection drops it: as the gather did
    pred, gt = _case("nonfinite_pred_invalid", 0)
    p = pred.clone().requires_grad_(True)
    loss = silog_loss(p, gt, 1e-3, 80.0)
    _same(loss, _old_silog(pred, gt, 1e-3, 80.0))
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad[gt <= 1e-3].abs().sum() == 0
