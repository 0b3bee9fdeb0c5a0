"""`spaceclip serve`: a local Prefect server and a deployment of every flow for every shipped config.

    start `prefect server start` on 127.0.0.1:<port>, its UI calling that port (PREFECT_HOME = .prefect/, SQLite),
    unless PREFECT_API_URL answers
      └──► wait for /api/health ──► serve extract-features/{demo,kitti,nyu}, train-decoders/..., evaluate/...,
           paper-table/... in this process ──► Ctrl-C / SIGTERM: stop the runner, then every child process by PID

Runs start within PREFECT_RUNNER_POLL_FREQUENCY seconds (2 here unless set) of `prefect deployment run`, in a
subprocess of this one, in this process's working directory: relative config paths (data/, cache/, runs/) resolve
where `spaceclip serve` was started.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import psutil

# flow name -> "module:function"
FLOWS = {
    "extract-features": "flows.extract:extract_features",
    "train-decoders": "flows.train:train_decoders",
    "evaluate": "flows.evaluate:evaluate",
    "paper-table": "flows.paper_table:paper_table",
}
CONFIGS = ("demo", "kitti", "nyu")
DEFAULT_PORT = 4200  # Prefect's own default, so `export PREFECT_API_URL=http://127.0.0.1:4200/api` usually holds


class ServeError(RuntimeError):
    """The server could not be started or reached; the message says what to do."""


# ---- the server ----------------------------------------------------------------------------------------------------
def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT socket is no user
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, home: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1:`port` with its database in `home`; returns (process, api url) once
    /api/health answers. Its own session, so a terminal's Ctrl-C reaches only us and we stop it last, in order."""
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    api_url = f"http://127.0.0.1:{port}/api"
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               # so that `prefect deployment run --watch` prints the run's log lines, not only its state changes
               PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true", PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true")
    # The UI (its /ui-settings) must call the API on this port: without a UI API URL, Prefect derives it from
    # PREFECT_API_URL (a profile's, often :4200) or the default port, and the UI on any other port shows nothing.
    # One given explicitly (a reverse proxy) is kept.
    if not (env.get("PREFECT_SERVER_UI_API_URL") or env.get("PREFECT_UI_API_URL")):
        env["PREFECT_SERVER_UI_API_URL"] = api_url
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not api_healthy(api_url):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server.pid)
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise ServeError(f"the Prefect server on port {port} did not become healthy within {timeout:.0f} s; "
                             f"last lines of {log_path}:\n  " + "\n  ".join(tail))
        time.sleep(0.5)
    return server, api_url


def stop_process(pid: int, grace: float = 15.0) -> None:
    """SIGTERM `pid` and its descendants, then SIGKILL whatever is left after `grace` seconds."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def stop_children(grace: float = 15.0) -> None:
    """Stop every process this one started (flow runs, their Dask workers, the server), each by PID."""
    for child in psutil.Process().children():
        stop_process(child.pid, grace)


# ---- the deployments -----------------------------------------------------------------------------------------------
def load_flows() -> list:
    return [getattr(importlib.import_module(module), function)
            for module, function in (target.split(":") for target in FLOWS.values())]


def build_deployments(flows: list, configs=CONFIGS) -> list:
    """One deployment per (flow, config), named by the config: `extract-features/demo`. Its default parameters
    name the config; everything else is a run-time parameter (`-p overrides='[...]'`)."""
    from prefect.types.entrypoint import EntrypointType

    def summary(f) -> str:  # the flow module's first docstring line: what the UI shows for the deployment
        return ((sys.modules[f.fn.__module__].__doc__ or f.name).strip().splitlines() or [f.name])[0]

    return [
        f.to_deployment(name=config, parameters={"config": config}, tags=["spaceclip", config],
                        description=f"{summary(f)} Config: configs/{config}.yaml.",
                        entrypoint_type=EntrypointType.MODULE_PATH)
        for f in flows for config in configs
    ]


def instructions(api_url: str, deployments: list, started: bool, home: Path) -> str:
    prefect = Path(sys.executable).with_name("prefect")
    try:
        prefect = prefect.relative_to(Path.cwd())
    except ValueError:
        pass
    by_flow: dict[str, list[str]] = {}
    for d in deployments:
        by_flow.setdefault(d.flow_name, []).append(d.name)
    lines = [
        f"Prefect server: {api_url}" + (f" (started here; database and log in {home})" if started else " (existing)"),
        f"Prefect UI:     {api_url.removesuffix('/api')}",
        f"Serving {len(deployments)} deployments (runs execute in {Path.cwd()}):",
        *(f"  {flow}/{{{','.join(names)}}}" for flow, names in by_flow.items()),
        "",
        "In another terminal:",
        f"  export PREFECT_API_URL={api_url}",
        f"  {prefect} deployment run 'extract-features/demo' --watch",
        f"  {prefect} deployment run 'paper-table/demo' -p 'variants=[\"baseline\",\"full\"]' --watch",
        f"  {prefect} deployment run 'extract-features/kitti' --params "
        "'{\"overrides\": [\"data.image_root=/datasets/kitti_raw\"], \"cache_root\": \"/scratch/cache\"}' --watch",
        "Parameters: config, overrides (--set-style list), sweep, variants, dask_address, cache_root.",
        "Ctrl-C here stops the runs in progress and everything this command started.",
    ]
    return "\n".join(lines)


# ---- the runner ----------------------------------------------------------------------------------------------------
def run_runner(deployments: list, query_seconds: float) -> None:
    """What `prefect.serve(*deployments)` does (a Runner that pauses its deployments on shutdown, no run limit),
    except for Ctrl-C: SIGINT is handled by the runner's event loop (`loop.add_signal_handler`), which stops the
    runner the way Prefect's own SIGTERM handler does, with `Runner.astop` (in-flight runs cancelled, then the
    runner's cancel scope); a second SIGINT forces the exit.

    Why not `prefect.serve`: it leaves SIGINT to a plain Python handler (`asyncio.run`'s). The kernel hands a
    process-directed signal to any thread that does not block it, and this process has several (Prefect's
    GlobalEventLoopThread, RunSyncEventLoopThread, ...). A Python handler only runs when the main thread next runs
    Python code, and the main thread here sleeps in the event loop's epoll_wait with nothing scheduled: a SIGINT
    that landed on another thread was never acted on (seen on prefect 3.9.1: SIGINT ignored for minutes, the same
    signal sent to the main thread with tgkill stopped serve at once). `add_signal_handler` sets the signal wakeup
    fd to the loop's self-pipe, so a signal wakes the loop whichever thread received it (SIGTERM too, whose
    handler the runner installs)."""
    import asyncio

    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True, limit=None, query_seconds=query_seconds)
    for deployment in deployments:
        runner.add_deployment(deployment)

    async def stop() -> None:
        while not runner.started and not runner.stopping:  # still starting: stop as soon as it has started
            await asyncio.sleep(0.1)
        if runner.started:  # not stopped already (SIGTERM)
            await runner.astop()

    interrupts = 0
    stopping: list = []  # keeps the stop task referenced

    def on_sigint() -> None:  # called by the loop, not in signal context
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt  # out of the loop: serve's clean-up stops every child by PID
        print("Ctrl-C: stopping the runs in progress and the runner (Ctrl-C again to force) ...", flush=True)
        stopping.append(asyncio.get_running_loop().create_task(stop()))

    async def main() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, on_sigint)
        await runner.start()

    def interrupt(signum, frame) -> None:  # until the loop handles SIGINT (and so that asyncio.run leaves it be)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        asyncio.run(main())  # closing the loop removes its SIGINT handler and the wakeup fd
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- the command ---------------------------------------------------------------------------------------------------
def serve(port: int | None = None, configs=CONFIGS) -> int:
    """Start (or reuse) a server, serve the deployments until Ctrl-C / SIGTERM, then stop every child process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Ctrl-C / SIGINT is how serve is stopped, so it must never be inherited as "ignored": a `cmd &` job of a
    # non-interactive shell (a script, CI, a test runner started that way, and every child it spawns) starts with
    # SIGINT set to SIG_IGN, Python keeps that, and serve ran on after SIGINT until killed. Until the runner's loop
    # runs, SIGINT raises KeyboardInterrupt; then `run_runner` takes over.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Until Prefect's runner installs its own SIGTERM handler, SIGTERM unwinds through the `finally` below too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    home = Path(os.environ.get("PREFECT_HOME", ".prefect")).resolve()
    try:
        existing = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
        if existing:
            if not api_healthy(existing):
                raise ServeError(f"PREFECT_API_URL={existing} does not answer; start that server, or unset "
                                 "PREFECT_API_URL to let `spaceclip serve` start a local one")
            if port is not None:
                print(f"--port {port} ignored: serving to the server at PREFECT_API_URL={existing}", flush=True)
            api_url, started = existing, False
        else:
            if port is not None and not port_free(port):
                raise ServeError(f"port {port} on 127.0.0.1 is in use; choose another with --port")
            port = port or (DEFAULT_PORT if port_free(DEFAULT_PORT) else free_port())
            print(f"starting a Prefect server on 127.0.0.1:{port} (about 15 s) ...", flush=True)
            _, api_url = start_server(port, home)
            started = True
        os.environ["PREFECT_API_URL"] = api_url  # flow-run subprocesses and Dask workers report here
        os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
        # Prefect's runner SIGTERM handler calls its async stop() without awaiting it; the shutdown works regardless.
        warnings.filterwarnings("ignore", message="coroutine 'Runner.astop' was never awaited")
        with temporary_settings({PREFECT_API_URL: api_url}):
            deployments = build_deployments(load_flows(), configs)
            print(instructions(api_url, deployments, started, home), flush=True)
            run_runner(deployments, query_seconds=float(os.environ["PREFECT_RUNNER_POLL_FREQUENCY"]))
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C, or SIGTERM during start-up (the runner exits)
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
        stop_children()
    print("stopped: every process `spaceclip serve` started has exited", flush=True)
    return 0
