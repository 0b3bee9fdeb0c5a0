"""`extract-features`: run the frozen encoder once over every split into fingerprinted Zarr stores.

    plan + create stores (or reuse by fingerprint; damaged chunks marked pending) ──► extract-chunks: a few tasks
    per worker (`TASKS_PER_WORKER`), each a run of a store's pending chunks, each chunk under its claim ──► wait for
    chunks other runs hold ──► verify

Workers (`pipeline.devices`): on a host with several GPUs one process per GPU, each seeing only its own
(CUDA_VISIBLE_DEVICES), each with its share of the usable cores; or the workers of an existing scheduler.

A task extracts its chunks as one pipeline (`pipeline.extract.extract_chunks`): the write of one chunk overlaps
the decode and encoding of the next, which a task of one chunk cannot do. (`chunk_jobs` lives in `pipeline.devices`:
a deployment loads this file as a script, and Dask could not unpickle a helper of an unimportable module.)

A grid (pipeline/grid.py) extracts each distinct store once: its points' fingerprints are computed first, the
disk estimate covers every store still to write, and each store is extracted by the first point that reads it.

Two runs of one config at once (two deployment runs, two terminals) share the chunks: each extracts the chunks it
claims first and waits for the others' (pipeline/claims.py).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.futures import as_completed
from prefect_dask import DaskTaskRunner
from tqdm.auto import tqdm

from flows.parameters import check_scheduler, fail_run_on_user_error, run_config
from pipeline.config import Config, ConfigError
from pipeline import synth
from pipeline.devices import (WorkerPlan, chunk_jobs, encoder_settings, local_cluster, plan_on_scheduler,
                              with_encoder_settings, worker_plan)
from pipeline.extract import extract_claimed, finish_store, prepare_stores
from pipeline.grid import check_grid_space, contexts, describe, distinct_stores, points
from pipeline.layout import SPLITS, RunContext, finalize_store


@task(retries=1, retry_delay_seconds=2, task_run_name="extract {split} chunks {chunks}")
def extract_chunks_task(cfg: Config, url: str, split: str, chunks: list[int], torch_threads: int) -> list[dict]:
    results = extract_claimed(cfg, url, chunks, torch_threads)  # a retry redoes only the chunks not yet done
    logger = get_run_logger()
    for result in results:
        chunk = result["chunk"]
        if "held_by" in result:
            logger.info("%s chunk %d: another run is extracting it (%s)", split, chunk, result["held_by"])
        elif result.get("already_done"):
            logger.info("%s chunk %d: finished by another run", split, chunk)
        else:
            logger.info("%s chunk %d: %d samples (%d skipped) -> %s", split, chunk, result["samples"],
                        result["skipped"], url)
    return results


@flow(name="extract-chunks")
def extract_chunk_jobs(cfg: Config, jobs: list[tuple[str, str, int]], plan: WorkerPlan, progress: bool = False):
    tasks, torch_threads = chunk_jobs(jobs, plan.n_workers), plan.threads
    futures = [extract_chunks_task.submit(cfg, url, split, chunks, torch_threads) for split, url, chunks in tasks]
    size = {id(f): len(chunks) for f, (_, _, chunks) in zip(futures, tasks)}
    with tqdm(total=len(jobs), desc="extract", unit="chunk", disable=not progress) as bar:
        for future in as_completed(futures):
            future.result()  # raises a chunk's error, naming the file
            bar.update(size[id(future)])


def dask_runner(cfg: Config, plan: WorkerPlan) -> DaskTaskRunner:
    """The existing scheduler at `dask.address`, else a cluster of the planned workers on this host: processes,
    each seeing its own GPU (`pipeline.devices.local_cluster`), or threads of this process (`dask.processes`
    false: they share its devices)."""
    if cfg.dask.address:
        return DaskTaskRunner(address=cfg.dask.address)
    if not cfg.dask.processes:
        return DaskTaskRunner(cluster_kwargs=dict(n_workers=plan.n_workers, threads_per_worker=1, processes=False,
                                                  dashboard_address=None))
    return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"plan": plan})


def workers_for(cfg: Config) -> WorkerPlan:
    """The extraction's workers: those of the scheduler at `dask.address` as they report themselves, else the
    local plan (`pipeline.devices.worker_plan`)."""
    if cfg.dask.address:
        check_scheduler(cfg.dask.address)
        return plan_on_scheduler(cfg.dask.address, cfg.dask.torch_threads)
    return worker_plan(cfg)


@flow(name="extract-features")
@fail_run_on_user_error
def extract_features(
    config: str = "demo",
    overrides: list[str] | None = None,
    sweep: str | None = None,
    splits: list[str] = list(SPLITS),
    dask_address: str | None = None,
    cache_root: str | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """Returns {split: store url}; with a grid (`grid:` in the sweep, `--grid`) {"<point> <split>": store url} for
    every point. Existing stores with the same fingerprint are reused; unfinished ones resume; a store that several
    grid points share is extracted once."""
    # 'auto' encoder settings resolved here, where the stores are fingerprinted: every worker runs what it says.
    cfg = with_encoder_settings(run_config(config, overrides, sweep, dask_address=dask_address,
                                           cache_root=cache_root))
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ConfigError(f"unknown splits {unknown}; valid splits: {list(SPLITS)}")
    grid_points = points(cfg)  # every point validated, every encoder loaded, before anything is written
    ctxs = contexts(grid_points, settle=with_encoder_settings)
    plan = workers_for(cfg)
    logger = get_run_logger()
    logger.info("encoder %s; %d worker(s)%s, %d torch thread(s) each", encoder_settings(cfg.encoder).describe(),
                plan.n_workers, f" on GPUs {list(plan.gpus)}" if any(plan.gpus) else "", plan.threads)
    for data in {c.cfg.data.model_dump_json(): c.cfg.data for c in ctxs}.values():
        synth.ensure(data)
    distinct = distinct_stores(ctxs, splits)
    if grid_points[0].label:
        logger.info("%s: %d stores for %d point x split pairs", describe(grid_points), len(distinct),
                    len(grid_points) * len(splits))
        for line in check_grid_space(ctxs, splits):  # the whole grid's stores, before the first is written
            logger.info("%s", line)
    # The points that own a store (its first reader) extract it, one subflow each (a point's encoder).
    owners: dict[int, list[str]] = {}
    for url, (split, i) in distinct.items():
        owners.setdefault(i, []).append(split)
    stores = {}
    for i, owned in owners.items():
        stores.update(_extract_point(ctxs[i], owned, plan, progress, logger))
    extracted = sum(1 for s in stores.values() if s[1])
    if grid_points[0].label:
        logger.info("grid: %d distinct stores (%d extracted or resumed now, %d reused complete)", len(distinct),
                    extracted, len(distinct) - extracted)
    out = {}
    for p, ctx in zip(grid_points, ctxs):
        for split in splits:
            out[f"{p.label} {split}" if p.label else split] = ctx.store_url(split)
    return out


def _extract_point(ctx: RunContext, splits: list[str], plan: WorkerPlan, progress: bool, logger) -> dict:
    """The stores of `splits` for one config: created or reused, their pending chunks extracted on the workers,
    then verified. Returns {url: (split, whether any chunk was pending)}."""
    cfg = ctx.cfg
    stores, jobs, recheck = {}, [], {}
    for split, (store, reused) in prepare_stores(ctx, splits).items():  # refused before writing if it cannot fit
        pending = store.pending_chunks()
        logger.info("%s: %s %s (%d samples, %d of %d chunks to extract)", split,
                    "reusing" if reused else "created", store.url, store.n, len(pending), store.n_chunks)
        stores[store.url] = (split, bool(pending))
        recheck[store.url] = set(range(store.n_chunks)) - store.verified
        jobs += [(split, store.url, c) for c in pending]
    if jobs:
        extract_chunk_jobs.with_options(task_runner=dask_runner(cfg, plan))(cfg, jobs, plan, progress)
    for url, (split, _) in stores.items():
        finish_store(cfg, url)  # chunks another run holds: wait for them (or take over those of a dead one)
        report = finalize_store(url, chunks=recheck[url])
        logger.info("%s: verified %s: %d samples, %d skipped, fingerprint %s", split, url, report["n"],
                    report["skipped"], report["fingerprint"])
    return stores
