"""`evaluate`: full-image metrics of the trained decoder variants on the test split, then tables and pictures.

    preflight (variants, crop, test cache, checkpoints, test sets) ──► evaluate test split ──► tables ──► figures
        ──► failure cases (eval.failure_cases) ──► efficiency (eval.efficiency)
        ──► other test sets (eval.test_sets)
        └──► results/<sweep>/{table.md, table.tex, summary.csv, per_image.csv, pairwise.csv, skipped.csv,
                              protocol.json, qualitative.png, training_curves.png, qualitative_best.png,
                              qualitative_worst.png, efficiency.{md,csv}, cross_dataset.{md,csv}}, and the table as
                              Prefect artifacts

With several `train.seeds` every (variant, seed) run is evaluated (task "evaluate test split: 4 variants x 3
seeds"); a missing or unfinished run fails the preflight unless `eval.allow_partial` is set.

A grid (pipeline/grid.py): every point preflighted, then evaluated into results/<sweep>/<point>/, then the grid's
table (grid.md, grid.csv, summary.csv: a column per key) and grid.png in results/<sweep>/.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from flows.parameters import fail_run_on_user_error, run_config
from pipeline.config import Config
from pipeline.cross_dataset import config_for_test_set, cross_dataset, write_cross_dataset
from pipeline.efficiency import evaluated_decoders, measure_efficiency, write_efficiency
from pipeline.evaluate import Evaluation, evaluate_run, preflight
from pipeline.figures import write_failure_cases, write_figures
from pipeline.grid import contexts, points
from pipeline.grid_figures import write_grid_figure
from pipeline.layout import RunContext, results_dir
from pipeline.tables import artifact_rows, protocol_line, grid_stats, write_grid_tables, write_tables


def _evaluate_name() -> str:
    tc, point = task_run.parameters["ctx"].cfg.train, task_run.parameters.get("point", "")
    return ("evaluate test split" + (f": {len(tc.variants)} variants x {len(tc.seed_list)} seeds" if tc.multi_seed
                                     else "") + (f" @ {point}" if point else ""))


@task(cache_policy=NO_CACHE, task_run_name=_evaluate_name)
def evaluate_task(ctx: RunContext, progress: bool, point: str = "") -> Evaluation:
    logger = get_run_logger()

    def log_variant(variant: str, m: dict) -> None:
        logger.info("%s: AbsRel %.4f, SqRel %.4f, RMSE %.3f, RMSE log %.4f, d1 %.4f, d2 %.4f, d3 %.4f (%d images)",
                    variant, m["abs_rel"], m["sq_rel"], m["rmse"], m["rmse_log"], m["d1"], m["d2"], m["d3"],
                    m["n_images"])

    evaluation = evaluate_run(ctx, progress=progress, on_variant=log_variant)
    c = evaluation.counts
    logger.info("evaluated %d of %d test lines (%d GT None, %d unreadable, %d without valid GT) in %.1f s",
                c["evaluated"], c["lines"], c["gt_none"], c["unreadable"], c["no_valid_pixels"],
                evaluation.protocol["seconds"])
    return evaluation


@task(cache_policy=NO_CACHE)
def write_tables_task(evaluation: Evaluation, out_dir: str) -> dict[str, str]:
    return {name: str(path) for name, path in write_tables(evaluation, out_dir).items()}


@task(cache_policy=NO_CACHE)
def draw_figures_task(evaluation: Evaluation, cfg: Config, out_dir: str) -> dict[str, str]:
    return {name: str(path) for name, path in write_figures(evaluation, cfg, out_dir).items()}


@task(cache_policy=NO_CACHE)
def failure_cases_task(ctx: RunContext, evaluation: Evaluation, out_dir: str) -> dict[str, str]:
    return {name: str(path) for name, path in write_failure_cases(ctx, evaluation, out_dir).items()}


@task(cache_policy=NO_CACHE)
def efficiency_task(ctx: RunContext, evaluation: Evaluation, out_dir: str) -> dict[str, str]:
    table = measure_efficiency(ctx.cfg, evaluated_decoders(evaluation, ctx.cfg, ctx.encoder_identity["width"]))
    return {name: str(path) for name, path in write_efficiency(table, out_dir).items()}


@task(cache_policy=NO_CACHE, name="evaluate on other test sets")
def cross_dataset_task(ctx: RunContext, evaluation: Evaluation, out_dir: str, progress: bool) -> dict[str, str]:
    table = cross_dataset(ctx, evaluation, progress=progress)
    return {name: str(path) for name, path in write_cross_dataset(table, out_dir).items()}


def publish_artifacts(cfg: Config, evaluation: Evaluation, table_md: str) -> None:
    """The table in the Prefect UI: the summary as a table artifact, the paper-style table as Markdown."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"spaceclip-{cfg.name}-{cfg.sweep}".lower()).strip("-")
    line = protocol_line(evaluation.protocol)
    create_table_artifact(table=artifact_rows(evaluation), key=f"{key}-summary", description=line)
    create_markdown_artifact(markdown=table_md, key=f"{key}-table", description=line)


@flow(name="evaluate")
@fail_run_on_user_error
def evaluate(
    config: str = "demo",
    overrides: list[str] | None = None,
    sweep: str | None = None,
    variants: list[str] | None = None,
    cache_root: str | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """Returns {"results": folder, "table_md": ..., "table_tex": ..., "summary": ..., "per_image": ..., "pairwise": ...,
    "qualitative": ..., "training_curves": ..., "qualitative_best": ..., "qualitative_worst": ...,
    "efficiency_md": ..., "efficiency_csv": ..., "cross_dataset_md": ..., "cross_dataset_csv": ...}: paths of what
    was written (a grid: its table, summary and grid.png)."""
    cfg = run_config(config, overrides, sweep, variants=variants, cache_root=cache_root)
    grid_points = points(cfg)
    if grid_points[0].label:
        return evaluate_grid(cfg, grid_points, progress)
    ctx = RunContext.of(cfg)
    preflight(ctx)  # a bad crop, cache or checkpoint fails here, in one line
    for name in ctx.cfg.eval.test_sets:  # so does an unknown test set or a crop that does not fit it
        config_for_test_set(ctx.cfg, name)
    out_dir = str(ctx.results_dir)
    evaluation = evaluate_task(ctx, progress)
    paths = {"results": out_dir, **write_tables_task(evaluation, out_dir),
             **draw_figures_task(evaluation, ctx.cfg, out_dir)}
    if ctx.cfg.eval.failure_cases and ctx.cfg.eval.qualitative > 0:
        paths |= failure_cases_task(ctx, evaluation, out_dir)
    if ctx.cfg.eval.efficiency:
        paths |= efficiency_task(ctx, evaluation, out_dir)
    if ctx.cfg.eval.test_sets:
        paths |= cross_dataset_task(ctx, evaluation, out_dir, progress)
    publish_artifacts(ctx.cfg, evaluation, Path(paths["table_md"]).read_text())
    get_run_logger().info("results in %s: %s", out_dir, ", ".join(sorted(k for k in paths if k != "results")))
    return paths



def evaluate_grid(cfg: Config, grid_points: list, progress: bool) -> dict[str, str]:
    """Every point of a grid evaluated (all preflighted first), its own tables and figures in
    results/<sweep>/<point>/; then the grid's table (grid.md, grid.csv, summary.csv) and grid.png in
    results/<sweep>/."""
    ctxs = contexts(grid_points)
    for ctx in ctxs:
        preflight(ctx)
    results = []
    for p, ctx in zip(grid_points, ctxs):
        evaluation = evaluate_task(ctx, progress, p.label)
        write_tables_task(evaluation, str(ctx.results_dir))
        draw_figures_task(evaluation, ctx.cfg, str(ctx.results_dir))
        results.append((p, evaluation))
    out_dir = results_dir(cfg)
    paths = {"results": str(out_dir), **{k: str(v) for k, v in write_grid_tables(results, out_dir).items()}}
    paths["grid_png"] = str(write_grid_figure(grid_stats(results), list(grid_points[0].values), out_dir,
                                              f"{cfg.name} / {cfg.sweep}"))
    table_md = Path(paths["table_md"]).read_text()
    publish_artifacts(cfg, results[0][1], table_md)
    get_run_logger().info("grid results in %s: %s", out_dir, ", ".join(sorted(k for k in paths if k != "results")))
    return paths
