"""Deployments (issue 6), end to end through the real command lines.

`spaceclip serve` starts a real Prefect server on a free loopback port in a temporary PREFECT_HOME and serves every
flow; `prefect deployment run '<flow>/demo' --watch` runs them; Ctrl-C stops every process it started. The work-pool
path: `prefect deploy --all` from prefect.yaml, `prefect worker start`, extraction on an existing Dask scheduler.
Children are started with `subprocess.Popen` and stopped by PID (a process started with `&` from a non-interactive
shell would ignore SIGINT).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from flows.serve import FLOWS, free_port, start_server, stop_process
from tests.conftest import TEST_DECODER, seed_home

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PREFECT, SPACECLIP, DASK = (str(BIN / name) for name in ("prefect", "spaceclip", "dask"))


# ---- helpers -------------------------------------------------------------------------------------------------------
def tiny_params(root: Path, **extra) -> dict:
    """Run-time parameters that shrink the demo config and root every output in `root` (`--params` JSON): tiny-clip
    at 64 px input (the decoder predicts at 64 x 64) and the tests' small decoder, so that an epoch takes seconds."""
    data = root / "data"
    overrides = [
        f"data.image_root={data}/raw", f"data.depth_root={data}/gt",
        f"data.train_split={data}/splits/train.txt", f"data.test_split={data}/splits/test.txt",
        "data.synth.train=8", "data.synth.test=4", "encoder.name=tiny-clip-64", "encoder.image_size=null",
        "encoder.batch_size=8", "train.bn_recompute=2", "train.seeds=[42]",  # one run a variant: serving is the test
        "views.crop_size=[176,352]", "views.views_per_image=1", "cache.chunk_size=8", "cache.target_size=[44,88]",
        "train.epochs=1", "train.batch_size=4", f"train.out_dir={root}/runs", f"eval.out_dir={root}/results",
        "eval.qualitative=2", "eval.efficiency=false", "eval.failure_cases=false",  # timings and extra figures:
        "dask.processes=false", "dask.n_workers=1", *TEST_DECODER,  # tested by test_efficiency / test_figures
    ]
    return {"overrides": overrides, "cache_root": str(root / "cache"), **extra}


def child_env(home: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(home),
               DASK_LOGGING__DISTRIBUTED="warning", **extra)
    return env


def prefect(*args: str, env: dict, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `prefect` CLI; its output is echoed so a failure shows it."""
    result = subprocess.run([PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(f"$ prefect {' '.join(args)[:200]}\n{result.stdout}{result.stderr}")
    return result


def run_deployment(name: str, params: dict, env: dict) -> subprocess.CompletedProcess:
    return prefect("deployment", "run", name, "--params", json.dumps(params), "--watch", "--watch-timeout", "200",
                   env=env)


def api_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.5)


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ui_settings(port: int) -> dict:
    """What the Prefect UI served on `port` fetches first: its settings, among them the API address it calls."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as response:
        return json.load(response)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and its descendants, as PID-holding handles (empty once it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def assert_gone(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running: {[(p.pid, ' '.join(p.cmdline())[:120]) for p in alive]}"


def complete_stores(cache_root: Path) -> dict[str, bool]:
    from pipeline.store import FeatureStore

    return {p.name.split("-")[0]: FeatureStore.open(str(p)).complete for p in sorted(cache_root.glob("*/*.zarr"))}


# ---- prefect.yaml --------------------------------------------------------------------------------------------------
def test_prefect_yaml_names_every_flow_and_config():
    """prefect.yaml parses, targets the process pool, and every entrypoint loads as the flow it claims to be."""
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for d in spec["deployments"]:
        assert d["work_pool"]["name"] == "spaceclip"
        assert d["parameters"]["config"] == d["name"]
        path, function = d["entrypoint"].split(":")
        assert (ROOT / path).is_file(), d["entrypoint"]
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        assert FLOWS[flow.name] == f"{path.removesuffix('.py').replace('/', '.')}:{function}"
        names.add(f"{flow.name}/{d['name']}")
    assert names == {f"{f}/{c}" for f in FLOWS for c in ("demo", "kitti", "nyu")}


# ---- spaceclip serve -----------------------------------------------------------------------------------------------
class FakeRunner:
    """Stands in for prefect's Runner in `run_runner`: `start` waits on the loop until `astop` is called."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.deployments, self.events = kwargs, [], []
        self.started = self.stopping = False
        self._loop = None
        FakeRunner.instances.append(self)

    def add_deployment(self, deployment):
        self.deployments.append(deployment)

    async def start(self):
        import asyncio
        import threading

        self._loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        wakeup_fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup_fd)
        self.events.append(("signal wakeup fd set", wakeup_fd != -1))
        self.started = True
        # Ctrl-C while serving, received by another thread (as the kernel may pick any thread of the process) while
        # this loop has nothing scheduled: only the wakeup fd brings the loop, and so the handler, to it.
        other_thread_waits, release = threading.Event(), threading.Event()
        helper = threading.Thread(target=lambda: (other_thread_waits.set(), release.wait(30)))
        helper.start()
        other_thread_waits.wait()
        signal.pthread_kill(helper.ident, signal.SIGINT)
        try:
            await asyncio.wait_for(self._stopped.wait(), 20)  # a hang guard: without the wakeup fd, stuck here
            self.events.append("start returned")
        finally:
            release.set()
            helper.join()

    async def astop(self):
        self.events.append("astop")
        self.started, self.stopping = False, True
        self._stopped.set()


def test_sigint_stops_the_runner_with_astop_even_if_inherited_ignored(monkeypatch, capsys):
    """`serve` restores SIGINT that was inherited as ignored, and while the runner runs, SIGINT, whichever thread
    receives it, stops it with `Runner.astop` (the way Prefect's SIGTERM handler does)."""
    import prefect.runner

    from flows import serve as serve_module

    monkeypatch.setattr(prefect.runner, "Runner", FakeRunner)
    monkeypatch.setattr(serve_module, "api_healthy", lambda url, timeout=2.0: True)
    deployments = [SimpleNamespace(flow_name="extract-features", name=c) for c in ("demo", "kitti")]
    monkeypatch.setattr(serve_module, "build_deployments", lambda flows, configs: deployments)
    monkeypatch.setattr(serve_module, "load_flows", lambda: [])
    stopped = []
    monkeypatch.setattr(serve_module, "stop_children", lambda grace=15.0: stopped.append(True))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # "existing": no server is started
    monkeypatch.setenv("PREFECT_RUNNER_POLL_FREQUENCY", "3")
    FakeRunner.instances.clear()
    old_int, old_term = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        assert serve_module.serve() == 0
        after = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    (runner,) = FakeRunner.instances
    assert runner.kwargs == {"pause_on_shutdown": True, "limit": None, "query_seconds": 3.0}
    assert runner.deployments == deployments
    assert runner.events == [("signal wakeup fd set", True), "astop", "start returned"]
    assert after is signal.default_int_handler  # restored once the runner is done; the inherited SIG_IGN is gone
    assert stopped == [True]
    out = capsys.readouterr().out
    assert "Ctrl-C: stopping the runs in progress and the runner" in out
    assert "stopped: every process `spaceclip serve` started has exited" in out


def test_server_ui_api_url_follows_the_port(monkeypatch, tmp_path):
    """The server process gets its UI API address for its own port; one the user set explicitly is kept."""
    from flows import serve as serve_module

    seen = []

    class Popen:
        def __init__(self, args, env, **kwargs):
            seen.append((args, env))
            self.pid = os.getpid()

        def poll(self):
            return None

    monkeypatch.setattr(serve_module.subprocess, "Popen", Popen)
    monkeypatch.setattr(serve_module, "api_healthy", lambda url, timeout=2.0: True)
    for name in ("PREFECT_SERVER_UI_API_URL", "PREFECT_UI_API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a profile's or shell's: not passed on
    _, api = serve_module.start_server(4317, tmp_path)
    args, env = seen[-1]
    assert api == "http://127.0.0.1:4317/api" and args[-2:] == ["--port", "4317"]
    assert env["PREFECT_SERVER_UI_API_URL"] == api and "PREFECT_API_URL" not in env
    assert (env["PREFECT_SERVER_API_HOST"], env["PREFECT_SERVER_API_PORT"]) == ("127.0.0.1", "4317")
    monkeypatch.setenv("PREFECT_UI_API_URL", "https://prefect.example.org/api")  # behind a proxy
    serve_module.start_server(4317, tmp_path)
    assert "PREFECT_SERVER_UI_API_URL" not in seen[-1][1]
    assert seen[-1][1]["PREFECT_UI_API_URL"] == "https://prefect.example.org/api"


# ---- a server the tests start themselves: the work-pool path, then a restarting server ----------------------------
@pytest.fixture(scope="module")
def own_server(tmp_path_factory, prefect_db):
    """A `prefect server start` in the test's own hands (what `spaceclip serve` would start), shared by the work-pool
    test and the restart test after it: one server start fewer (5 s saved, measured). The restart test replaces `proc`
    with the server it starts again on the same port and database and, as its last user, stops it (no idle server left
    running beside the served tests); the teardown stops whatever is still running and checks the port is free."""
    port, home = free_port(), seed_home(tmp_path_factory.mktemp("own-server") / "prefect-home", prefect_db)
    proc, api = start_server(port, home)
    ns = SimpleNamespace(proc=proc, port=port, home=home, api=api)
    try:
        yield ns
    finally:
        tree = process_tree(ns.proc.pid)
        if ns.proc.poll() is None:
            stop_process(ns.proc.pid, grace=10)
        assert_gone(tree)
        assert not port_open(port)


@pytest.mark.slow
def test_work_pool_worker_and_dask_scheduler(tmp_path, own_server):
    """`prefect deploy --all` to a process pool, a worker, extraction on an existing Dask scheduler. (`spaceclip
    serve` against this server: the restart test below.)"""
    home, work, port, api = own_server.home, tmp_path / "worker", own_server.port, own_server.api
    work.mkdir()
    dask_port = free_port()
    while dask_port == port:
        dask_port = free_port()
    env = child_env(home, PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1")
    started: list[subprocess.Popen] = []
    assert ui_settings(port)["api_url"] == api

    def popen(args: list[str], name: str, **kwargs) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        started.append(proc)
        return proc, log

    try:
        scheduler, scheduler_log = popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(dask_port),
                                          "--no-dashboard"], "dask-scheduler")
        # Dask workers run the extraction tasks and report them to the Prefect server, so they need its URL too.
        popen([DASK, "worker", f"tcp://127.0.0.1:{dask_port}", "--nworkers", "1", "--nthreads", "1",
               "--no-dashboard"], "dask-worker")
        assert prefect("work-pool", "create", "spaceclip", "--type", "process", env=env).returncode == 0
        # prefect.yaml's pull step is "{{ $PWD }}": the folder `prefect deploy` runs in, as a shell would set it
        assert prefect("--no-prompt", "deploy", "--all", env={**env, "PWD": str(ROOT)}, cwd=ROOT).returncode == 0
        worker, worker_log = popen([PREFECT, "worker", "start", "--pool", "spaceclip"], "prefect-worker", cwd=work)

        t = time.monotonic()
        params = tiny_params(tmp_path, dask_address=f"tcp://127.0.0.1:{dask_port}")
        result = run_deployment("extract-features/demo", params, env)
        assert result.returncode == 0, worker_log.read_text()[-3000:]
        assert complete_stores(tmp_path / "cache") == {"test": True, "train": True, "val": True}
        assert "Connecting to an existing Dask cluster" in worker_log.read_text()
        print(f"work pool: extract-features/demo on the Dask scheduler in {time.monotonic() - t:.1f} s")

        from distributed import Client

        with Client(f"tcp://127.0.0.1:{dask_port}", timeout=20) as client:
            prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
        assert "extract_chunks_task" in prefixes  # the chunks ran on that cluster
    finally:
        tree = [p for proc in started for p in process_tree(proc.pid)]
        for proc in reversed(started):  # the worker first, then Dask (the server is the fixture's)
            stop_process(proc.pid, grace=10)
    assert_gone(tree)
    assert not port_open(dask_port)
    assert api_get(f"{api}/health") == 200


# ---- cancelled runs and a restarting server (issue 15): helpers ------------------------------------------------
def many_chunk_params(root: Path) -> dict:
    """`tiny_params` with one sample per chunk and task: a run long enough to be interrupted between chunks."""
    params = tiny_params(root)
    params["overrides"] += ["data.synth.train=48", "cache.chunk_size=1", "encoder.batch_size=1"]
    return params


def start_deployment(name: str, params: dict, env: dict) -> str:
    """`prefect deployment run` without waiting; returns the flow run's id."""
    import re

    result = prefect("deployment", "run", name, "--params", json.dumps(params), env=env)
    assert result.returncode == 0
    return re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)


def flow_run_state(api: str, run_id: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{api}/flow_runs/{run_id}", timeout=5) as response:
            return json.load(response)["state_type"]
    except OSError:
        return None


def done_samples(cache_root: Path) -> int:
    from pipeline.store import FeatureStore

    return sum(int(FeatureStore.open(str(p)).done_flags().sum()) for p in sorted(cache_root.glob("*/*.zarr")))


def store_bytes(cache_root: Path) -> dict[str, bytes]:
    """Every chunk and index file of every store under `cache_root` (the metadata aside), by split and path."""
    return {f"{p.parent.name}/{p.name.split('-')[0]}/{f.relative_to(p)}": f.read_bytes()
            for p in sorted(cache_root.glob("*/*.zarr")) for f in sorted(p.rglob("*"))
            if f.is_file() and f.name != "zarr.json"}


def reference_stores(params: dict, root: Path) -> dict[str, bytes]:
    """The stores of an uninterrupted extraction of the same parameters, in-process into `root`."""
    from flows.parameters import run_config
    from pipeline.extract import extract_splits

    extract_splits(run_config("demo", params["overrides"], None, cache_root=str(root)))
    return store_bytes(root)


def run_children(proc: subprocess.Popen) -> list[psutil.Process]:
    """The flow-run processes of `spaceclip serve` (its children but the server and multiprocessing's helpers)."""
    try:
        children = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and not any(
                    word in " ".join(p.cmdline()) for word in ("server", "resource_tracker")):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def start_serve(work: Path, env: dict, log: Path, *args: str, preexec_fn=None) -> subprocess.Popen:
    work.mkdir(exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen([SPACECLIP, "serve", *args], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec_fn)


def assert_sound_and_resumable(cache_root: Path) -> None:
    """Every store there opens, every chunk marked done decodes, and no half-written file lies in it."""
    from pipeline.store import FeatureStore

    stores = sorted(cache_root.glob("*/*.zarr"))
    assert stores
    for path in stores:
        report = FeatureStore.open(str(path)).verify()
        assert report["problems"] == [], report["problems"]
        assert not list(path.rglob("*.partial"))


@pytest.mark.slow
def test_the_server_restarting_during_a_run_does_not_corrupt_the_store(tmp_path, own_server):
    """The Prefect server is stopped in the middle of a served extraction and started again (same port, same
    database). Whatever becomes of that run, every chunk it marked done is sound, and running the deployment again
    completes the stores with the bytes of an uninterrupted extraction. `spaceclip serve` here runs against a server
    it did not start (PREFECT_API_URL answers): it starts none and, on SIGTERM, stops only what it started."""
    port, home, api, log = own_server.port, own_server.home, own_server.api, tmp_path / "serve.log"
    env = child_env(home, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="2")
    serve = start_serve(tmp_path / "work", env, log)
    try:
        wait_until(lambda: "Ctrl-C here stops" in log.read_text(), 150, "serve ready", serve, log)
        assert f"Prefect server: {api} (existing)" in log.read_text()
        params = many_chunk_params(tmp_path)
        run_id = start_deployment("extract-features/demo", params, env)
        cache = tmp_path / "cache"
        wait_until(lambda: done_samples(cache) >= 1, 240, "a chunk extracted", serve, log)
        stop_process(own_server.proc.pid)  # the server goes away mid-run ...
        assert not all(complete_stores(cache).values()), "the run finished before the server stopped"
        own_server.proc, _ = start_server(port, home)  # ... and comes back on the same port and database
        wait_until(lambda: flow_run_state(api, run_id) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), 300,
                   "the interrupted run ended", serve, log)
        wait_until(lambda: not run_children(serve), 60, "the run's process gone", serve, log)
        print(f"the run interrupted by the server restart ended {flow_run_state(api, run_id)}")
        assert_sound_and_resumable(cache)

        result = run_deployment("extract-features/demo", params, env)
        assert result.returncode == 0 and "Completed" in result.stdout
        assert set(complete_stores(cache).values()) == {True}

        procs = process_tree(serve.pid)[1:]  # SIGTERM: serve's own processes go, the server it found stays
        serve.terminate()
        assert serve.wait(timeout=60) == 0
        assert_gone(procs)
        assert api_get(f"{api}/health") == 200
    finally:
        if serve.poll() is None:
            serve.terminate()
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                stop_process(serve.pid, grace=5)
        stop_process(own_server.proc.pid, grace=10)  # its last user
        print(log.read_text()[-3000:])
    assert store_bytes(cache) == reference_stores(params, tmp_path / "reference")


# ---- served deployments: one `spaceclip serve` for the three tests below ---------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, prefect_db):
    """One `spaceclip serve --port` (it starts its own Prefect server), shared by the served-deployment tests below
    in the order they are written; the last of them stops it with Ctrl-C. Yields once every deployment answers."""
    root = tmp_path_factory.mktemp("served")
    port, home, log = free_port(), seed_home(root / "prefect-home", prefect_db), root / "serve.log"
    start = time.monotonic()
    # Started with SIGINT ignored, as a `cmd &` job of a non-interactive shell (and a test runner started that way,
    # and all its children) starts: Ctrl-C must still stop serve.
    proc = start_serve(root / "work", child_env(home, PREFECT_RUNNER_POLL_FREQUENCY="1"), log, "--port", str(port),
                       preexec_fn=ignore_sigint)
    api = f"http://127.0.0.1:{port}/api"
    try:
        for name in ("extract-features/demo", "paper-table/demo", "train-decoders/nyu", "evaluate/kitti"):
            wait_until(lambda: api_get(f"{api}/deployments/name/{name}") == 200, 150, f"deployment {name}",
                       proc, log)
        print(f"serve: server healthy and 12 deployments registered in {time.monotonic() - start:.1f} s")
        yield SimpleNamespace(proc=proc, port=port, api=api, home=home, log=log,
                              env=child_env(home, PREFECT_API_URL=api))
    finally:
        print(log.read_text()[-3000:])
        if proc.poll() is None:
            stop_process(proc.pid, grace=5)


@pytest.mark.slow
def test_serve_registers_every_deployment_and_runs_them(served, tmp_path):
    text = served.log.read_text()
    assert f"Prefect UI:     http://127.0.0.1:{served.port}" in text and f"export PREFECT_API_URL={served.api}" in text
    # the given PREFECT_HOME: its server's log, and its database (seeded empty) now holds the deployments
    assert (served.home / "server.log").exists()
    with contextlib.closing(sqlite3.connect(served.home / "prefect.db")) as con:
        assert con.execute("SELECT count(*) FROM deployment").fetchone()[0] >= 4
    # The UI served on this port calls the API on this port (not Prefect's default 4200).
    assert ui_settings(served.port)["api_url"] == served.api
    run_env = served.env

    t = time.monotonic()
    result = run_deployment("extract-features/demo", tiny_params(tmp_path), run_env)
    assert result.returncode == 0
    assert "Flow run finished successfully in 'Completed'" in result.stdout
    assert complete_stores(tmp_path / "cache") == {"test": True, "train": True, "val": True}
    print(f"extract-features/demo: {time.monotonic() - t:.1f} s")

    t = time.monotonic()
    result = run_deployment("paper-table/demo", tiny_params(tmp_path, variants=["baseline"]), run_env)
    assert result.returncode == 0
    results = tmp_path / "results" / "demo"
    for name in ("table.md", "table.tex", "summary.csv", "per_image.csv"):
        assert (results / name).stat().st_size > 0, name
    assert "baseline" in (results / "table.md").read_text()
    assert (tmp_path / "runs" / "demo" / "baseline" / "best" / "model.safetensors").exists()
    print(f"paper-table/demo: {time.monotonic() - t:.1f} s")

    # A bad parameter fails the run with the config error's own message, not a traceback.
    bad = tiny_params(tmp_path)
    bad["overrides"].append("train.epoch=3")
    result = run_deployment("train-decoders/demo", bad, run_env)
    assert result.returncode == 1
    assert "unknown key 'train.epoch' in --set train.epoch=3" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # ... and an unknown parameter name is refused before a run exists.
    result = prefect("deployment", "run", "extract-features/demo", "-p", "cache_dir=/tmp", env=run_env)
    assert result.returncode == 1 and "cache_dir" in result.stdout + result.stderr


@pytest.mark.slow
def test_a_cancelled_deployment_run_stops_and_its_store_resumes(served, tmp_path):
    """`prefect flow-run cancel` on a served extract-features run: the run ends Cancelled, its process goes, no chunk
    is written after that, what was written is sound; two runs of the same deployment at once then both complete
    the stores, with the bytes of an uninterrupted extraction."""
    serve, api, env, log = served.proc, served.api, served.env, served.log
    params = many_chunk_params(tmp_path)
    run_id = start_deployment("extract-features/demo", params, env)
    cache = tmp_path / "cache"
    wait_until(lambda: done_samples(cache) >= 1, 240, "a chunk extracted", serve, log)
    assert prefect("flow-run", "cancel", run_id, env=env).returncode == 0
    wait_until(lambda: flow_run_state(api, run_id) == "CANCELLED", 120, "the run cancelled", serve, log)
    wait_until(lambda: not run_children(serve), 60, "the run's process gone", serve, log)
    stopped_at = done_samples(cache)
    print(f"cancelled after {stopped_at} extracted samples")
    assert not all(complete_stores(cache).values()), "the run finished before it was cancelled"
    assert_sound_and_resumable(cache)
    time.sleep(3)  # nothing of the cancelled run is still writing
    assert done_samples(cache) == stopped_at

    # resumed by two deployment runs at once: they share the remaining chunks and both complete
    again = [start_deployment("extract-features/demo", params, env) for _ in range(2)]
    wait_until(lambda: all(flow_run_state(api, r) in ("COMPLETED", "FAILED", "CRASHED") for r in again), 300,
               "both runs ended", serve, log)
    assert [flow_run_state(api, r) for r in again] == ["COMPLETED", "COMPLETED"]
    assert set(complete_stores(cache).values()) == {True}
    assert store_bytes(cache) == reference_stores(params, tmp_path / "reference")


@pytest.mark.slow
def test_ctrl_c_stops_serve_and_everything_it_started(served):
    """Ctrl-C: serve stops the runner, then every process it started (its Prefect server among them), by PID. The
    last test of `served`: it ends that serve."""
    serve = served.proc
    procs = process_tree(serve.pid)[1:]
    try:
        assert any("server" in " ".join(p.cmdline()) for p in procs), [p.cmdline() for p in procs]
        t = time.monotonic()
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        print(f"shutdown: {time.monotonic() - t:.1f} s")
        text = served.log.read_text()
        assert "Ctrl-C: stopping the runs in progress and the runner" in text
        assert "every process `spaceclip serve` started has exited" in text
        assert_gone(procs)
        assert not port_open(served.port)
    finally:  # what a failed shutdown left behind (the fixture stops only serve's own tree)
        for p in procs:
            stop_process(p.pid, grace=5)
