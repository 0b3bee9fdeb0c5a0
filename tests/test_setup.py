"""scripts/torch_install.py: which torch build setup installs on which host, and what its check accepts."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "torch_install.py"
_spec = importlib.util.spec_from_file_location("torch_install", SCRIPT)
ti = sys.modules["torch_install"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(ti)

# What `pip list` shows after `pip install torch==2.13.0` from PyPI on Linux x86_64 (the CUDA build's requirements).
CUDA_DISTS = ["torch", "nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "triton", "sympy"]
CPU_DISTS = ["torch", "sympy", "filelock"]


def test_this_machine_and_ci_plain_pin_and_cpu_build_only():
    """(a) No GPU, default choice: the plain pin (a local CPU wheel satisfies it here: no CUDA download, no other
    index); the CPU build passes, and CUDA packages beside a CPU build fail with their names."""
    p = ti.plan("linux", gpu_visible=False)
    assert (p.choice, p.pip_args) == ("index", ("torch==2.13.0",))
    assert ti.check(p, "linux", "2.13.0+cpu", CPU_DISTS) == "setup: torch 2.13.0+cpu (CPU build), no CUDA packages"
    with pytest.raises(ti.SetupError, match=r"CPU build, yet CUDA packages were installed \(nvidia-cublas\)"
                                            r".*pip show nvidia-cublas"):
        ti.check(p, "linux", "2.13.0+cpu", CPU_DISTS + ["nvidia-cublas"])


def test_gpu_host_gets_the_cuda_build_with_its_nvidia_packages():
    """(b) An NVIDIA GPU visible: the index's build (PyPI's Linux torch is the CUDA one) and its nvidia-* packages
    are accepted, which the old check refused on every GPU host."""
    p = ti.plan("linux", gpu_visible=True)
    assert (p.choice, p.pip_args) == ("cuda", ("torch==2.13.0",))
    assert ti.check(p, "linux", "2.13.0", CUDA_DISTS) == "setup: torch 2.13.0 (CUDA build), 3 CUDA packages"
    assert ti.plan("linux", gpu_visible=False, choice="cuda").choice == "cuda"  # e.g. building an image with no GPU
    # a CPU wheel that shadowed the CUDA build is caught: the GPU would sit idle
    with pytest.raises(ti.SetupError, match=r"CUDA build was wanted \(an NVIDIA GPU is visible.*\), but pip "
                                            r"installed torch 2.13.0\+cpu, a CPU build.*SPACECLIP_TORCH=cpu"):
        ti.check(p, "linux", "2.13.0+cpu", CPU_DISTS)


def test_cpu_only_host_with_the_public_index():
    """(c) No GPU and PyPI's CUDA build: accepted (it runs on the CPU) with the cost and the way to the CPU build;
    SPACECLIP_TORCH=cpu takes the CPU index and then allows no nvidia-* package."""
    p = ti.plan("linux", gpu_visible=False, choice="auto")
    line = ti.check(p, "linux", "2.13.0", CUDA_DISTS)
    assert line.startswith("setup: torch 2.13.0 (CUDA build), 3 CUDA packages; no NVIDIA GPU is visible")
    assert "SPACECLIP_TORCH=cpu bash scripts/setup.sh" in line
    cpu = ti.plan("linux", gpu_visible=False, choice="CPU ")
    assert cpu.pip_args == ("torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu")
    assert ti.check(cpu, "linux", "2.13.0+cpu", CPU_DISTS).endswith("(CPU build), no CUDA packages")
    with pytest.raises(ti.SetupError, match=r"SPACECLIP_TORCH=cpu, yet pip installed torch 2.13.0, not a CPU build"):
        ti.check(cpu, "linux", "2.13.0", CUDA_DISTS)
    # even with a GPU visible, an explicit cpu wins
    assert ti.plan("linux", gpu_visible=True, choice="cpu").choice == "cpu"


def test_index_override_version_and_bad_choices():
    p = ti.plan("linux", True, "cuda", index="https://download.pytorch.org/whl/cu126")
    assert p.pip_args == ("torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cu126")
    assert ti.check(p, "linux", "2.13.0+cu126", CUDA_DISTS).startswith("setup: torch 2.13.0+cu126 (CUDA build)")
    with pytest.raises(ti.SetupError, match=r"expected torch 2.13.0 \(the tested version\), got 2.14.1"):
        ti.check(p, "linux", "2.14.1", CUDA_DISTS)
    with pytest.raises(ti.SetupError, match="torch is not installed"):
        ti.check(p, "linux", None, [])
    with pytest.raises(ti.SetupError, match=r"SPACECLIP_TORCH='gpu': expected one of auto, cpu, cuda"):
        ti.plan("linux", True, "gpu")
    with pytest.raises(ti.SetupError, match="CUDA builds of torch for Linux only, not darwin"):
        ti.plan("darwin", False, "cuda")
    # macOS wheels are CPU builds without a +cpu label and need no CPU index
    mac = ti.plan("darwin", False)
    assert mac.pip_args == ("torch==2.13.0",)
    assert ti.check(mac, "darwin", "2.13.0", CPU_DISTS).endswith("(CPU build), no CUDA packages")


def test_cli_on_this_venv():
    """The two commands setup.sh runs, on this machine: the plain pin, and the installed torch passes the check."""
    env = {"PATH": "/usr/bin:/bin", "SPACECLIP_TORCH": "auto"}
    if ti.nvidia_gpu_visible():
        pytest.skip("a GPU is visible here")
    args = subprocess.run([sys.executable, str(SCRIPT), "pip-args"], env=env, capture_output=True, text=True)
    assert (args.returncode, args.stdout) == (0, "torch==2.13.0\n")
    assert "no NVIDIA GPU visible" in args.stderr
    check = subprocess.run([sys.executable, str(SCRIPT), "check"], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("setup: torch 2.13.0")
    bad = subprocess.run([sys.executable, str(SCRIPT), "pip-args"], env={**env, "SPACECLIP_TORCH": "rocm"},
                         capture_output=True, text=True)
    assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", "SPACECLIP_TORCH='rocm': expected one of auto, cpu, "
                                                                "cuda\n")
