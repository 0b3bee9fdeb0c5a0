"""The run-time parameters the flows share, and what a flow run does with a bad one.

Every flow takes `config` (a shipped name or a YAML path), `overrides` (`--set`-style `key=value` strings), `sweep`,
and where it applies `variants`, `dask_address` and `cache_root`; a deployment run passes them with `-p`/`--params`.
A bad one (unknown key, wrong type, unknown variant, mismatched cache, unreachable scheduler) must end the flow run
in Failed with the error's own message, not with a traceback through Prefect's engine.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
from urllib.parse import urlsplit

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Failed

from pipeline.config import Config, ConfigError, load_config
from pipeline.errors import one_line, user_errors


def run_config(
    config: str, overrides: list[str] | None, sweep: str | None, *, variants: list[str] | None = None,
    dask_address: str | None = None, cache_root: str | None = None,
) -> Config:
    """The flow parameters as one typed config: `variants`, `dask_address` and `cache_root` are `--set
    train.variants=[...]`, `--set dask.address=...` and `--set cache.root=...`, applied after the user's overrides
    (so an unknown variant fails as the config's `train.variants` would)."""
    extra = ([f"train.variants={json.dumps(list(variants))}"] if variants else []) + (
        [f"dask.address={dask_address}"] * bool(dask_address) + [f"cache.root={cache_root}"] * bool(cache_root))
    return load_config(config, list(overrides or []) + extra, sweep=sweep)


def check_scheduler(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the parameter, when no Dask scheduler listens at `address` (Dask itself would retry
    for 30 s and then raise from inside the task runner)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname:
        raise ConfigError(f"dask.address {address!r} is not a scheduler address like tcp://host:8786")
    try:
        socket.create_connection((parts.hostname, parts.port or 8786), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"no Dask scheduler answers at dask.address {address!r} ({err}); start one with "
                          f"`dask scheduler`, or leave dask_address unset for a local cluster") from None


class _DropReported(logging.Filter):
    """Drops the engine's own traceback of an error this module already logged as one line: a served run re-raises
    a Failed state's exception ("Engine execution exited with unexpected exception") and a parent flow logs its
    subflow's ("Encountered exception during execution")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record.exc_info[1] if record.exc_info else None, "reported_by_flow", False)


_DROP_REPORTED = _DropReported()


def fail_run_on_user_error(fn):
    """Inside a flow run, a user's error (`pipeline.errors.user_errors()`: `SpaceClipError`, an encoder that cannot
    load; its message names the key, file or line to fix; anything else is a bug and keeps its traceback) becomes the
    run's Failed state with a one-line message (logged, shown by `prefect deployment run --watch` and in the UI).
    Callers of the flow still get the exception itself: Prefect raises a Failed state's exception when the flow is
    called in-process or as a subflow."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_errors() as err:
            if FlowRunContext.get() is None:
                raise
            message = f"{type(err).__name__}: {one_line(err)}"
            get_run_logger().error(message)
            err.reported_by_flow = True
            logging.getLogger("prefect.flow_runs").addFilter(_DROP_REPORTED)
            return Failed(message=message, data=err)

    return wrapper
