"""Pictures of an evaluation, written beside its tables.

    qualitative.png      like the paper's Figure 3: input, ground truth and one prediction per variant for a few
                         test frames, all colour-mapped with ONE shared depth scale and a colour bar
    training_curves.png  validation AbsRel (and training loss) per epoch per variant, from each run's history.csv,
                         with the epoch of the evaluated checkpoint marked

Colour convention as in `pipeline.visualize`: near = the colormap's high end (red for turbo), invalid = black.
Sparse ground truth (KITTI's projected LiDAR, about 5 % of the pixels) would vanish when a 1242-pixel-wide frame
is drawn a few hundred pixels wide, so its points are dilated for display (never for the metrics). Wide frames
(KITTI, about 3.3 : 1) are laid out one frame per column; others (NYU, 4 : 3) one frame per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import Config  # noqa: E402
from pipeline.evaluate import Evaluation, Example  # noqa: E402
from pipeline.train import HISTORY_NAME, run_dir  # noqa: E402
from pipeline.visualize import DEFAULT_COLORMAP, colorize, colormap, depth_range_of, has_depth  # noqa: E402
from spaceclip.decoder import VARIANTS  # noqa: E402
from spaceclip.metrics import crop_mask  # noqa: E402

PANEL_WIDTH_IN = 4.2  # inches per panel: about 420 px at the saved dpi
DPI = 100
SPARSE_FRACTION = 0.5  # GT with fewer valid pixels than this is drawn dilated


def variant_colors(variants: Sequence[str]) -> dict[str, tuple]:
    """One colour per variant, the same in every figure (Table-2 order first)."""
    order = list(VARIANTS) + [v for v in variants if v not in VARIANTS]
    palette = plt.get_cmap("tab10")
    return {v: palette(order.index(v) % 10) for v in variants}


def dilate_sparse(depth: np.ndarray, radius: int) -> np.ndarray:
    """Fill each invalid pixel within `radius` (Chebyshev) of a measurement with its nearest measurement, so sparse
    points stay visible when the picture is shrunk. Display only."""
    out = depth.copy()
    filled = out > 0
    h, w = out.shape
    pad = np.pad(depth, radius)  # (H + 2r, W + 2r)
    offsets = sorted(((dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                      if dy or dx), key=lambda o: o[0] ** 2 + o[1] ** 2)
    for dy, dx in offsets:  # nearest first: a pixel takes the closest measurement
        shifted = pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
        take = ~filled & (shifted > 0)
        out[take] = shifted[take]
        filled |= take
    return out


def crop_box(shape: tuple[int, int], crop: str) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the evaluation crop, or None for `none`."""
    if crop == "none":
        return None
    mask = crop_mask(shape, crop)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def shared_range(samples: Sequence[Example]) -> tuple[float, float]:
    """The colour range of the whole figure: the 2nd-98th percentiles of the shown frames' valid GT."""
    values = np.concatenate([s.gt[has_depth(s.gt)] for s in samples] or [np.zeros(0, np.float32)])
    if values.size == 0:  # no GT at all: fall back to the predictions
        values = np.concatenate([p.ravel() for s in samples for p in s.predictions.values()])
    return depth_range_of(values)


def _panel(ax, image: np.ndarray, corner: str | None = None) -> None:
    ax.imshow(image, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if corner:
        ax.text(0.01, 0.96, corner, transform=ax.transAxes, va="top", ha="left", fontsize=8, color="white",
                bbox=dict(boxstyle="round,pad=0.2", facecolor="black", alpha=0.6, linewidth=0))


def variant_label(variant: str) -> str:
    film, structural = VARIANTS.get(variant, (False, False))
    parts = {(True, True): "FiLM + structural path", (True, False): "FiLM only",
             (False, True): "structural path only", (False, False): "no FiLM, no structural path"}
    return f"{variant}\n({parts[film, structural]})"


def qualitative_grid(
    samples: Sequence[Example],
    out_path: str | Path,
    *,
    variants: Sequence[str],
    crop: str = "none",
    title: str = "",
    cmap: str = DEFAULT_COLORMAP,
    depth_range: tuple[float, float] | None = None,
) -> Path:
    """Input | GT | one prediction per variant for each sample, one shared colour scale and a colour bar."""
    if not samples:
        raise ValueError("no samples to draw (eval.qualitative = 0, or no test frame has ground truth)")
    lo, hi = depth_range or shared_range(samples)
    h, w = samples[0].gt.shape
    wide = w / h >= 2.0
    n_panels, n_samples = 2 + len(variants), len(samples)
    # Wide frames: one frame per column (its panels stacked); otherwise one frame per row (panels side by side).
    rows, cols = (n_panels, n_samples) if wide else (n_samples, n_panels)
    panel_h_in = PANEL_WIDTH_IN * h / w
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_WIDTH_IN + 1.6, rows * (panel_h_in + 0.06) + 0.5),
                             dpi=DPI, squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.01, hspace=0.01)
    display_px = PANEL_WIDTH_IN * DPI
    any_sparse = False
    for i, sample in enumerate(samples):
        grid = axes[:, i] if wide else axes[i, :]
        gt = sample.gt
        measured = has_depth(gt)
        sparse = measured.mean() < SPARSE_FRACTION
        any_sparse |= sparse
        radius = max(1, int(round(0.75 * gt.shape[1] / display_px)))
        with Image.open(sample.image_path) as image:
            rgb = np.asarray(image.convert("RGB"))  # (H, W, 3)
        panels = [rgb,
                  colorize(dilate_sparse(gt, radius) if sparse else gt, cmap, (lo, hi))[0],
                  *(colorize(sample.predictions[v], cmap, (lo, hi))[0] for v in variants)]
        corners = [None, f"{int(measured.sum())} px with depth",
                   *(f"AbsRel {m['abs_rel']:.3f}   δ1 {m['d1']:.3f}" if (m := sample.metrics.get(v)) else None
                     for v in variants)]
        for ax, image, corner in zip(grid, panels, corners):
            _panel(ax, image, corner)
        box = crop_box(gt.shape, crop)
        if box is not None:
            top, left, bh, bw = box
            grid[1].add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, fill=False, edgecolor="white",
                                        linestyle="--", linewidth=1.0))
    names = ["input", "ground truth" + ("\n(sparse: dilated\nfor display)" if any_sparse else ""),
             *(variant_label(v) for v in variants)]
    ids = [s.id if len(s.id) <= 44 else "…" + s.id[-43:] for s in samples]
    col_labels, row_labels = (ids, names) if wide else (names, ids)
    for ax, label in zip(axes[0, :], col_labels):
        ax.set_title(label.replace("\n", " "), fontsize=9, pad=3)
    for ax, label in zip(axes[:, 0], row_labels):
        ax.set_ylabel(label, fontsize=9, rotation=0 if wide else 90, ha="right" if wide else "center",
                      va="center", labelpad=6)
    # Near = the colormap's high end (pipeline.visualize): as a function of depth, that is the reversed map.
    mappable = plt.cm.ScalarMappable(norm=Normalize(lo, hi), cmap=colormap(cmap).reversed())
    bar = fig.colorbar(mappable, ax=axes, fraction=0.02, pad=0.01, aspect=35)
    bar.set_label("depth (m): one scale for every panel; black = no ground truth", fontsize=9)
    fig.suptitle(title or "Qualitative results", fontsize=11)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def training_curves(
    histories: dict[str, pd.DataFrame],
    out_path: str | Path,
    *,
    selected: dict[str, int | None] | None = None,
    title: str = "",
) -> Path:
    """Validation AbsRel (left) and training loss (right) per epoch, one line per variant; a star marks the
    epoch of the checkpoint that was evaluated (`selected`, variant -> epoch)."""
    if not histories:
        raise ValueError("no training history to draw")
    colors = variant_colors(list(histories))
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), dpi=DPI)
    for variant, h in histories.items():
        color = colors[variant]
        ax_val.plot(h["epoch"], h["val_abs_rel"], marker="o", markersize=3, color=color, label=variant)
        ax_loss.plot(h["epoch"], h["train_loss"], marker="o", markersize=3, color=color, label=variant)
        epoch = (selected or {}).get(variant)
        if epoch is not None and (h["epoch"] == epoch).any():
            at = h.loc[h["epoch"] == epoch, "val_abs_rel"].iloc[0]
            ax_val.plot([epoch], [at], marker="*", markersize=14, color=color, markeredgecolor="black",
                        linestyle="none")
    for ax, column in ((ax_val, "val_abs_rel"), (ax_loss, "train_loss")):
        values = pd.concat([h[column] for h in histories.values()]).dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 5:
            ax.set_yscale("log")  # an early overshoot would flatten the rest of the curves on a linear axis
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(  # label the 2s and 5s of each decade
                lambda v, _: f"{v:g}" if round(v / 10 ** np.floor(np.log10(v))) in (2, 5) else ""))
    ax_val.set_title("validation AbsRel (★ = evaluated checkpoint)", fontsize=10)
    ax_loss.set_title("training loss (0.5 SILog + 0.5 SSIM + aux)", fontsize=10)
    for ax in (ax_val, ax_loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_val.set_ylabel("AbsRel ↓")
    ax_loss.set_ylabel("loss")
    ax_val.legend(fontsize=9, frameon=False)
    fig.suptitle(title or "Training curves", fontsize=12)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white")
    plt.close(fig)
    return out


def read_histories(cfg: Config, variants: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Each variant's history.csv (variants without one are left out: e.g. injected predictors in tests)."""
    out = {}
    for variant in variants:
        path = run_dir(cfg, variant) / HISTORY_NAME
        if path.is_file():
            out[variant] = pd.read_csv(path)
    return out


def write_figures(evaluation: Evaluation, cfg: Config, out_dir: str | Path) -> dict[str, Path]:
    """qualitative.png (when there are samples) and training_curves.png (when there are histories)."""
    out, p = Path(out_dir), evaluation.protocol
    variants = list(evaluation.per_image["variant"].drop_duplicates())
    where = f"{p['config']} / {p['sweep']}, {p['dataset'].upper()} test"
    paths = {}
    if evaluation.samples:
        lo, hi = shared_range(evaluation.samples)
        paths["qualitative"] = qualitative_grid(
            evaluation.samples, out / "qualitative.png", variants=variants, crop=p["crop"],
            title=f"SPACE-CLIP depth, {where}: input, ground truth and each variant "
                  f"(shared scale {lo:.1f}-{hi:.1f} m; dashed box = evaluation crop {p['crop']})",
            depth_range=(lo, hi))
    histories = read_histories(cfg, variants)
    if histories:
        selected = {v: evaluation.checkpoints.get(v, {}).get("epoch") for v in histories}
        paths["training_curves"] = training_curves(
            histories, out / "training_curves.png", selected=selected,
            title=f"Training curves, {p['config']} / {p['sweep']} (checkpoint: {p['checkpoint']})")
    return paths
