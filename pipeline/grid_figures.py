"""grid.png: the main metric of a grid (test AbsRel) against its varied keys, with intervals.

    one varied key    the metric against the key's values, a line per variant, each point the mean over seeds with
                      its 95 % interval (mean +- t(n-1) sd / sqrt(n): seed-to-seed noise; none with one seed)
    two varied keys   a heatmap per variant (rows: the first key, columns: the second), each cell "mean +- half-width"
    more              against the first varied key, a line per variant and combination of the others

Drawn from `pipeline.tables.grid_stats` (the numbers of grid.md / grid.csv), so the figure and the table agree.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats as sps  # noqa: E402

from pipeline.figures import variant_colors  # noqa: E402
from pipeline.stats import CONFIDENCE  # noqa: E402

METRIC, METRIC_NAME = "abs_rel", "test AbsRel ↓"


def half_width(sd: float, n: int) -> float:
    """Half the 95 % interval of a mean over n seeds (Student t); NaN with one seed."""
    if n < 2 or sd != sd:
        return float("nan")
    return float(sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / np.sqrt(n)


def varied_keys(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    return [k for k in keys if frame[k].nunique() > 1]


def write_grid_figure(frame: pd.DataFrame, keys: list[str], out_dir: str | Path, title: str = "") -> Path:
    """grid.png in `out_dir` from `grid_stats` rows (`keys`: the grid's keys in table order)."""
    frame = frame.assign(half=[half_width(sd, n) for sd, n in zip(frame[f"{METRIC}_sd"], frame["n"])])
    varied = varied_keys(frame, keys) or keys[:1]
    variants = list(dict.fromkeys(frame["variant"]))
    colors = variant_colors(variants)
    path = Path(out_dir) / "grid.png"
    if len(varied) == 2:
        rows, cols = (list(dict.fromkeys(frame[k])) for k in varied)
        fig, axes = plt.subplots(1, len(variants), figsize=(1.6 + 1.9 * len(cols) * len(variants),
                                                            1.2 + 0.9 * len(rows)), squeeze=False)
        values = frame[f"{METRIC}_mean"]
        lo, hi = float(values.min()), float(values.max())
        for ax, variant in zip(axes[0], variants):
            sub = frame[frame["variant"] == variant]
            grid = np.full((len(rows), len(cols)), np.nan)
            for r in sub.to_dict("records"):
                i, j = rows.index(r[varied[0]]), cols.index(r[varied[1]])
                grid[i, j] = r[f"{METRIC}_mean"]
                text = f"{r[f'{METRIC}_mean']:.3f}" + (f"\n± {r['half']:.3f}" if r["half"] == r["half"] else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
            image = ax.imshow(grid, cmap="viridis_r", vmin=lo, vmax=hi if hi > lo else lo + 1e-9, aspect="auto")
            ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right", fontsize=8)
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_xlabel(varied[1])
            ax.set_ylabel(varied[0])
            ax.set_title(variant)
        fig.colorbar(image, ax=list(axes[0]), label=f"{METRIC_NAME} (mean over seeds)")
    else:
        x_key, others = varied[0], varied[1:]
        xs = list(dict.fromkeys(frame[x_key]))
        # A line between points says the axis is continuous: only for numbers (lr, epochs), not for categories
        # (encoders, layer lists), whose points are drawn apart.
        numeric = all(_is_number(v) for v in xs)
        fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(xs) + 2.5), 3.6))
        series = frame.groupby(["variant", *others], sort=False) if others else frame.groupby("variant", sort=False)
        styles = ["-", "--", ":", "-."]
        n_series = max(1, len(series))
        for s, (name, sub) in enumerate(series):
            variant = name[0] if isinstance(name, tuple) else name
            label = variant + ("".join(f", {k}={v}" for k, v in zip(others, name[1:])) if others else "")
            pos = np.array([xs.index(v) for v in sub[x_key]], float) + 0.08 * (s - (n_series - 1) / 2)
            half = sub["half"].to_numpy(float)
            ax.errorbar(pos, sub[f"{METRIC}_mean"], yerr=np.where(np.isnan(half), 0, half), capsize=4, marker="o",
                        color=colors[variant], label=label,
                        linestyle=styles[(s // len(variants)) % len(styles)] if numeric else "none")
        ax.set_xticks(range(len(xs)), xs, rotation=15, ha="right", fontsize=8)
        ax.set_xlabel(x_key)
        ax.set_ylabel(METRIC_NAME)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n = sorted(set(frame["n"]))
    fig.suptitle((title + "\n" if title else "") + f"mean over seeds (n = {', '.join(map(str, n))}); bars: 95 % "
                 "interval of the mean over seeds (none with n = 1)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _is_number(value) -> bool:
    """Whether a grid value (as the grid table writes it: text) is a number."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return str(value).strip().lower() not in ("true", "false", "nan")
