"""Statistics of a sweep over seeds: each variant's mean and spread over its seeds, and a 95 % interval of the
difference between two variants that counts both sources of noise in an ablation table.

    per_image: one row per (variant, seed, test image) with the metric columns (`Evaluation.per_image`)

    describe(per_image, metrics)            ->  variant, n (seeds), seeds, <metric>_mean, <metric>_sd
    compare(per_image, "full", "baseline", "abs_rel")  ->  Comparison: the difference of the means, its interval
    pairwise(per_image, variants, metrics)  ->  one row per (metric, pair of variants): pairwise.csv

The model behind the interval. A variant's score is the mean over its seeds of the mean over the test images,
M_v = mean_s mean_i X[v, s, i], and the difference D = M_a - M_b varies for two reasons:
  * training noise: another seed gives another decoder. Estimated from the spread of the per-seed means
    m[v, s] = mean_i X[v, s, i]: var(m_a) / n_a + var(m_b) / n_b (sample variances, n - 1 degrees of freedom each;
    seeds are not paired across variants: seed s of two different decoders are two unrelated initialisations);
  * test-set noise: another test set of the same size gives other images. Every variant sees the same images, so
    this is measured on the paired per-image differences d_i = mean_s X[a, s, i] - mean_s X[b, s, i]: var(d) / N.
    What the images share (an image hard for every variant) cancels in d_i, which is why pairing matters.
SE^2 = var(m_a)/n_a + var(m_b)/n_b + var(d)/N, and the interval is D +- t * SE with t the Student quantile at the
Welch-Satterthwaite degrees of freedom of the three terms (scipy.stats.t). The seed x image part of the noise is
in both the first two terms and the third, so the interval is slightly conservative, never anti-conservative.

Why not a two-level bootstrap (seeds resampled within each variant, images resampled jointly across variants):
with the 3-5 seeds an ablation can afford, resampling 3 values with replacement reaches only 10 distinct means,
shrinks their variance by (n - 1) / n and has no small-sample quantile, so its 95 % interval calls two identical
variants different far more often than 5 % of the time (tests/test_stats.py measures both on synthetic draws). The
t interval is calibrated at that n; its test-set term is the paired resampling-free estimate of what a paired
bootstrap of the images would estimate. With one seed a variant has no estimate of training noise, so no interval
is given (and no +-): a single run cannot say whether a difference is more than seed noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
HIGHER_IS_BETTER = {"d1", "d2", "d3"}


def seed_means(per_image: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (variant, seed): the mean over its images (the summary.csv row of that run)."""
    return per_image.groupby(["variant", "seed"], sort=False)[list(metrics)].mean().reset_index()


def describe(per_image: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per variant (in order of appearance): n (seeds), the seeds, and each metric's mean over seeds and sample
    standard deviation over seeds (NaN with one seed)."""
    runs = seed_means(per_image, metrics)
    rows = []
    for variant, group in runs.groupby("variant", sort=False):
        row = {"variant": variant, "n": len(group), "seeds": [int(s) for s in group["seed"]]}
        for m in metrics:
            values = group[m].to_numpy(dtype=float)
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class Comparison:
    """`a` against `b` on one metric: diff = mean_a - mean_b and its interval [low, high] (NaN without one)."""

    metric: str
    a: str
    b: str
    n_a: int
    n_b: int
    n_images: int
    mean_a: float
    mean_b: float
    diff: float
    se: float
    df: float
    low: float
    high: float
    significant: bool  # the interval excludes zero
    better: str  # the significantly better of a and b, "" when neither is
    seeds_compared: int  # seeds both variants were trained with
    a_better_seeds: int  # of those, seeds where a's run beats b's run with the same seed
    b_better_seeds: int
    tied_seeds: int

    def as_row(self) -> dict:
        return asdict(self)


def _welch_df(terms: Sequence[tuple[float, int]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance terms (term, its degrees of freedom)."""
    total = sum(t for t, _ in terms)
    denom = sum(t * t / df for t, df in terms if df > 0 and t > 0)
    return total * total / denom if denom > 0 else float("inf")


def compare(per_image: pd.DataFrame, a: str, b: str, metric: str, confidence: float = CONFIDENCE) -> Comparison:
    """The difference of `a` and `b` on `metric`, with its interval (module docstring); no interval (NaN, not
    significant) when either variant has a single seed."""
    rows_a, rows_b = per_image[per_image["variant"] == a], per_image[per_image["variant"] == b]
    m_a = rows_a.groupby("seed")[metric].mean()  # seed -> mean over images
    m_b = rows_b.groupby("seed")[metric].mean()
    n_a, n_b = len(m_a), len(m_b)
    if not n_a or not n_b:
        raise ValueError(f"no evaluated run of {a if not n_a else b!r} to compare")
    mean_a, mean_b = float(m_a.mean()), float(m_b.mean())
    diff = mean_a - mean_b
    # paired images: each variant's seed-averaged score per image, on the images both have
    per_a, per_b = rows_a.groupby("id")[metric].mean(), rows_b.groupby("id")[metric].mean()
    ids = per_a.index.intersection(per_b.index)
    d = (per_a[ids] - per_b[ids]).to_numpy(dtype=float)

    common = m_a.index.intersection(m_b.index)
    sign = np.sign(m_a[common].to_numpy() - m_b[common].to_numpy()) * (1 if metric in HIGHER_IS_BETTER else -1)
    seeds = dict(seeds_compared=len(common), a_better_seeds=int((sign > 0).sum()),
                 b_better_seeds=int((sign < 0).sum()), tied_seeds=int((sign == 0).sum()))

    nan = float("nan")
    if n_a < 2 or n_b < 2 or len(d) < 2:
        return Comparison(metric, a, b, n_a, n_b, len(d), mean_a, mean_b, diff, nan, nan, nan, nan, False, "",
                          **seeds)
    terms = [(float(m_a.var(ddof=1)) / n_a, n_a - 1), (float(m_b.var(ddof=1)) / n_b, n_b - 1),
             (float(d.var(ddof=1)) / len(d), len(d) - 1)]
    se = math.sqrt(sum(t for t, _ in terms))
    df = _welch_df(terms)
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * se if se > 0 else 0.0
    low, high = diff - half, diff + half
    significant = bool(low > 0 or high < 0)
    a_better = (diff > 0) == (metric in HIGHER_IS_BETTER)
    return Comparison(metric, a, b, n_a, n_b, len(d), mean_a, mean_b, diff, se, df, low, high, significant,
                      (a if a_better else b) if significant else "", **seeds)


def pairwise(per_image: pd.DataFrame, variants: Sequence[str], metrics: Sequence[str],
             confidence: float = CONFIDENCE) -> pd.DataFrame:
    """`compare` for every pair of variants (a before b in `variants`' order) and every metric: pairwise.csv."""
    rows = [compare(per_image, a, b, m, confidence).as_row() for m in metrics for a, b in combinations(variants, 2)]
    columns = list(Comparison.__dataclass_fields__)
    return pd.DataFrame(rows, columns=columns)


def best_variant(per_image: pd.DataFrame, variants: Sequence[str], metric: str,
                 confidence: float = CONFIDENCE) -> str | None:
    """The variant with the best mean on `metric`, but only when it is significantly better than the runner-up
    (and so than every other); None otherwise (a tie, one seed, or an interval that includes zero)."""
    if len(variants) < 2:
        return None
    means = per_image.groupby(["variant", "seed"])[metric].mean().groupby("variant").mean()
    order = sorted(variants, key=lambda v: means[v], reverse=metric in HIGHER_IS_BETTER)
    first, second = order[0], order[1]
    if means[first] == means[second]:
        return None
    return first if compare(per_image, first, second, metric, confidence).better == first else None
