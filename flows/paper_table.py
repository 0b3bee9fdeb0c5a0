"""`paper-table`: the main job. The whole DAG for one config, reusing whatever already exists.

    extract-features ──► train-decoders ──► evaluate
    (stores reused by     (finished runs     (tables, pictures, artifacts)
     fingerprint)          skipped)
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.evaluate import evaluate
from flows.extract import extract_features
from flows.parameters import fail_run_on_user_error, run_config
from flows.train import train_decoders
from pipeline.evaluate import resolve_protocol


@flow(name="paper-table")
@fail_run_on_user_error
def paper_table(
    config: str = "demo",
    overrides: list[str] | None = None,
    sweep: str | None = None,
    variants: list[str] | None = None,
    dask_address: str | None = None,
    cache_root: str | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """Returns the `evaluate` flow's {name: path} of the results (table.md, table.tex, CSVs, PNGs)."""
    # bad parameters (an unknown variant, a crop or alignment that does not apply) fail now, not after an hour
    cfg = run_config(config, overrides, sweep, variants=variants, dask_address=dask_address, cache_root=cache_root)
    resolve_protocol(cfg)
    variants = cfg.train.variants
    get_run_logger().info("paper-table for %s (sweep %s): %s", cfg.name, cfg.sweep, ", ".join(variants))
    # cache.root travels as an override: the same setting each subflow's run_config would apply.
    shared = dict(config=config, overrides=list(overrides or []) + [f"cache.root={cache_root}"] * bool(cache_root),
                  sweep=sweep, progress=progress)
    extract_features(**shared, dask_address=dask_address)
    train_decoders(**shared, variants=variants, dask_address=dask_address)
    return evaluate(**shared, variants=variants)
