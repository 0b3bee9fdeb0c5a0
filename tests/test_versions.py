"""`spaceclip version -v` against the lock file of tested versions (constraints.txt, issue 15)."""

from __future__ import annotations

import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from flows.cli import print_version

ROOT = Path(__file__).resolve().parent.parent
TORCH = Version(md.version("torch")).public  # the installed release without its build tag: 2.13.0+cpu -> 2.13.0


def version_output(capsys, lock: Path) -> list[str]:
    assert print_version(True, lock) == 0
    return capsys.readouterr().out.splitlines()


def test_shipped_lock_pins_torch_and_not_the_project():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert Version(pins["torch"]).local is None  # no build tag: a +cpu and a CUDA build of it both satisfy it
    # Every pin lies inside the range pyproject.toml declares, so `pip install -c constraints.txt -e .` resolves.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = sum(declared["optional-dependencies"].values(), [])
    requirements = {canonicalize_name(Requirement(r).name): Requirement(r) for r in declared["dependencies"] + extras}
    pinned = {canonicalize_name(name): version for name, version in pins.items()}
    assert "torch" in requirements
    for name in requirements.keys() & pinned.keys():
        assert requirements[name].specifier.contains(pinned[name], prereleases=True), (requirements[name], pinned[name])
    assert not [name for name in pins if name.lower().startswith(("nvidia-", "spaceclip"))]
    assert {"prefect", "zarr", "transformers", "hypothesis"} <= set(pins)


def test_version_reports_matching_and_differing_pins(tmp_path, capsys):
    lock = tmp_path / "constraints.txt"
    lock.write_text(f"# tested\ntorch=={TORCH}\nzarr=={md.version('zarr')}\nPyYAML=={md.version('pyyaml')}\n")
    out = version_output(capsys, lock)
    assert f"zarr {md.version('zarr')}" in out and any(line.startswith(f"torch {TORCH}") for line in out)
    assert out[-1] == f"tested versions: all 3 packages pinned in {lock} are installed at those versions"

    lock.write_text(f"torch=={TORCH}\nzarr==0.0.1\nno-such-package-xyz==1.0\nnumpy=={md.version('numpy')}\n")
    out = version_output(capsys, lock)
    assert f"zarr {md.version('zarr')}  (tested: 0.0.1)" in out
    assert out[-3:] == [
        f"tested versions: 2 of 4 packages differ from {lock} (`pip install -c constraints.txt -e .[test,onnx]` "
        "installs the tested ones):",
        "  no-such-package-xyz (not installed), tested 1.0",
        f"  zarr {md.version('zarr')}, tested 0.0.1",
    ]


def test_version_without_a_lock_says_so(tmp_path, capsys):
    out = version_output(capsys, tmp_path / "missing.txt")
    assert out[-1] == f"tested versions: no lock file at {tmp_path / 'missing.txt'} (an installed copy, not a checkout)"


def test_dash_dash_version_is_the_version_command(capsys, monkeypatch):
    from flows.cli import main
    from tests.conftest import keep_main_env

    keep_main_env(monkeypatch)
    assert main(["version"]) == 0
    want = capsys.readouterr().out
    assert want == f"spaceclip {md.version('spaceclip-pipeline')}\n"
    assert main(["--version"]) == 0 and capsys.readouterr().out == want
    assert main(["--version", "extract", "--help"]) == 0 and capsys.readouterr().out == want  # eager: nothing else
