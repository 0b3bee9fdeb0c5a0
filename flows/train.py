"""`train-decoders`: train decoder ablations from one feature cache.

    fingerprint guard (train + val stores match the config) ──► train <variant>: one task per variant, in turn
                                                                 └──► runs/<sweep>/<variant>/{last,best,history.csv}
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.parameters import fail_run_on_user_error, run_config
from pipeline.layout import RunContext
from pipeline.train import check_cache, train_variant


@task(cache_policy=NO_CACHE, task_run_name="train {variant}")
def train_variant_task(ctx: RunContext, variant: str, resume: bool, progress: bool) -> str:
    logger = get_run_logger()

    def log_epoch(row: dict) -> None:
        logger.info("%s epoch %d: train loss %.4f, val AbsRel %.4f, RMSE %.3f, d1 %.3f, lr %.2e, %.1f s, "
                    "%.1f img/s, %d skipped", variant, row["epoch"], row["train_loss"], row["val_abs_rel"],
                    row["val_rmse"], row["val_d1"], row["lr"], row["seconds"], row["images_per_s"],
                    row["skipped_batches"])

    result = train_variant(ctx, variant, resume=resume, progress=progress, on_epoch=log_epoch)
    state = "already trained, skipped" if result.already_done else "trained"
    logger.info("%s: %s; best val AbsRel %.4f at epoch %d -> %s", variant, state, result.best_abs_rel,
                result.best_epoch, result.run_dir)
    return str(result.run_dir)


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
) -> dict[str, str]:
    """Returns {variant: run folder}. Default variants: the config's `train.variants` (the Table-2 ablations)."""
    ctx = RunContext.of(run_config(config, overrides, sweep, variants=variants, cache_root=cache_root))
    if ctx.cfg.train.feature_source == "cache":
        stores = check_cache(ctx)  # refuses a cache whose fingerprint does not match, saying what differs
        get_run_logger().info("training from cache: train %s, val %s", stores["train"], stores["val"])
    return {variant: train_variant_task(ctx, variant, resume, progress) for variant in ctx.cfg.train.variants}
