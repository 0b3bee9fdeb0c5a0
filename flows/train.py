"""`train-decoders`: train decoder ablations from one feature cache.

    fingerprint guard (train + val stores match the config) ──► train <variants> x <seeds>: one task per pass
                                                           └──► runs/<sweep>/<variant>[/seed-<s>]/{last,best,history.csv}

A task trains one pass (`pipeline.train.pass_plan`) of one seed: one variant, or with `train.shared_pass` a group
of variants that step on every batch read once (on GPUs by default one group per GPU); each seed of `train.seeds`
has its own passes, named "train <variants> seed <s>". Passes run `train.parallel` at a time
(`pipeline.train.parallel_plan`: on a CPU one per usable core, on GPUs one per GPU): one at a time in the flow's
process, several at once in the processes of a local Dask cluster (`train-parallel`), each with its share of the
cores and its own GPU (`pipeline.devices.local_cluster`), or on the workers of an existing scheduler
(`dask.address`). A run's result depends on its seed and its thread count only, not on what trains beside it,
in its pass, or on which worker.

A grid (pipeline/grid.py) trains every point's runs with one plan: its passes are those of each point's sweep
alone (points never share a pass), named "train <variants> seed <s> @ <point>", into
runs/<sweep>/<point>/<variant>[/seed-<s>]/, spread over the same workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import task_run
from prefect_dask import DaskTaskRunner
from tqdm.auto import tqdm

from flows.parameters import check_scheduler, fail_run_on_user_error, run_config
from pipeline.devices import local_cluster, plan_on_scheduler, plan_workers
from pipeline.layout import RunContext
from pipeline.grid import contexts, describe, points, run_key
from pipeline.train import (HISTORY_NAME, check_cache, parallel_plan, pass_plan, read_history, run_label,
                            scores_text, seed_runs, train_variants)


def pass_name(tc, runs: list[tuple[str, int]], point: str = "") -> str:
    """"train baseline+full", " seed <s>" when the sweep has several seeds (a pass trains one seed's runs), and
    " @ <grid point>" for a point of a grid."""
    seeds = sorted({s for _, s in runs})
    return ("train " + "+".join(v for v, _ in runs) + (f" seed {seeds[0]}" if tc.multi_seed else "")
            + (f" @ {point}" if point else ""))


def _pass_name() -> str:
    params = task_run.parameters
    return pass_name(params["ctx"].cfg.train, params["runs"], params.get("point", ""))


@task(cache_policy=NO_CACHE, task_run_name=_pass_name)
def train_pass_task(ctx: RunContext, runs: list[tuple[str, int]], resume: bool, progress: bool,
                    point: str = "") -> dict[str, str]:
    """One pass: the runs of one seed (of one grid point). Returns {run label: run folder}."""
    logger = get_run_logger()
    tc = ctx.cfg.train
    (seed,) = {s for _, s in runs}
    variants = [v for v, _ in runs]
    name = lambda v: f"{point}/{run_label(tc, v, seed)}" if point else run_label(tc, v, seed)  # noqa: E731

    def log_epoch(variant: str, row: dict) -> None:
        logger.info("%s epoch %d: train loss %.4f, %s, lr %.2e, %.1f s, %.1f img/s, %d skipped", variant,
                    row["epoch"], row["train_loss"], scores_text(row), row["lr"], row["seconds"], row["images_per_s"],
                    row["skipped_batches"])

    results = train_variants(ctx, variants, seed=seed, resume=resume, progress=progress,
                             on_epoch=lambda v, row: log_epoch(name(v), row))
    for variant, result in results.items():
        state = "already trained, skipped" if result.already_done else "trained"
        logger.info("%s: %s; best val AbsRel %.4f at epoch %d -> %s", name(variant), state,
                    result.best_abs_rel, result.best_epoch, result.run_dir)
    return {name(v): str(r.run_dir) for v, r in results.items()}


@dataclass
class Pass:
    """One training pass to run: a grid point's context, the runs it trains together, the point's label."""

    ctx: RunContext
    runs: list[tuple[str, int]]
    point: str = ""


@flow(name="train-parallel")
def train_parallel(passes: list[Pass], resume: bool, progress: bool = False) -> dict[str, str]:
    """Every pass as its own task on the flow's (Dask) task runner. All of them run to their end even when one
    fails (nothing trained is lost); then the first failure is raised."""
    futures = [train_pass_task.submit(p.ctx, p.runs, resume, False, p.point) for p in passes]
    # The workers' own bars would interleave; this one counts the epochs finished by all of them, from their
    # history.csv files (which each worker rewrites atomically after every epoch).
    folders = [(p.ctx.run_dir(v, s), p.ctx.cfg.train.epochs) for p in passes for v, s in p.runs]
    epochs_done = lambda: sum(min(len(read_history(d / HISTORY_NAME)), e) for d, e in folders)  # noqa: E731
    with tqdm(total=sum(e for _, e in folders), initial=epochs_done() if resume else 0, desc="train",
              unit="epoch", disable=not progress) as bar:
        pending = set(futures)
        while pending:
            pending -= wait(list(pending), timeout=2).done
            bar.update(epochs_done() - bar.n)
    failed = [f for f in futures if f.state.is_failed() or f.state.is_crashed()]
    if failed:
        failed[0].result()  # raises the pass's own error
    return {label: d for f in futures for label, d in f.result().items()}


@flow(name="train-decoders")
@fail_run_on_user_error
def train_decoders(
    config: str = "demo",
    overrides: list[str] | None = None,
    sweep: str | None = None,
    variants: list[str] | None = None,
    resume: bool = True,
    cache_root: str | None = None,
    progress: bool = False,
    dask_address: str | None = None,
) -> dict[str, str]:
    """Returns {run: run folder}, a run being the variant, or `<variant>/seed-<s>` with several `train.seeds`,
    below `<grid point>/` with a grid. Default variants: the config's `train.variants` (the Table-2 ablations).
    `dask_address` (= `dask.address`): train the passes on that scheduler's workers."""
    cfg = run_config(config, overrides, sweep, variants=variants, cache_root=cache_root, dask_address=dask_address)
    grid_points = points(cfg)  # every point validated before anything trains
    ctxs = contexts(grid_points)
    logger = get_run_logger()
    for p, ctx in zip(grid_points, ctxs):
        if ctx.cfg.train.feature_source == "cache":
            stores = check_cache(ctx)  # refuses a cache whose fingerprint does not match, saying what differs
            logger.info("%straining from cache: train %s, val %s", f"{p.label}: " if p.label else "",
                        stores["train"], stores["val"])
    tc = cfg.train
    runs = [(p, ctx, run) for p, ctx in zip(grid_points, ctxs) for run in seed_runs(ctx.cfg.train)]
    if tc.multi_seed or grid_points[0].label:
        logger.info("%s%d variants x %d seeds %s: %d runs", f"{describe(grid_points)} x " if grid_points[0].label
                    else "", len(tc.variants), len(tc.seed_list), tc.seed_list, len(runs))
    if cfg.dask.address:  # the scheduler's workers, as they report themselves, say how many and what each has
        check_scheduler(cfg.dask.address)
        workers = plan_on_scheduler(cfg.dask.address, tc.num_threads)
        tc = tc.model_copy(update={"parallel": min(tc.parallel or workers.n_workers, len(runs)),
                                   "num_threads": workers.threads})
    # One plan for all the grid's runs (how many train at once, threads each); each point's runs then grouped
    # into passes as a sweep of that point alone would be: points never share a pass (their stores or decoders
    # differ).
    parallel, threads = parallel_plan(tc, len(runs))
    passes = []
    for p, ctx in zip(grid_points, ctxs):
        point_tc = ctx.cfg.train.model_copy(update={"parallel": tc.parallel, "num_threads": tc.num_threads})
        groups, _, _ = pass_plan(point_tc, seed_runs(ctx.cfg.train))
        passes += [Pass(ctx, group, p.label) for group in groups]
    if any(len(q.runs) > 1 for q in passes):
        logger.info("shared pass: %s each read the data once", " / ".join(
            pass_name(q.ctx.cfg.train, q.runs, q.point)[6:] for q in passes))
    order = [run_key(p, run_label(ctx.cfg.train, v, s)) for p, ctx, (v, s) in runs]
    if parallel == 1 and not cfg.dask.address:
        done = {label: d for q in passes for label, d in
                train_pass_task(q.ctx, q.runs, resume, progress, q.point).items()}
        return {label: done[label] for label in order}
    if cfg.dask.address:
        runner = DaskTaskRunner(address=cfg.dask.address)
        share = tc.device_share or workers.device_share
    else:  # one process per pass, each on its own GPU where there are several
        workers = plan_workers(tc.device, parallel, threads)
        runner = DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"plan": workers})
        share = tc.device_share or workers.device_share
    logger.info("training %d passes, %d at a time, %d torch thread(s) each%s", len(passes), parallel, threads,
                f", GPUs {list(workers.gpus)}" if any(workers.gpus) else "")
    # The workers train with these: every pass the same thread count, and the memory budgets divided among the
    # passes that share the host (RAM) and the GPU.
    update = {"parallel": parallel, "num_threads": threads, "device_share": share}
    passes = [dataclasses.replace(q, ctx=dataclasses.replace(q.ctx, cfg=q.ctx.cfg.model_copy(
        update={"train": q.ctx.cfg.train.model_copy(update=update)}))) for q in passes]
    done = train_parallel.with_options(task_runner=runner)(passes, resume, progress)
    return {label: done[label] for label in order}
