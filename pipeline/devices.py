"""Which cores and GPUs this process may use, and how the workers of a flow share them.

    usable_cores()                  the cores this process may run on (affinity, cgroup quota): every thread count
    resolve_device(name)            auto | cpu | cuda | cuda:N  ->  torch.device (a bad name: one line naming it)
    plan_workers(device, n)         local workers: the GPU each sees (CUDA_VISIBLE_DEVICES), torch threads each,
                                    how many share one GPU (its memory budget is divided among them)
    local_cluster(plan)             a Dask cluster of those workers, each process with its own environment
    plan_on_scheduler(address)      the same plan for the workers of an existing scheduler, as they report it
    worker_plan(cfg)                the extraction's local workers; `decode_workers_for`: the decode threads of one
    chunk_jobs(pending, n_workers)  a flow's tasks: each store's pending chunks in runs, `TASKS_PER_WORKER` a worker
    encoder_settings(encoder)       the extraction's batch size, autocast dtype and TF32, 'auto' resolved
    reuse_freed_memory()            glibc's allocator told to keep freed memory for the next tensor (Dask's workers
                                    are started to hand it back at once)

A worker given one GPU sees it as `cuda:0` (CUDA_VISIBLE_DEVICES holds that one entry), so `device: auto` and
`device: cuda` mean "my GPU" in every worker. `device: cuda:N` pins every worker to GPU N instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DEVICE_PATTERN, Config, ConfigError, EncoderConfig

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")  # "0::/the/process/cgroup" (v2)


# ---- memory -------------------------------------------------------------------------------------------------------
# glibc mallopt parameters (malloc.h) and the values set by `reuse_freed_memory`.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # blocks up to this come from the heap: the largest value every 64-bit glibc accepts
TRIM_THRESHOLD = 1 << 30  # free memory at the top of the heap kept for reuse up to this


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc keep the memory a tensor frees for the next one, in this process, from now on; False where the C
    library is not glibc. A Dask nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which hands freed
    memory back to the kernel at once and (a documented side effect) fixes glibc's mmap threshold at 128 KiB, so
    every activation over 128 KiB is a fresh mapping whose pages fault in again on first touch. A demo decoder step
    in such a process: 152,000 page faults and 0.68-0.87 s; after this, 425-575 faults and 0.48-0.49 s
    (BENCHMARKS.md, "The demo in 6 minutes"). What is kept is bounded by the process's peak: nothing grows."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl, macOS: no such knobs, or other meanings
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("glibc refused mallopt(%d, %d) / (%d, %d)", M_MMAP_THRESHOLD, MMAP_THRESHOLD, M_TRIM_THRESHOLD,
                  TRIM_THRESHOLD)
    return ok


# ---- cores --------------------------------------------------------------------------------------------------------
def cgroup_cpu_limit(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The CPU quota (in cores) of this process's cgroup and its parents, the smallest one; None when unlimited.
    cgroup v2: `cpu.max` ("max 100000" or "<quota> <period>"); v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us`."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    limits = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    own = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "/")
    path = root / own.lstrip("/")
    while True:  # v2: the process's own cgroup up to the root (a parent's quota caps its children)
        limits.append(_read_quota(path / "cpu.max"))
        if path == root or root not in path.parents:
            break
        path = path.parent
    for v1 in ("cpu", "cpu,cpuacct"):
        try:
            quota = int((root / v1 / "cpu.cfs_quota_us").read_text())
            period = int((root / v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            limits.append(quota / period)
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _read_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cores(affinity: set[int] | None = None, quota: float | None = -1.0) -> int:
    """The cores this process may keep busy: the CPUs it may run on (`os.sched_getaffinity`: taskset, a batch
    scheduler's cpuset), capped by its cgroup's CPU quota (a container's `--cpus`), at least 1. `os.cpu_count()`
    counts the host's cores, which a job given 4 of 64 would oversubscribe 16 times."""
    if affinity is None and quota == -1.0:
        return _own_cores()
    if affinity is None:
        affinity = _affinity()
    quota = cgroup_cpu_limit() if quota == -1.0 else quota
    cores = len(affinity)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))  # 1.5 cores of quota keep one thread busy, not two
    return max(1, cores)


def _affinity() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _own_cores() -> int:  # read once a process: callers ask per chunk written
    return usable_cores(_affinity(), cgroup_cpu_limit())


# ---- devices ------------------------------------------------------------------------------------------------------
def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto` -> the first visible GPU if any, else the CPU; `cuda` / `cuda:N` checked against the GPUs torch sees."""
    if not re.match(DEVICE_PATTERN, name):
        raise ConfigError(f"{key} {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key} is {name!r} but torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); set {key}=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else None
        if index is not None and index >= count:
            raise ConfigError(f"{key} is {name!r} but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device(name)


def visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries a worker may be given, one per GPU this process sees: the entries of this
    process's own CUDA_VISIBLE_DEVICES where it is set (a worker must stay inside it), else 0..count-1."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    own = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if e.strip()]
    return own[:count] if len(own) >= count else [str(i) for i in range(count)]


@dataclass(frozen=True)
class WorkerPlan:
    """Workers of one flow and what each may use."""

    gpus: tuple[str | None, ...]  # per worker: its CUDA_VISIBLE_DEVICES, or None (inherits this process's)
    threads: int  # torch intra-op threads of each worker
    device_share: int  # workers that share one GPU (its memory budget is divided among them); 1 on a CPU
    host_share: int  # workers that share this host's RAM

    @property
    def n_workers(self) -> int:
        return len(self.gpus)

    def env(self, worker: int) -> dict[str, str]:
        gpu = self.gpus[worker]
        return {} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}


def plan_workers(device: str, n_workers: int | None = None, threads: int | None = None,
                 cores: int | None = None) -> WorkerPlan:
    """Local workers for `device`. `auto`/`cuda` on a host with k GPUs: `n_workers` (default k) dealt round-robin
    over the GPUs, each worker seeing only its own; `cuda:N`: every worker on GPU N; `cpu` or no GPU: `n_workers`
    (default 1) on the CPU. Threads: `threads`, else the usable cores shared among the workers."""
    cores = cores or usable_cores()
    gpus = visible_gpus() if resolve_device(device).type == "cuda" and ":" not in device else []
    if gpus:
        n = n_workers or len(gpus)
        assigned = tuple(gpus[i % len(gpus)] for i in range(n))
        share = math.ceil(n / len(gpus))
    else:
        n = n_workers or 1
        assigned = (None,) * n
        share = n if device.startswith("cuda") else 1  # cuda:N: all of them on that one GPU
    return WorkerPlan(assigned, threads or max(1, cores // n), share, n)


def local_cluster(plan: WorkerPlan, asynchronous: bool = False, **_):
    """A Dask cluster on this host with one single-threaded worker process per planned worker, each started with
    its own environment (its GPU): a LocalCluster gives every worker the same one. dask-cuda's LocalCUDACluster
    would do the same, but it pins its own dask release and pulls in the CUDA Python bindings and NVML."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.worker_memory import parse_memory_limit

    # The scheduler's HTTP server runs whatever `dashboard` says: on a free port, not on 8787 that another may hold.
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": ":0"}}
    memory = parse_memory_limit("auto", 1, plan.n_workers, logger=log)  # the RAM shared out, as a LocalCluster
    workers = {f"worker-{i}": {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": plan.env(i),
                                                         "memory_limit": memory, "dashboard": False,
                                                         "silence_logs": logging.WARN}}
               for i in range(plan.n_workers)}
    return SpecCluster(workers=workers, scheduler=scheduler, asynchronous=asynchronous, silence_logs=logging.WARN)


def _probe(dask_worker) -> dict:
    """What a worker may use, as it sees it (`Client.run` calls it in every worker, passing the worker)."""
    import socket

    return {"host": socket.gethostname(), "cores": usable_cores(), "nthreads": dask_worker.state.nthreads,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def plan_on_scheduler(address: str, threads: int | None = None) -> WorkerPlan:
    """The plan for the workers of the scheduler at `address`, from what each reports: every worker the same
    thread count (the fewest any one gets: a host's usable cores shared among that host's worker threads, so that
    results do not depend on the worker a task lands on), GPU and RAM shares the most workers on one GPU / host."""
    from distributed import Client

    with Client(address, timeout=10) as client:
        seen = list(client.run(_probe).values())
    if not seen:
        raise ConfigError(f"the Dask scheduler at dask.address {address!r} has no workers; start some with "
                          f"`dask worker {address}`")
    per_host: dict[str, int] = {}
    per_gpu: dict[tuple, int] = {}
    for w in seen:
        per_host[w["host"]] = per_host.get(w["host"], 0) + w["nthreads"]
        if w["gpus"]:  # workers that see the same GPUs all run on the first of them
            key = (w["host"], w["visible"])
            per_gpu[key] = per_gpu.get(key, 0) + w["nthreads"]  # all on its first visible GPU
    fewest = min(max(1, w["cores"] // per_host[w["host"]]) for w in seen)
    slots = sum(w["nthreads"] for w in seen)
    return WorkerPlan((None,) * slots, threads or fewest, max(per_gpu.values(), default=1),
                      max(per_host.values()))


# ---- the extraction's workers and tasks ---------------------------------------------------------------------------
def worker_plan(cfg: Config) -> WorkerPlan:
    """The local extraction workers: `dask.n_workers` (default one per GPU, else one), each with `dask.torch_threads`
    or its share of the usable cores (Dask sets OMP_NUM_THREADS=1 in its workers)."""
    return plan_workers(cfg.encoder.device, cfg.dask.n_workers, cfg.dask.torch_threads)


def torch_threads_per_worker(cfg: Config) -> int:
    return worker_plan(cfg).threads


def decode_workers_for(cfg: Config) -> int:
    """Threads that decode, view, preprocess and make targets for one extraction worker: `encoder.decode_workers`,
    else its share of the cores. Threads: Pillow, numpy and zstd release the GIL, and a process would ship every
    frame back (BENCHMARKS.md)."""
    return cfg.encoder.decode_workers or torch_threads_per_worker(cfg)


TASKS_PER_WORKER = 2  # flow tasks per worker and store: few (each builds a decode pool, buffers and claims), but
# more than one, so that a worker that finishes early takes over part of a slower one's share


def chunk_jobs(pending: list[tuple[str, str, int]], n_workers: int) -> list[tuple[str, str, list[int]]]:
    """(split, url, chunks) tasks: each store's pending chunks in `TASKS_PER_WORKER` runs per worker (KITTI's ~1300
    train chunks on 8 GPUs: 16 tasks of 82). A task extracts its chunks as one pipeline; a retry only what is left."""
    stores: dict[str, list] = {}
    for split, url, chunk in pending:
        stores.setdefault(url, [split, []])[1].append(chunk)
    jobs: list[tuple[str, str, list[int]]] = []
    for url, (split, chunks) in stores.items():
        per_task = -(-len(chunks) // (max(1, n_workers) * TASKS_PER_WORKER))
        jobs += [(split, url, chunks[i:i + per_task]) for i in range(0, len(chunks), per_task)]
    return jobs


# ---- the extraction's encoder settings ----------------------------------------------------------------------------
# On a GPU the frozen encoder runs in bf16 autocast, 64 images a batch, TF32 for what stays fp32; the features are
# stored at the store's dtype (fp16) either way. On a CPU: fp32 (bf16 matmuls are slow there), 8 a batch.
CUDA_DEFAULTS = {"batch_size": 64, "dtype": "bfloat16"}
CPU_DEFAULTS = {"batch_size": 8, "dtype": "float32"}


@dataclass(frozen=True)
class EncoderSettings:
    device: str  # "cpu", "cuda", "cuda:N"
    batch_size: int
    dtype: str  # autocast dtype ("float32": none); it changes the stored bytes, so it is in the fingerprint
    tf32: bool  # fp32 matmuls as TF32 on CUDA

    @property
    def autocast(self) -> torch.dtype | None:
        return None if self.dtype == "float32" else getattr(torch, self.dtype)

    def describe(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "autocast_dtype": self.dtype,
                "tf32": self.tf32}


def encoder_settings(encoder: EncoderConfig) -> EncoderSettings:
    """`encoder.batch_size` and `encoder.dtype` with 'auto' resolved for the device the encoder runs on. Asks no more
    of the device than its kind, so that a process without the GPU (training on another host) computes the
    fingerprint of a cache that a GPU extracted."""
    device = encoder.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = CUDA_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS
    batch = defaults["batch_size"] if encoder.batch_size == "auto" else encoder.batch_size
    dtype = defaults["dtype"] if encoder.dtype == "auto" else encoder.dtype
    return EncoderSettings(device, batch, dtype, device.startswith("cuda"))


def with_encoder_settings(cfg: Config) -> Config:
    """`cfg` with `encoder.batch_size` and `encoder.dtype` resolved here, in the process that fingerprints the
    stores: workers on another host then run what the fingerprint says, whatever device they have."""
    settings = encoder_settings(cfg.encoder)
    encoder = cfg.encoder.model_copy(update={"batch_size": settings.batch_size, "dtype": settings.dtype})
    return cfg.model_copy(update={"encoder": encoder})
