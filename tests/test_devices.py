"""Cores, GPUs and workers (`pipeline.devices`), planned on this CPU machine with the real planning code: only what
the machine cannot have (GPUs, a CPU affinity, cgroup quota files) is monkeypatched."""

import os
import platform
from pathlib import Path

import pytest
import torch

from pipeline import devices, synth
from pipeline.config import ConfigError, EncoderConfig, TrainConfig, config_from_dict, dump_config, load_config
from pipeline.devices import (WorkerPlan, cgroup_cpu_limit, encoder_settings, plan_workers, resolve_device,
                              usable_cores, with_encoder_settings)


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(k)`: torch sees k CUDA devices (0: none)."""
    def set_count(k: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: k > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: k)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_count


@pytest.fixture
def host(monkeypatch, tmp_path):
    """`host(cpus, cpu_max=None, own="/")`: this process may run on `cpus` CPUs (its affinity), in the cgroup `own`
    whose cpu.max is `cpu_max` (cgroup v2; e.g. "200000 100000" = 2 cores)."""
    def set_host(cpus: int, cpu_max: str | None = None, own: str = "/") -> None:
        root = tmp_path / "cgroup"
        (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "cpu.max").write_text("max 100000\n")
        if cpu_max:
            (root / own.lstrip("/") / "cpu.max").write_text(cpu_max + "\n")
        (tmp_path / "proc_cgroup").write_text(f"0::{own}\n")
        monkeypatch.setattr(devices, "CGROUP_ROOT", root)
        monkeypatch.setattr(devices, "PROC_CGROUP", tmp_path / "proc_cgroup")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's cores: never the answer
        devices._own_cores.cache_clear()
    yield set_host
    devices._own_cores.cache_clear()


# ---- cores ------------------------------------------------------------------------------------------------------
def test_cores_are_the_affinity_capped_by_the_cgroup_quota(host, tmp_path):
    host(6)
    assert usable_cores() == 6  # 6 of the host's 64: taskset / a cpuset
    host(16, cpu_max="250000 100000", own="/job/step")  # a container's --cpus=2.5, set on the process's own cgroup
    assert cgroup_cpu_limit() == 2.5 and usable_cores() == 2
    host(16, cpu_max="50000 100000", own="/job")
    assert usable_cores() == 1  # half a core of quota still runs one thread
    # a parent's quota caps its children's
    host(16, own="/batch/step")
    (tmp_path / "cgroup/batch/cpu.max").write_text("400000 100000\n")
    devices._own_cores.cache_clear()
    assert usable_cores() == 4
    # cgroup v1
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct/cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu,cpuacct/cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1, tmp_path / "missing") == 3.0
    (v1 / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1, tmp_path / "missing") is None


def test_every_thread_count_comes_from_the_usable_cores(host, gpus, tmp_path):
    """Extraction workers, training passes, streaming readers: the 3 cores of the affinity, not the host's 64."""
    from pipeline.devices import decode_workers_for, torch_threads_per_worker
    from pipeline.train import parallel_plan

    host(3)
    gpus(0)
    cfg = config_from_dict({"encoder": {"device": "cpu"}})
    assert torch_threads_per_worker(cfg) == 3 and decode_workers_for(cfg) == 3
    two = config_from_dict({"encoder": {"device": "cpu"}, "dask": {"n_workers": 2}})
    assert torch_threads_per_worker(two) == 1
    assert parallel_plan(TrainConfig(device="cpu"), 4) == (3, 1)
    assert parallel_plan(TrainConfig(device="cpu"), 1) == (1, 3)


# ---- devices ----------------------------------------------------------------------------------------------------
def test_cuda_n_is_a_device_and_a_bad_one_says_what_to_change(gpus):
    gpus(4)
    assert resolve_device("cuda:3") == torch.device("cuda:3")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match=r"train.device is 'cuda:4' but torch sees 4 CUDA device\(s\)"):
        resolve_device("cuda:4", "train.device")
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="encoder.device is 'cuda' but torch sees no CUDA device"):
        resolve_device("cuda", "encoder.device")
    assert config_from_dict({"train": {"device": "cuda:2"}, "encoder": {"device": "cuda:7"}}).train.device == "cuda:2"
    with pytest.raises(ConfigError, match="'train.device' in .*--set train.device=gpu0"):
        config_from_dict({}, overrides=["train.device=gpu0"])


def test_workers_are_spread_one_per_gpu(gpus, host):
    host(32)
    gpus(4)
    plan = plan_workers("auto")
    assert plan == WorkerPlan(("0", "1", "2", "3"), threads=8, device_share=1, host_share=4)
    assert [plan.env(i) for i in range(4)] == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
    # more workers than GPUs: dealt round-robin, two to a GPU, each GPU's memory budget halved
    assert plan_workers("cuda", 8) == WorkerPlan(("0", "1", "2", "3") * 2, 4, 2, 8)
    assert plan_workers("cuda", 3, threads=5) == WorkerPlan(("0", "1", "2"), 5, 1, 3)
    # cuda:N pins every worker to that GPU (no CUDA_VISIBLE_DEVICES: they address it as cuda:N)
    assert plan_workers("cuda:2", 3) == WorkerPlan((None,) * 3, 10, 3, 3)
    assert plan_workers("cpu") == WorkerPlan((None,), 32, 1, 1)
    # a job given GPUs 4 and 6 of a host: workers stay inside them
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,6"
    gpus(2)
    os.environ["CUDA_VISIBLE_DEVICES"] = "4,6"
    try:
        assert plan_workers("auto").gpus == ("4", "6")
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]
    gpus(0)
    assert plan_workers("auto", 2) == WorkerPlan((None, None), 16, 1, 2)


def test_training_passes_one_per_gpu(gpus, host):
    from pipeline.train import parallel_plan, pass_plan

    host(16)
    variants = ["baseline", "film", "structural", "full"]
    gpus(8)
    assert pass_plan(TrainConfig(), variants) == ([[v] for v in variants], 4, 4)  # 4 passes on 4 of 8 GPUs
    gpus(2)
    assert pass_plan(TrainConfig(), variants) == ([["baseline", "structural"], ["film", "full"]], 2, 8)
    assert pass_plan(TrainConfig(device="cuda:1"), variants) == ([variants], 1, 16)
    gpus(1)
    assert parallel_plan(TrainConfig(), 4) == (1, 16)


def test_a_gpu_memory_budget_is_divided_among_the_trainings_on_it(monkeypatch, demo_cfg):
    from pipeline import train
    from pipeline.layout import RunContext
    from pipeline.memory import GPU_BUDGET_FRACTION, resolve_cache_device

    free = 40 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    need = int(free * GPU_BUDGET_FRACTION / 3)  # fits a third of the budget
    cuda = torch.device("cuda", 0)
    assert resolve_cache_device("auto", need, cuda, device_share=3) == "cuda"
    assert resolve_cache_device("auto", need + 1, cuda, device_share=3) != "cuda"
    assert resolve_cache_device("auto", need + 1, cuda) == "cuda"  # one training alone
    # training hands its share to the loader
    class Seen(Exception):
        pass

    def loader(*args, **kwargs):
        raise Seen(kwargs)

    monkeypatch.setattr(train, "CachedBatches", loader)
    cfg = config_from_dict(dump_config(demo_cfg), overrides=["train.device_share=3"])
    with pytest.raises(Seen) as seen:
        train.build_sources(RunContext.of(cfg), [0], torch.device("cpu"))
    assert seen.value.args[0]["device_share"] == 3


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
def test_a_local_cluster_gives_each_worker_its_own_gpu():
    """The cluster the flows start: one process per planned worker, each with its own CUDA_VISIBLE_DEVICES."""
    from distributed import Client

    plan = WorkerPlan(("3", "5"), threads=1, device_share=1, host_share=2)
    with devices.local_cluster(plan) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["3", "5"]


# ---- the extraction's encoder settings --------------------------------------------------------------------------
def test_auto_encoder_settings_follow_the_device(gpus):
    gpus(1)
    assert encoder_settings(EncoderConfig()).describe() == {"device": "cuda", "batch_size": 64,
                                                            "autocast_dtype": "bfloat16", "tf32": True}
    assert encoder_settings(EncoderConfig(device="cuda:1")).batch_size == 64
    assert encoder_settings(EncoderConfig(device="cpu")).describe() == {"device": "cpu", "batch_size": 8,
                                                                        "autocast_dtype": "float32", "tf32": False}
    explicit = EncoderConfig(batch_size=16, dtype="float16")
    assert (encoder_settings(explicit).batch_size, encoder_settings(explicit).autocast) == (16, torch.float16)
    gpus(0)
    assert encoder_settings(EncoderConfig()).describe() == {"device": "cpu", "batch_size": 8,
                                                            "autocast_dtype": "float32", "tf32": False}
    resolved = with_encoder_settings(config_from_dict({}))
    assert (resolved.encoder.batch_size, resolved.encoder.dtype) == (8, "float32")


# The demo config's fingerprints before encoder.dtype could be 'auto' (computed on 0a0ead0 with the same stand-ins
# for the split file's hash and the encoder's identity): the CPU demo keeps the caches it has.
DEMO_FINGERPRINTS_0A0EAD0 = {"train": "d5492c06c80e005a", "val": "483efcb8476ac730", "test": "b229cbe217a1983e"}


def test_the_cpu_demo_keeps_its_fingerprint_and_a_gpu_changes_it(gpus, monkeypatch):
    from pipeline import fingerprint as fp

    monkeypatch.setattr(fp, "file_sha256", lambda path: "0" * 64)
    identity = {"name": "dinov2-small-imgfocus", "revision": None, "weights_sha256": "1" * 64, "width": 384,
                "grid": 12, "image_size": 168, "mean": [0.5] * 3, "std": [0.25] * 3}
    # The demo's decoder of 0a0ead0 (four stages, layers [0, 1, 2, 3, 6, 9, 12]): the stores those fingerprints name.
    cfg = load_config("demo", ["decoder.channels=[64,32,16,8]", "decoder.semantic_layers=[12,9,6,3]"])
    assert cfg.encoder.dtype == "auto"
    of = lambda cfg: {s: fp.fingerprint(fp.fingerprint_inputs(cfg, s, identity)) for s in DEMO_FINGERPRINTS_0A0EAD0}
    gpus(0)
    assert fp.fingerprint_inputs(cfg, "test", identity)["autocast_dtype"] == "float32"
    assert of(cfg) == DEMO_FINGERPRINTS_0A0EAD0
    gpus(1)  # bf16 autocast on a GPU: other bytes, another fingerprint, saying why
    assert fp.fingerprint_inputs(cfg, "test", identity)["autocast_dtype"] == "bfloat16"
    assert all(a != b for a, b in zip(of(cfg).values(), DEMO_FINGERPRINTS_0A0EAD0.values()))
    assert of(config_from_dict(dump_config(cfg), overrides=["encoder.dtype=float32"])) == DEMO_FINGERPRINTS_0A0EAD0


def test_the_store_says_what_ran(demo_cfg):
    from pipeline.layout import RunContext

    store = RunContext.of(demo_cfg).open_store("val")
    assert store.attrs["extraction"] == {"device": "cpu", "batch_size": 8, "autocast_dtype": "float32",
                                         "tf32": False}


def test_tasks_are_a_few_runs_of_chunks_per_worker():
    """Few, large tasks (each builds a decode pool and its buffers): two per worker and store."""
    from pipeline.devices import TASKS_PER_WORKER, chunk_jobs

    kitti = [("train", "t", c) for c in range(1304)] + [("val", "v", c) for c in range(145)]
    shards = chunk_jobs(kitti, n_workers=8)
    assert TASKS_PER_WORKER == 2
    assert [len(s[2]) for s in shards if s[1] == "t"] == [82] * 15 + [1304 - 15 * 82]
    assert [len(s[2]) for s in shards if s[1] == "v"] == [10] * 14 + [5]
    assert [c for s in shards for c in s[2]] == [c for _, _, c in kitti]  # every chunk once, in order
    assert len(chunk_jobs(kitti, n_workers=1)) == 4
    small = [("train", "a", c) for c in range(10)] + [("val", "b", 0), ("val", "b", 3)]
    assert [s[2] for s in chunk_jobs(small, 1)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0], [3]]
    assert [len(s[2]) for s in chunk_jobs(small, 6)] == [1] * 12


@pytest.mark.slow
def test_features_gathered_per_chunk_on_the_device_are_the_same_bytes(tmp_path):
    """The CUDA path gathers a chunk's features where the encoder runs and copies them back once per chunk
    (`device_chunks`); run on the CPU, it writes the same files, a skipped sample's rows zeros, as the host path."""
    from pipeline.extract import extract_chunks, plan_split, prepare_store
    from pipeline.store import FeatureStore

    data = tmp_path / "data"
    raw = {"data": {"layout": "kitti", "image_root": str(data / "raw"), "depth_root": str(data / "gt"),
                    "train_split": str(data / "splits/eigen_train_files_with_gt.txt"),
                    "test_split": str(data / "splits/eigen_test_files_with_gt.txt"), "on_error": "skip",
                    "val_fraction": 0.25, "synth": {"train": 12, "test": 6, "seed": 3}},
           "encoder": {"name": "tiny-clip", "batch_size": 3, "device": "cpu"},
           "views": {"crop_size": [176, 352], "flip": "extract"},  # the mirrored features too
           "cache": {"root": str(tmp_path / "cache"), "chunk_size": 2, "layers": [0, 2, 12]}}
    cfg = config_from_dict(raw)
    synth.ensure(cfg.data)
    bad = 7
    Path(plan_split(cfg, "train").index["depth_path"][bad]).write_bytes(b"garbage")
    files = []
    for gather in (True, False):
        cfg.cache.root = str(tmp_path / f"gather-{gather}")
        store, _ = prepare_store(cfg, "train")
        extract_chunks(cfg, store.url, store.pending_chunks(), device_chunks=gather)
        root = Path(store.url)
        files.append({str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
                      and p.name != "zarr.json"})
    assert files[0] == files[1] and len(files[0]) > 10
    store = FeatureStore.open(store.url)
    assert store.index().skipped.tolist() == [i == bad for i in range(store.n)]


def test_the_extraction_flow_starts_one_worker_per_gpu(gpus, host):
    """`extract-features` on a 2-GPU host: two worker processes, each seeing its own GPU, half the cores each; with
    `dask.processes: false` threads of the flow's process (they share its devices)."""
    from flows.extract import dask_runner, workers_for

    host(16)
    gpus(2)
    cfg = config_from_dict({})
    plan = workers_for(cfg)
    assert plan == WorkerPlan(("0", "1"), threads=8, device_share=1, host_share=2)
    runner = dask_runner(cfg, plan)
    assert runner.cluster_class is devices.local_cluster and runner.cluster_kwargs == {"plan": plan}
    threads = dask_runner(config_from_dict({"dask": {"processes": False}}), plan)
    assert threads.cluster_kwargs["processes"] is False and threads.cluster_kwargs["n_workers"] == 2
    assert workers_for(config_from_dict({"encoder": {"device": "cpu"}})) == WorkerPlan((None,), 16, 1, 1)


# ---- glibc's allocator in a worker --------------------------------------------------------------------------------
FAULTS = """
import resource, sys
import numpy as np
from pipeline.devices import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
np.ones(1 << 18).sum()  # 2 MiB (under numpy's 4 MiB for huge pages), once, so that both runs start alike
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    np.ones(1 << 18).sum()  # a 2 MiB activation, freed after use
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow  # end to end (over ~0.75 s): the whole suite runs it, the fast tier does not
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc")  # a check, not the mallopt itself
def test_freed_memory_is_reused_in_a_process_started_as_dask_starts_its_workers():
    """Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536: there each 2 MiB array is a fresh mapping,
    512 page faults a time; after `reuse_freed_memory` the same memory is used again without any."""
    import importlib
    import subprocess
    import sys

    import dask

    importlib.import_module("distributed")  # its config defaults: the nanny's environment

    env = {**os.environ, **{k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()}}
    assert env["MALLOC_TRIM_THRESHOLD_"] == "65536"
    faults = {how: int(subprocess.run([sys.executable, "-c", FAULTS, how], env=env, check=True, text=True,
                                      capture_output=True).stdout) for how in ("as-started", "reuse")}
    assert faults["as-started"] >= 50 * 512 * 0.9, faults  # every array's pages faulted in again
    assert faults["reuse"] < 50 * 512 * 0.05, faults
