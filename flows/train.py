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
"""

from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import task_run
from prefect_dask import DaskTaskRunner
from tqdm.auto import tqdm

from flows.parameters import check_scheduler, fail_run_on_user_error, run_config
from pipeline.devices import local_cluster, plan_on_scheduler, plan_workers
from pipeline.layout import RunContext
from pipeline.train import HISTORY_NAME, check_cache, pass_plan, read_history, run_label, seed_runs, train_variants


def pass_name(tc, runs: list[tuple[str, int]]) -> str:
    """"train baseline+full", and " seed <s>" when the sweep has several seeds (a pass trains one seed's runs)."""
    seeds = sorted({s for _, s in runs})
    return "train " + "+".join(v for v, _ in runs) + (f" seed {seeds[0]}" if tc.multi_seed else "")


def _pass_name() -> str:
    return pass_name(task_run.parameters["ctx"].cfg.train, task_run.parameters["runs"])


@task(cache_policy=NO_CACHE, task_run_name=_pass_name)
def train_pass_task(ctx: RunContext, runs: list[tuple[str, int]], resume: bool, progress: bool) -> dict[str, str]:
    """One pass: the runs of one seed. Returns {run label: run folder}."""
    logger = get_run_logger()
    tc = ctx.cfg.train
    (seed,) = {s for _, s in runs}
    variants = [v for v, _ in runs]

    def log_epoch(variant: str, row: dict) -> None:
        logger.info("%s epoch %d: train loss %.4f, val AbsRel %.4f, RMSE %.3f, d1 %.3f, lr %.2e, %.1f s, "
                    "%.1f img/s, %d skipped", variant, row["epoch"], row["train_loss"], row["val_abs_rel"],
                    row["val_rmse"], row["val_d1"], row["lr"], row["seconds"], row["images_per_s"],
                    row["skipped_batches"])

    results = train_variants(ctx, variants, seed=seed, resume=resume, progress=progress,
                             on_epoch=lambda v, row: log_epoch(run_label(tc, v, seed), row))
    for variant, result in results.items():
        state = "already trained, skipped" if result.already_done else "trained"
        logger.info("%s: %s; best val AbsRel %.4f at epoch %d -> %s", run_label(tc, variant, seed), state,
                    result.best_abs_rel, result.best_epoch, result.run_dir)
    return {run_label(tc, v, seed): str(r.run_dir) for v, r in results.items()}


@flow(name="train-parallel")
def train_parallel(ctx: RunContext, groups: list[list[tuple[str, int]]], resume: bool,
                   progress: bool = False) -> dict[str, str]:
    """Every pass as its own task on the flow's (Dask) task runner. All of them run to their end even when one
    fails (nothing trained is lost); then the first failure is raised."""
    runs, epochs = [r for g in groups for r in g], ctx.cfg.train.epochs
    futures = [train_pass_task.submit(ctx, group, resume, False) for group in groups]
    # The workers' own bars would interleave; this one counts the epochs finished by all of them, from their
    # history.csv files (which each worker rewrites atomically after every epoch).
    epochs_done = lambda: sum(min(len(read_history(ctx.run_dir(v, s) / HISTORY_NAME)), epochs) for v, s in runs)
    with tqdm(total=len(runs) * epochs, initial=epochs_done() if resume else 0, desc="train",
              unit="epoch", disable=not progress) as bar:
        pending = set(futures)
        while pending:
            pending -= wait(list(pending), timeout=2).done
            bar.update(epochs_done() - bar.n)
    failed = [f for f in futures if f.state.is_failed() or f.state.is_crashed()]
    if failed:
        failed[0].result()  # raises the pass's own error
    done = {label: d for f in futures for label, d in f.result().items()}
    return {label: done[label] for label in (run_label(ctx.cfg.train, v, s) for v, s in runs)}


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
    """Returns {run: run folder}, a run being the variant, or `<variant>/seed-<s>` with several `train.seeds`.
    Default variants: the config's `train.variants` (the Table-2 ablations). `dask_address` (= `dask.address`):
    train the passes on that scheduler's workers."""
    ctx = RunContext.of(run_config(config, overrides, sweep, variants=variants, cache_root=cache_root,
                                   dask_address=dask_address))
    logger = get_run_logger()
    if ctx.cfg.train.feature_source == "cache":
        stores = check_cache(ctx)  # refuses a cache whose fingerprint does not match, saying what differs
        logger.info("training from cache: train %s, val %s", stores["train"], stores["val"])
    tc = ctx.cfg.train
    runs = seed_runs(tc)
    if tc.multi_seed:
        logger.info("%d variants x %d seeds %s: %d runs", len(tc.variants), len(tc.seed_list), tc.seed_list,
                    len(runs))
    if ctx.cfg.dask.address:  # the scheduler's workers, as they report themselves, say how many and what each has
        check_scheduler(ctx.cfg.dask.address)
        workers = plan_on_scheduler(ctx.cfg.dask.address, tc.num_threads)
        tc = tc.model_copy(update={"parallel": min(tc.parallel or workers.n_workers, len(runs)),
                                   "num_threads": workers.threads})
    groups, parallel, threads = pass_plan(tc, runs)
    if any(len(g) > 1 for g in groups):
        logger.info("shared pass: %s each read the data once", " / ".join(pass_name(tc, g)[6:] for g in groups))
    if parallel == 1 and not ctx.cfg.dask.address:
        done = {label: d for group in groups for label, d in train_pass_task(ctx, group, resume, progress).items()}
        return {label: done[label] for label in (run_label(tc, v, s) for v, s in runs)}
    if ctx.cfg.dask.address:
        runner = DaskTaskRunner(address=ctx.cfg.dask.address)
        share = tc.device_share or workers.device_share
    else:  # one process per pass, each on its own GPU where there are several
        workers = plan_workers(tc.device, parallel, threads)
        runner = DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"plan": workers})
        share = tc.device_share or workers.device_share
    logger.info("training %d passes, %d at a time, %d torch thread(s) each%s", len(groups), parallel, threads,
                f", GPUs {list(workers.gpus)}" if any(workers.gpus) else "")
    # The workers train with these: every pass the same thread count, and the memory budgets divided among the
    # passes that share the host (RAM) and the GPU.
    train = tc.model_copy(update={"parallel": parallel, "num_threads": threads, "device_share": share})
    ctx = dataclasses.replace(ctx, cfg=ctx.cfg.model_copy(update={"train": train}))
    return train_parallel.with_options(task_runner=runner)(ctx, groups, resume, progress)
