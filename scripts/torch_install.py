"""Which torch build scripts/setup.sh installs, and what its check after the install accepts.

Plain python3, standard library only: setup.sh runs it before anything is installed.

    python3 scripts/torch_install.py pip-args   # the `pip install` arguments for torch, one a line
    .venv/bin/python scripts/torch_install.py check   # the installed torch against the choice; exit 1 with why

The choice comes from SPACECLIP_TORCH (auto, the default | cpu | cuda):
- cuda, or auto on Linux with an NVIDIA GPU visible: the package index's torch, which on Linux is the CUDA build and
  requires the nvidia-* CUDA wheels (several GB); those are expected.
- cpu: the CPU build from the PyTorch CPU index (about 0.2 GB); no nvidia-* package may be installed.
- auto without a visible GPU: the plain pin, whatever build the package index offers. A CPU build (`+cpu`, e.g. from a
  local wheel) then allows no nvidia-* package; the default Linux build (CUDA) is accepted with a note of its cost
  and of SPACECLIP_TORCH=cpu, since it also runs on the CPU.
SPACECLIP_TORCH_INDEX replaces the index for any choice (e.g. https://download.pytorch.org/whl/cu126 for a driver
older than the default build's CUDA).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TORCH_VERSION = "2.13.0"  # the version the suite was tested with (constraints.txt)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CHOICES = ("auto", "cpu", "cuda")


class SetupError(ValueError):
    """A choice or an installed torch that setup must stop on; the message says what to change."""


@dataclass(frozen=True)
class Plan:
    choice: str  # "cpu", "cuda" or "index" (auto without a visible GPU: whichever build the index offers)
    pip_args: tuple[str, ...]
    reason: str


def plan(platform: str, gpu_visible: bool, choice: str | None = None, index: str | None = None) -> Plan:
    """The torch install for a host. `platform`: sys.platform; `gpu_visible`: an NVIDIA driver answers
    (`nvidia_gpu_visible()`); `choice`: SPACECLIP_TORCH; `index`: SPACECLIP_TORCH_INDEX."""
    choice = (choice or "auto").strip().lower()
    if choice not in CHOICES:
        raise SetupError(f"SPACECLIP_TORCH={choice!r}: expected one of {', '.join(CHOICES)}")
    linux = platform.startswith("linux")
    if choice == "cuda" and not linux:
        raise SetupError(f"SPACECLIP_TORCH=cuda: the package index has CUDA builds of torch for Linux only, not "
                         f"{platform}; use SPACECLIP_TORCH=auto")
    if choice == "auto":
        if linux and gpu_visible:
            choice, reason = "cuda", "an NVIDIA GPU is visible: the CUDA build"
        else:
            choice, reason = "index", "no NVIDIA GPU visible: the package index's build"
    else:
        reason = f"SPACECLIP_TORCH={choice}"
    args = [f"torch=={TORCH_VERSION}"]
    if index:
        args += ["--index-url", index]
        reason += f" from {index}"
    elif choice == "cpu" and linux:
        # PyPI's Linux torch is the CUDA build; the CPU build lives on PyTorch's own index (which also serves
        # torch's dependencies, so --index-url, not --extra-index-url).
        args += ["--index-url", CPU_INDEX]
        reason += f" from {CPU_INDEX}"
    return Plan(choice, tuple(args), reason)


def check(p: Plan, platform: str, torch_version: str | None, dists: list[str]) -> str:
    """What setup says about the installed torch: a one-line summary, or SetupError with what to change.
    `torch_version`: the installed torch's version (None: none); `dists`: every installed distribution's name."""
    if torch_version is None:
        raise SetupError("setup: torch is not installed in .venv; run scripts/setup.sh again and read pip's error")
    if torch_version.split("+")[0] != TORCH_VERSION:
        raise SetupError(f"setup: expected torch {TORCH_VERSION} (the tested version), got {torch_version}: "
                         f"a package upgraded it; check constraints.txt")
    cuda = sorted(d for d in dists if d.lower().replace("_", "-").startswith("nvidia-"))
    cpu_build = torch_version.endswith("+cpu") or not platform.startswith("linux")
    if p.choice == "cuda" and cpu_build:
        raise SetupError(f"setup: the CUDA build was wanted ({p.reason}), but pip installed torch {torch_version}, "
                         f"a CPU build (a CPU wheel in pip's find-links or index?); remove it from there, or set "
                         f"SPACECLIP_TORCH=cpu to keep it")
    if p.choice == "cpu" and not cpu_build:
        raise SetupError(f"setup: SPACECLIP_TORCH=cpu, yet pip installed torch {torch_version}, not a CPU build; "
                         f"unset SPACECLIP_TORCH_INDEX so that it comes from {CPU_INDEX}")
    if cpu_build and cuda:
        raise SetupError(f"setup: torch {torch_version} is a CPU build, yet CUDA packages were installed "
                         f"({', '.join(cuda)}): another package pulled them; its Required-by line names it: "
                         f"`.venv/bin/python -m pip show {cuda[0]}`")
    if cpu_build:
        return f"setup: torch {torch_version} (CPU build), no CUDA packages"
    line = f"setup: torch {torch_version} (CUDA build), {len(cuda)} CUDA packages"
    if p.choice == "index":
        line += ("; no NVIDIA GPU is visible, so these several GB are unused: `rm -r .venv && "
                 "SPACECLIP_TORCH=cpu bash scripts/setup.sh` installs the CPU build instead")
    return line


def nvidia_gpu_visible() -> bool:
    """Whether an NVIDIA driver is loaded here (the kernel module's /proc entry, or nvidia-smi lists a GPU)."""
    if Path("/proc/driver/nvidia/version").exists():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def current_plan(environ=os.environ) -> Plan:
    return plan(sys.platform, nvidia_gpu_visible(), environ.get("SPACECLIP_TORCH"),
                environ.get("SPACECLIP_TORCH_INDEX") or None)


def installed() -> tuple[str | None, list[str]]:
    import importlib.metadata as md

    names = [d.metadata["Name"] for d in md.distributions()]
    try:
        return md.version("torch"), names
    except md.PackageNotFoundError:
        return None, names


def main(argv: list[str]) -> int:
    try:
        if argv == ["pip-args"]:
            p = current_plan()
            print(f"setup: torch {TORCH_VERSION}, {p.reason}", file=sys.stderr)
            print("\n".join(p.pip_args))
        elif argv == ["check"]:
            print(check(current_plan(), sys.platform, *installed()))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except SetupError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
