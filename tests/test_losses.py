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
