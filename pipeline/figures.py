"""Pictures of an evaluation, written beside its tables.

    qualitative.png      like the paper's Figure 3: input, ground truth and one prediction per variant for a few
                         test frames, all colour-mapped with ONE shared depth scale and a colour bar; with several
                         seeds, each variant's run is the seed whose test AbsRel is nearest the variant's mean (named)
    training_curves.png  validation AbsRel (and training loss) per epoch per variant, from each run's history.csv,
                         with the epoch of the evaluated checkpoint marked; with several seeds, the mean over seeds
                         (line), their min-max (band) and each seed (thin lines)

    qualitative_best.png / qualitative_worst.png
                         failure cases: per variant, its test frame with the lowest / highest AbsRel (per_image.csv;
                         the representative seed as above): input, GT, prediction and the error map
                         |pred - GT| / GT (what AbsRel averages), on a fixed scale, grey where there is no GT

Colour convention as in `pipeline.visualize`: near = the colormap's high end (red for turbo), invalid = black.
Sparse ground truth (KITTI's projected LiDAR, about 5 % of the pixels) would vanish when a 1242-pixel-wide frame
is drawn a few hundred pixels wide, so its points are dilated for display (never for the metrics). Wide frames
(KITTI, about 3.3 : 1) are laid out one frame per column; others (NYU, 4 : 3) one frame per row.
"""

from __future__ import annotations

import dataclasses
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
from pipeline.evaluate import Evaluation, Example, Predictor  # noqa: E402
from pipeline.train import HISTORY_NAME  # noqa: E402
from pipeline.visualize import DEFAULT_COLORMAP, colorize, colormap, depth_range_of, has_depth  # noqa: E402
from spaceclip.decoder import VARIANTS  # noqa: E402
from spaceclip.metrics import crop_mask, valid_mask  # noqa: E402

PANEL_WIDTH_IN = 4.2  # inches per panel: about 420 px at the saved dpi
DPI = 100
SPARSE_FRACTION = 0.5  # GT with fewer valid pixels than this is drawn dilated
ERROR_MAX = 0.5  # the error maps' fixed scale: |pred - GT| / GT from 0 to 50 % (and above)
ERROR_CMAP = "inferno"
NO_GT_GREY = (0.82, 0.82, 0.82)


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
    seeds: dict[str, int] | None = None,
) -> Path:
    """Input | GT | one prediction per variant for each sample, one shared colour scale and a colour bar.
    `seeds`: variant -> the seed of the run shown, named beside the variant."""
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
             *(variant_label(v) + (f"\nseed {seeds[v]}" if seeds and v in seeds else "") for v in variants)]
    ids = [s.id if len(s.id) <= 44 else "…" + s.id[-43:] for s in samples]
    col_labels, row_labels = (ids, names) if wide else (names, ids)
    for ax, label in zip(axes[0, :], col_labels):
        ax.set_title(label.replace("\n", " "), fontsize=9, pad=3)
    for ax, label in zip(axes[:, 0], row_labels):
        ax.set_ylabel(label, fontsize=9, rotation=0 if wide else 90, ha="right" if wide else "center",
                      va="center", labelpad=6)
    depth_colorbar(fig, axes, lo, hi, cmap, "depth (m): one scale for every panel; black = no ground truth")
    fig.suptitle(title or "Qualitative results", fontsize=11)
    return save_figure(fig, out_path)


def depth_colorbar(fig, axes, lo: float, hi: float, cmap: str, label: str) -> None:
    """The depth scale of `axes`' panels. Near = the colormap's high end (pipeline.visualize): as a function of
    depth, that is the reversed map."""
    mappable = plt.cm.ScalarMappable(norm=Normalize(lo, hi), cmap=colormap(cmap).reversed())
    fig.colorbar(mappable, ax=axes, fraction=0.02, pad=0.01, aspect=35).set_label(label, fontsize=9)


def save_figure(fig, out_path: str | Path) -> Path:
    """Write `fig` as a PNG at `out_path` (folders made as needed) and close it."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def training_curves(
    histories: dict[str, pd.DataFrame | dict[int, pd.DataFrame]],
    out_path: str | Path,
    *,
    selected: dict[str, int | None | dict[int, int | None]] | None = None,
    title: str = "",
) -> Path:
    """Validation AbsRel (left) and training loss (right) per epoch, one colour per variant; a star marks the
    epoch of the checkpoint that was evaluated (`selected`, variant -> epoch). A variant with several seeds
    (variant -> {seed: history}, `selected` variant -> {seed: epoch}) is drawn as the mean over its seeds (line),
    their min-max (band) and each seed's own curve (thin), a star per seed."""
    if not histories:
        raise ValueError("no training history to draw")
    runs = {v: (h if isinstance(h, dict) else {None: h}) for v, h in histories.items()}
    chosen = {v: (e if isinstance(e, dict) else {None: e}) for v, e in (selected or {}).items()}
    colors = variant_colors(list(runs))
    several = any(len(r) > 1 for r in runs.values())
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), dpi=DPI, sharex=True)  # validation may start late
    for variant, by_seed in runs.items():
        color = colors[variant]
        n = len(by_seed)
        for ax, column in ((ax_val, "val_abs_rel"), (ax_loss, "train_loss")):
            table = pd.concat({s: h.set_index("epoch")[column] for s, h in by_seed.items()}, axis=1)  # epoch x seed
            label = f"{variant} (mean of {n} seeds)" if n > 1 else variant
            if n > 1:
                for seed in table.columns:
                    ax.plot(table.index, table[seed], color=color, linewidth=0.6, alpha=0.35)
                ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=color, alpha=0.15,
                                linewidth=0)
            ax.plot(table.index, table.mean(axis=1), marker="o", markersize=3, color=color, label=label)
        for seed, h in by_seed.items():
            epoch = chosen.get(variant, {}).get(seed)
            if epoch is not None and (h["epoch"] == epoch).any():
                at = h.loc[h["epoch"] == epoch, "val_abs_rel"].iloc[0]
                ax_val.plot([epoch], [at], marker="*", markersize=14 if n == 1 else 9, color=color,
                            markeredgecolor="black", linestyle="none")
    for ax, column in ((ax_val, "val_abs_rel"), (ax_loss, "train_loss")):
        values = pd.concat([h[column] for r in runs.values() for h in r.values()]).dropna()
        if len(values) and values.min() > 0 and values.max() / values.min() > 5:
            ax.set_yscale("log")  # an early overshoot would flatten the rest of the curves on a linear axis
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(  # label the 2s and 5s of each decade
                lambda v, _: f"{v:g}" if round(v / 10 ** np.floor(np.log10(v))) in (2, 5) else ""))
    every = pd.concat([h for r in runs.values() for h in r.values()])
    scored = every.loc[every["val_abs_rel"].notna(), "epoch"]
    if len(scored) and scored.min() > every["epoch"].min():  # train.validate_from: say why the panel starts late
        ax_val.text(0.03, 0.5, f"not validated\nbefore epoch {scored.min()}\n(train.validate_from)",
                    transform=ax_val.transAxes, fontsize=9, color="0.4", va="center")
    spread = "; line = mean over seeds, band = min-max, thin = each seed" if several else ""
    ax_val.set_title(f"validation AbsRel (★ = evaluated checkpoint{', per seed' if several else ''})", fontsize=10)
    ax_loss.set_title("training loss (0.5 SILog + 0.5 SSIM + aux)", fontsize=10)
    for ax in (ax_val, ax_loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_val.set_ylabel("AbsRel ↓")
    ax_loss.set_ylabel("loss")
    # One legend below both panels: inside, it sat on the curves.
    handles, labels = ax_val.get_legend_handles_labels()
    fig.suptitle((title or "Training curves") + spread, fontsize=12 if not several else 10)
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
               fontsize=9, frameon=False)
    return save_figure(fig, out_path)


def read_histories(evaluation: Evaluation) -> dict[str, dict[int, pd.DataFrame]]:
    """Each evaluated run's history.csv beside its checkpoint folder, variant -> {seed: history} (runs without one
    are left out: injected predictors, imported checkpoints)."""
    out: dict[str, dict[int, pd.DataFrame]] = {}
    for info in evaluation.checkpoints.values():
        path = Path(info["path"]).parent / HISTORY_NAME
        if path.is_file():
            out.setdefault(info["variant"], {})[info["seed"]] = pd.read_csv(path)
    return out


def representative_seeds(per_image: pd.DataFrame, metric: str = "abs_rel") -> dict[str, int]:
    """Per variant, the seed whose run's mean `metric` over the test images is nearest the variant's mean over
    seeds (the lower seed on a tie): the run a qualitative figure shows."""
    runs = per_image.groupby(["variant", "seed"], sort=False)[metric].mean()
    out = {}
    for variant, group in runs.groupby(level="variant", sort=False):
        distance = (group - group.mean()).abs().droplevel("variant")
        out[variant] = int(min(distance.index, key=lambda s: (distance[s], s)))
    return out


def write_figures(evaluation: Evaluation, cfg: Config, out_dir: str | Path) -> dict[str, Path]:
    """qualitative.png (when there are samples) and training_curves.png (when there are histories)."""
    out, p = Path(out_dir), evaluation.protocol
    per_image = evaluation.per_image
    variants = list(per_image["variant"].drop_duplicates())
    where = f"{p['config']} / {p['sweep']}, {p['dataset'].upper()} test"
    several = per_image.groupby("variant")["seed"].nunique().max() > 1
    paths = {}
    if evaluation.samples:
        shown = representative_seeds(per_image)
        label = {(c["variant"], c["seed"]): run for run, c in evaluation.checkpoints.items()}
        first = evaluation.samples[0].predictions

        def key(v: str) -> str:  # the shown run's label (injected predictors: "<v>/seed-<s>" or the variant)
            return label.get((v, shown[v])) or next(k for k in (f"{v}/seed-{shown[v]}", v) if k in first)

        samples = [dataclasses.replace(s, predictions={v: s.predictions[key(v)] for v in variants},
                                       metrics={v: s.metrics[key(v)] for v in variants if key(v) in s.metrics})
                   for s in evaluation.samples]
        lo, hi = shared_range(samples)
        which = ("; one run per variant: the seed nearest its mean test AbsRel ("
                 + ", ".join(f"{v} seed {shown[v]}" for v in variants) + ")") if several else ""
        paths["qualitative"] = qualitative_grid(
            samples, out / "qualitative.png", variants=variants, crop=p["crop"],
            title=f"SPACE-CLIP depth, {where}: input, ground truth and each variant "
                  f"(shared scale {lo:.1f}-{hi:.1f} m; dashed box = evaluation crop {p['crop']}){which}",
            depth_range=(lo, hi), seeds=shown if several else None)
    histories = read_histories(evaluation)
    if histories:
        selected = {c["variant"]: {} for c in evaluation.checkpoints.values()}
        for c in evaluation.checkpoints.values():
            selected[c["variant"]][c["seed"]] = c.get("epoch")
        paths["training_curves"] = training_curves(
            histories, out / "training_curves.png", selected=selected,
            title=f"Training curves, {p['config']} / {p['sweep']} (checkpoint: {p['checkpoint']})")
    return paths


# ---- failure cases ------------------------------------------------------------------------------------------------
def extreme_frames(per_image: pd.DataFrame, variant: str, seed: int, metric: str = "abs_rel") -> tuple[str, str]:
    """(best id, worst id) of one run: the frames with the lowest and the highest `metric` (the first on a tie)."""
    run = per_image[(per_image["variant"] == variant) & (per_image["seed"] == seed)].reset_index(drop=True)
    if run.empty:
        raise ValueError(f"no per-image rows for variant {variant!r} seed {seed}")
    return str(run.loc[run[metric].idxmin(), "id"]), str(run.loc[run[metric].idxmax(), "id"])


def relative_error(pred: np.ndarray, gt: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """|pred - GT| / GT where the GT is valid (in (lo, hi]), NaN elsewhere."""
    valid = valid_mask(gt, lo, hi)
    out = np.full(gt.shape, np.nan, np.float32)
    out[valid] = np.abs(pred[valid] - gt[valid]) / gt[valid]
    return out


def color_error(error: np.ndarray, radius: int | None) -> np.ndarray:
    """(H, W, 3) uint8: the error on the fixed [0, ERROR_MAX] scale, grey where there is no GT; sparse points
    dilated for display like the GT panel (`radius`)."""
    shown = error
    if radius:
        # dilate_sparse fills zeros: carry the error shifted by 1 so that an exact 0 stays a measurement
        shown = dilate_sparse(np.nan_to_num(error + 1.0, nan=0.0), radius)
        shown = np.where(shown > 0, shown - 1.0, np.nan)
    rgba = colormap(ERROR_CMAP)(np.clip(np.nan_to_num(shown, nan=0.0) / ERROR_MAX, 0.0, 1.0))
    rgba[np.isnan(shown), :3] = NO_GT_GREY
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def failure_grid(
    cases: dict[str, Example],
    out_path: str | Path,
    *,
    depth_range: tuple[float, float],
    crop: str = "none",
    gt_range: tuple[float, float] = (1e-3, np.inf),
    title: str = "",
    cmap: str = DEFAULT_COLORMAP,
) -> Path:
    """One row per run (label -> its chosen frame with that run's prediction and metrics): input | GT | prediction
    | error map, each row titled with the frame's AbsRel; one depth scale and one error scale, with colour bars."""
    if not cases:
        raise ValueError("no failure cases to draw")
    lo, hi = depth_range
    first = next(iter(cases.values()))
    h, w = first.gt.shape
    panel_h_in = PANEL_WIDTH_IN * h / w
    fig, axes = plt.subplots(len(cases), 4, figsize=(4 * PANEL_WIDTH_IN + 2.4, len(cases) * (panel_h_in + 0.45) + 0.6),
                             dpi=DPI, squeeze=False, layout="constrained")
    display_px = PANEL_WIDTH_IN * DPI
    for row, (label, case) in zip(axes, cases.items()):
        gt = case.gt
        pred = case.predictions[label]
        m = case.metrics[label]
        sparse = has_depth(gt).mean() < SPARSE_FRACTION
        radius = max(1, int(round(0.75 * gt.shape[1] / display_px))) if sparse else None
        with Image.open(case.image_path) as image:
            rgb = np.asarray(image.convert("RGB"))
        error = relative_error(pred, gt, *gt_range)  # where the metrics count a GT pixel (before the crop)
        panels = [rgb, colorize(dilate_sparse(gt, radius) if radius else gt, cmap, (lo, hi))[0],
                  colorize(pred, cmap, (lo, hi))[0], color_error(error, radius)]
        corners = [case.id if len(case.id) <= 40 else "…" + case.id[-39:],
                   f"{int(has_depth(gt).sum())} px with depth",
                   f"AbsRel {m['abs_rel']:.3f}   δ1 {m['d1']:.3f}", f"AbsRel {m['abs_rel']:.3f} (mean over the crop)"]
        for ax, image, corner in zip(row, panels, corners):
            _panel(ax, image, corner)
        box = crop_box(gt.shape, crop)
        if box is not None:
            top, left, bh, bw = box
            for ax, color in ((row[1], "white"), (row[3], "deepskyblue")):  # visible on either colour map
                ax.add_patch(Rectangle((left - 0.5, top - 0.5), bw, bh, fill=False, edgecolor=color,
                                       linestyle="--", linewidth=1.0))
        variant = label.split("/")[0]
        name = (variant_label(variant) if variant in VARIANTS else variant) + (
            f"\nseed {label.split('seed-')[1]}" if "/seed-" in label else "")
        row[0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center", labelpad=6)
        row[2].set_title(f"{label}: AbsRel {m['abs_rel']:.3f}", fontsize=9, pad=3)
    for ax, name in zip(axes[0], ("input", "ground truth", None, "|pred − GT| / GT")):
        if name:
            ax.set_title(name, fontsize=9, pad=3)
    depth_colorbar(fig, axes[:, :3], lo, hi, cmap, "depth (m), one scale; black = no ground truth")
    error_bar = fig.colorbar(plt.cm.ScalarMappable(norm=Normalize(0.0, ERROR_MAX), cmap=colormap(ERROR_CMAP)),
                             ax=axes[:, 3], fraction=0.05, pad=0.02, aspect=35, extend="max")
    error_bar.set_label(f"relative error, 0 to {ERROR_MAX:.0%} and above; grey = no ground truth", fontsize=9)
    fig.suptitle(title or "Failure cases", fontsize=11)
    return save_figure(fig, out_path)


def write_failure_cases(
    ctx, evaluation: Evaluation, out_dir: str | Path, predictors: dict[str, Predictor] | None = None,
) -> dict[str, Path]:
    """qualitative_best.png, qualitative_worst.png and failure_cases.csv (the frames and their metrics): per variant
    (its representative seed), the frames with the lowest and the highest AbsRel in per_image.csv, predicted again
    (`pipeline.evaluate.predict_examples`).
    `predictors`: run label -> predictor (default: the evaluated checkpoints)."""
    from pipeline.evaluate import decoder_predictor, predict_examples
    from pipeline.layout import RunContext, resolve_device
    from spaceclip.decoder import SpaceClipDecoder

    ctx = RunContext.of(ctx)
    per_image, p = evaluation.per_image, evaluation.protocol
    shown = representative_seeds(per_image)
    label = {(c["variant"], c["seed"]): run for run, c in evaluation.checkpoints.items()}
    runs = {v: label.get((v, s), f"{v}/seed-{s}" if ctx.cfg.train.multi_seed else v) for v, s in shown.items()}
    if predictors is None:
        device = resolve_device(ctx.cfg.train.device)
        predictors = {runs[v]: decoder_predictor(SpaceClipDecoder.from_pretrained(
            evaluation.checkpoints[runs[v]]["path"]), device) for v in shown}
    picks = {v: extreme_frames(per_image, v, s) for v, s in shown.items()}
    examples = predict_examples(ctx, {runs[v]: predictors[runs[v]] for v in shown},
                                {runs[v]: list(picks[v]) for v in shown})
    cases = {which: {runs[v]: examples[runs[v]][k] for v in shown} for k, which in enumerate(("best", "worst"))}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"which": which, "variant": v, "seed": shown[v], "id": by_run[runs[v]].id,
                   **by_run[runs[v]].metrics[runs[v]]} for which, by_run in cases.items() for v in shown]
                 ).to_csv(Path(out_dir) / "failure_cases.csv", index=False)
    lo, hi = shared_range([c for by_run in cases.values() for c in by_run.values()])
    where = f"{p['config']} / {p['sweep']}, {p['dataset'].upper()} test"
    paths = {"failure_cases": Path(out_dir) / "failure_cases.csv"}
    for which, by_run in cases.items():
        paths[f"qualitative_{which}"] = failure_grid(
            by_run, Path(out_dir) / f"qualitative_{which}.png", depth_range=(lo, hi), crop=p["crop"],
            gt_range=tuple(p["depth_range"]),
            title=f"{which.capitalize()} test frame of each variant by AbsRel, {where} (alignment "
                  f"{p['alignment']}; dashed box = evaluation crop {p['crop']}; error map = |pred − GT| / GT)")
    return paths
