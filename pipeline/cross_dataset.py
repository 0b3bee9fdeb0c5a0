"""Cross-dataset evaluation: the decoders trained on one dataset, evaluated on other datasets' test splits.

    config_for_test_set(cfg, "demo-nyu")          -> the config that evaluates cfg's decoders on demo-nyu's test split
    cross_dataset(ctx, evaluation)            -> one row per (test set, alignment, variant, seed): the protocol used
                                                 and the metrics (`eval.test_sets`; the diagonal is `evaluation`)
    write_cross_dataset(table, out_dir)       -> results/<sweep>/cross_dataset.{csv,md}
    python -m pipeline.cross_dataset A.csv B.csv [-o out.md]  -> one train x test matrix of several sweeps

Each test set is evaluated with ITS protocol: its dataset's files and split (`data` of its config), its crop
(`eval.crop` of its config, else the layout's: garg for KITTI, nyu for NYU) and its depth range (`data.depth_range`:
(1e-3, 80] KITTI, (1e-3, 10] NYU). Its test store is extracted with the training config's encoder and cache settings
(the decoders read that encoder's features), by `pipeline.extract.extract_splits` for the test split only, and is
reused by its fingerprint like any store.

Alignment: a decoder trained on street scenes up to 80 m predicts metres of that world; on indoor scenes its scale
is off by an unknown factor. Zero-shot transfer is therefore scored after a per-image alignment to the ground
truth (`eval.transfer_alignment`: `median`, the per-image median ratio, the classic monocular protocol, by
default; `lstsq`, least-squares scale and shift, the relative-depth protocol; `none`, raw metres). The training
set's own column is given twice: as the ordinary evaluation (its own `eval.alignment`) and under the transfer
alignment, so that every off-diagonal cell has a diagonal cell scored the same way beside it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from pipeline.config import Config, ConfigError, load_config
from pipeline.evaluate import Evaluation, Predictor, evaluate_run, resolve_crop
from pipeline.layout import RunContext
from spaceclip.metrics import METRIC_KEYS

log = logging.getLogger(__name__)

OWN = "own protocol"  # the ordinary evaluation's row: its own eval.alignment
COLUMNS = ["train", "train_dataset", "test", "test_dataset", "alignment", "crop", "min_depth", "max_depth",
           "variant", "seed", "n_images", *METRIC_KEYS, "test_cache"]


def config_for_test_set(cfg: Config, test_set: str) -> Config:
    """`cfg` (its encoder, cache and eval settings) on the test split of `test_set` (a config name or path: its
    `data`, `views` and eval crop), aligned with `eval.transfer_alignment`."""
    try:
        other = load_config(test_set)
    except ConfigError as err:
        raise ConfigError(f"eval.test_sets entry {test_set!r}: {err}") from None
    ev = cfg.eval.model_copy(update={"crop": other.eval.crop, "alignment": cfg.eval.transfer_alignment,
                                     "median_scaling": False, "gt_resolution": "native", "test_sets": []})
    out = cfg.model_copy(update={"data": other.data, "views": other.views, "eval": ev})
    resolve_crop(out)  # a crop that does not fit the other layout fails here, before any extraction
    return out


def extract_test_split(cfg: Config) -> None:
    """The test store of `cfg` (rendered first when its dataset is synthetic), extracted once, reused after."""
    from pipeline.extract import extract_splits

    extract_splits(cfg, ["test"])


def rows_of(evaluation: Evaluation, train: Config, test: str, alignment: str) -> list[dict]:
    p = evaluation.protocol
    lo, hi = p["depth_range"]
    return [{"train": train.name, "train_dataset": train.data.layout, "test": test, "test_dataset": p["dataset"],
             "alignment": alignment, "crop": p["crop"], "min_depth": lo, "max_depth": hi, "variant": r["variant"],
             "seed": r["seed"], "n_images": r["n_images"], **{k: r[k] for k in METRIC_KEYS},
             "test_cache": p["test_cache"]}
            for r in evaluation.summary().to_dict("records")]


def cross_dataset(
    ctx: RunContext | Config,
    evaluation: Evaluation,
    *,
    test_sets: Sequence[str] | None = None,
    predictors: dict | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The train x test table of this config's decoders: `evaluation` (the ordinary one) as its own column, the
    same test split under the transfer alignment, and every test set of `eval.test_sets` with its protocol.
    `predictors` ((variant, seed) -> predictor) default to the evaluated checkpoints (`evaluation.checkpoints`)."""
    ctx = RunContext.of(ctx)
    cfg = ctx.cfg
    # the training set's own split is always the first column; naming it again would only repeat it
    test_sets = [t for t in dict.fromkeys(cfg.eval.test_sets if test_sets is None else test_sets) if t != cfg.name]
    if predictors is None:
        predictors = checkpoint_predictors(evaluation, cfg)
    rows = rows_of(evaluation, cfg, cfg.name, OWN)
    transfer = cfg.eval.transfer_alignment
    configs = [(cfg.name, cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "alignment": transfer, "median_scaling": False})}))]
    configs += [(name, config_for_test_set(cfg, name)) for name in test_sets]
    for name, other in configs:
        if name != cfg.name:
            extract_test_split(other)
        log.info("cross-dataset: decoders of %s on the %s test split of %s (crop %s, range %s, alignment %s)",
                 cfg.name, other.data.layout, name, other.eval_crop, other.data.depth_range, transfer)
        result = evaluate_run(RunContext(other, ctx.encoder_identity), predictors=predictors, progress=progress)
        rows += rows_of(result, cfg, name, transfer)
    return pd.DataFrame(rows, columns=COLUMNS)


def checkpoint_predictors(evaluation: Evaluation, cfg: Config) -> dict[tuple[str, int], Predictor]:
    """(variant, seed) -> the evaluated checkpoint's decoder, on the evaluation device."""
    from pipeline.evaluate import decoder_predictor
    from pipeline.layout import resolve_device
    from spaceclip.decoder import SpaceClipDecoder

    device = resolve_device(cfg.train.device)
    return {(c["variant"], c["seed"]): decoder_predictor(SpaceClipDecoder.from_pretrained(c["path"]), device)
            for c in evaluation.checkpoints.values()}


# ---- the table ----------------------------------------------------------------------------------------------------
def test_label(group: pd.DataFrame) -> str:
    r = group.iloc[0]
    depth = f"({r['min_depth']:g}, {r['max_depth']:g}] m"
    return f"{r['test']} ({r['test_dataset'].upper()} test, crop {r['crop']}, {depth})"


def cross_dataset_markdown(table: pd.DataFrame, metrics: Sequence[str] = ("abs_rel", "d1")) -> str:
    """Rows: (train set, variant, alignment); columns: test sets; cells: each metric's mean over seeds (n seeds in
    brackets when several)."""
    columns = {test: test_label(g) for test, g in table.groupby("test", sort=False)}
    order = list(dict.fromkeys(table["train"])) + [t for t in columns if t not in set(table["train"])]
    tests = [t for t in order if t in columns]
    out = []
    for metric in metrics:
        arrow = "↑" if metric.startswith("d") else "↓"
        out += [f"## {metric} {arrow}", "", "| train | variant | alignment | " + " | ".join(columns[t] for t in tests)
                + " |", "|---|---|---|" + "---:|" * len(tests)]
        means = table.groupby(["train", "variant", "alignment", "test"], sort=False)[metric].agg(["mean", "count"])
        keys = list(dict.fromkeys((r["train"], r["variant"], r["alignment"]) for r in table.to_dict("records")))
        for train, variant, alignment in keys:
            cells = []
            for test in tests:
                key = (train, variant, alignment, test)
                if key not in means.index:
                    cells.append("—")
                    continue
                m, n = means.loc[key]
                cells.append(f"{m:.4f}" + (f" (n={int(n)})" if n > 1 else "") + (" ◆" if test == train else ""))
            out.append(f"| {train} | {variant} | {alignment} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["◆ = the training set's own test split (the diagonal). `own protocol`: the ordinary evaluation, with "
            "the training config's eval.alignment; the other rows align every prediction per image before the "
            "metrics (`median`: scaled by the ratio of the valid pixels' medians; `lstsq`: least-squares scale and "
            "shift). Each column is scored with its test set's crop and depth range; n = seeds averaged."]
    return "\n".join(out) + "\n"


def write_cross_dataset(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "cross_dataset.csv", index=False)
    (out / "cross_dataset.md").write_text("# Cross-dataset evaluation\n\n" + cross_dataset_markdown(table))
    return {"cross_dataset_csv": out / "cross_dataset.csv", "cross_dataset_md": out / "cross_dataset.md"}


def combine(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Several sweeps' cross_dataset.csv as one table (a full train x test matrix when each trained on one set and
    tested on the others)."""
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cross_dataset",
                                     description="one train x test matrix from several sweeps' cross_dataset.csv")
    parser.add_argument("csv", nargs="+")
    parser.add_argument("-o", "--out", help="write the Markdown here (default: print it)")
    args = parser.parse_args(argv)
    missing = [p for p in args.csv if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {missing[0]} (run `spaceclip evaluate` with eval.test_sets first)")
    text = "# Cross-dataset evaluation\n\n" + cross_dataset_markdown(combine(args.csv))
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
