"""Training loss of the reference release: 0.5 SILog + 0.5 SSIM on the main depth, plus weighted SILog on aux maps.

Targets may be sparse (KITTI LiDAR: 0 = no measurement); only pixels with min_depth < gt < max_depth count.

Every term is a masked sum over the full map divided by the valid count, never a boolean-mask gather or an
`if mask.any()`: both read a value back to the host, which on a GPU waits for every kernel queued before it
(eleven such waits a step with two aux terms, before). No valid pixel in the whole batch: every term is exactly 0
with zero gradients (the count is clamped to 1 and the term selected away with `torch.where`, so `backward()`
works and the gradients are a no-op, as in the reference release). `depth_loss` also reports `valid_pixels` so a
trainer can skip such a batch instead of letting AdamW's weight decay and momentum move the weights on a
zero-gradient step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from spaceclip.metrics import valid_mask

LOG_EPS = 1e-7  # predictions come out of a ReLU and may be exactly 0; ln(0) = -inf
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data_range 1: depth is min-max normalised first


def _as_b1hw(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}")
    return x


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, gt = _as_b1hw(pred, "pred"), _as_b1hw(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ; resize the prediction to the target "
            "first (SpaceClipDecoder.forward(features, out_size=gt.shape[-2:]))"
        )
    # Losses in float32 even under autocast: the log-variance and the SSIM moments lose too much in half.
    return pred.float(), gt.float()


def silog_loss(
    pred: torch.Tensor, gt: torch.Tensor, min_depth: float, max_depth: float, variance_focus: float = 0.85
) -> torch.Tensor:
    """10 * sqrt(mean(g^2) - λ mean(g)^2), g = ln pred - ln gt over valid pixels pooled across the batch.

    (Eigen et al. 2014 with λ = 0.85, as in BTS/AdaBins and the reference release.) The radicand is clamped at
    1e-7 so sqrt never sees 0 and its gradient stays finite when prediction and target agree exactly.
    """
    pred, gt = _check_pair(pred, gt)
    return _silog(pred, gt, valid_mask(gt, min_depth, max_depth), variance_focus)


def _silog(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, variance_focus: float = 0.85) -> torch.Tensor:
    """SILog of float32 (B, 1, H, W) maps over the bool mask `valid`, as masked sums (no host read)."""
    # Invalid pixels enter as ln 1 - ln 1 = 0, selected before the log: their gradient is exactly 0 even where the
    # prediction is NaN or the target 0 (a product with the mask would give 0 * inf = NaN there).
    g = torch.log(torch.where(valid, pred, 1.0).clamp(min=LOG_EPS)) - torch.log(torch.where(valid, gt, 1.0))
    n = valid.sum()
    count = n.clamp(min=1).to(g.dtype)
    d = (g**2).sum() / count - variance_focus * (g.sum() / count) ** 2
    return torch.where(n > 0, 10.0 * torch.sqrt(d.clamp(min=LOG_EPS)), 0.0)


def _gaussian_window(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The normalised 1-D Gaussian (11,): SSIM's 11x11 window is its outer product, so the blur is separable."""
    x = torch.arange(SSIM_WINDOW, device=device, dtype=dtype) - SSIM_WINDOW // 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM of two (B, 1, H, W) maps in [0, 1]: 11x11 Gaussian window σ 1.5, zero padding."""
    # Autocast off: it would run these convolutions in half precision, and var = E[x^2] - mu^2 cancels badly there.
    with torch.autocast(a.device.type, enabled=False):
        dtype = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(dtype), b.to(dtype)
        g = _gaussian_window(a.device, a.dtype)
        # The five local means in one grouped call per axis: a 1x11 then an 11x1 pass (22 taps a pixel instead of
        # 121; with zero padding this equals the 2-D window exactly, up to float rounding).
        maps = torch.cat([a, b, a * a, b * b, a * b], dim=1)  # (B, 5, H, W)
        half = SSIM_WINDOW // 2
        maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(5, 1, 1, SSIM_WINDOW), padding=(0, half), groups=5)
        maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(5, 1, SSIM_WINDOW, 1), padding=(half, 0), groups=5)
        mu_a, mu_b, e_aa, e_bb, e_ab = maps.unbind(dim=1)
        var_a = e_aa - mu_a**2
        var_b = e_bb - mu_b**2
        cov = e_ab - mu_a * mu_b
        num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
        den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
        return (num / den)[:, None]  # (B, 1, H, W)


def ssim_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - mean SSIM over the valid pixels (pooled across the batch); identical maps -> 0.

    Both maps are min-max normalised per sample with the *target's* valid min and max and clamped to [0, 1],
    so SSIM's constants (made for data range 1) apply and scale is left to SILog. We return 1 - SSIM, not the
    (1 - SSIM) / 2 of Monodepth's photometric loss, because that is what the reference release trains with at
    weight 0.5: halving it would silently halve the SSIM term relative to the paper.
    """
    pred, gt = _check_pair(pred, gt)
    valid = _as_b1hw(valid, "valid").to(torch.bool)
    if valid.shape != gt.shape:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match gt {tuple(gt.shape)}")
    inf = torch.tensor(float("inf"), device=gt.device)
    lo = torch.where(valid, gt, inf).amin(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    hi = torch.where(valid, gt, -inf).amax(dim=(1, 2, 3), keepdim=True)
    has_valid = valid.any(dim=(1, 2, 3), keepdim=True)
    lo, hi = torch.where(has_valid, lo, 0.0), torch.where(has_valid, hi, 1.0)  # samples without valid pixels
    scale = (hi - lo).clamp(min=1e-6)
    norm_pred = ((pred - lo) / scale).clamp(0, 1)
    # A NaN target is an invalid pixel (valid_mask) but would spread through the 11x11 window into valid ones: as 0,
    # it normalises to 0 like a missing LiDAR return (inf already clamps to 1, -inf to 0).
    norm_gt = ((torch.nan_to_num(gt, nan=0.0) - lo) / scale).clamp(0, 1)
    n = valid.sum()
    ssim = torch.where(valid, ssim_map(norm_pred, norm_gt), 0.0).sum() / n.clamp(min=1)
    return torch.where(n > 0, 1.0 - ssim, 0.0)


def depth_loss(
    outputs: dict,
    gt: torch.Tensor,
    *,
    min_depth: float,
    max_depth: float,
    silog_weight: float = 0.5,
    ssim_weight: float = 0.5,
    aux_weights: Sequence[float] = (0.10, 0.05, 0.0),
) -> tuple[torch.Tensor, dict]:
    """Decoder outputs {"depth", "aux"} and the target (B,1,H,W) -> (total, parts).

    total = silog_weight * SILog(depth) + ssim_weight * SSIM(depth) + Σ aux_weights[i] * SILog(aux[i]).
    parts holds detached scalars "silog", "ssim", "aux", "total" and "valid_pixels" (call float() to log them).
    """
    depth, gt = _check_pair(outputs["depth"], gt)
    aux = list(outputs.get("aux") or [])
    if len(aux) > len(aux_weights):
        raise ValueError(
            f"{len(aux)} auxiliary predictions but only {len(aux_weights)} aux_weights {tuple(aux_weights)}"
        )
    valid = valid_mask(gt, min_depth, max_depth)

    silog = _silog(depth, gt, valid)
    ssim = ssim_loss(depth, gt, valid)
    aux_total = torch.zeros((), device=depth.device)
    for w, pred in zip(aux_weights, aux):
        if w > 0:  # a zero weight (stage 2 in the release) costs nothing and adds nothing
            aux_total = aux_total + w * _silog(*_check_pair(pred, gt), valid)
    total = silog_weight * silog + ssim_weight * ssim + aux_total
    parts = {
        "silog": silog.detach(), "ssim": ssim.detach(), "aux": aux_total.detach(), "total": total.detach(),
        "valid_pixels": valid.sum().detach(),
    }
    return total, parts
