#!/usr/bin/env bash
# Refresh constraints.txt, the versions the test suite passed with (scripts/setup.sh and .ci/run install exactly
# these with `pip install -c constraints.txt`):
#   1. a scratch venv (in a temporary folder) gets torch==2.13.0, then the project with the newest versions pyproject.toml
#      allows (no constraints);
#   2. the suite runs in it; only if it passes is that venv's `pip freeze` written to constraints.txt (the project
#      itself left out, torch written as 2.13.0 without a local +cpu tag so that any 2.13.0 build satisfies it).
# Then review `git diff constraints.txt` and commit it with the code it was tested with.
#
#   scripts/refresh-constraints.sh               # steps 1 and 2 (the suite takes ~15 min on 2 cores)
#   scripts/refresh-constraints.sh --freeze VENV # only write VENV's versions (you ran the suite in VENV yourself)
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

freeze() {  # $1: a venv whose suite run passed
  {
    echo "# The versions the test suite passed with ($(date -u +%Y-%m-%d), python $("$1/bin/python" -c 'import platform; print(platform.python_version())')),"
    echo "# written by scripts/refresh-constraints.sh; scripts/setup.sh installs with -c constraints.txt."
    "$1/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
      | grep -v -i -E '^(spaceclip|-e |#)' \
      | sed -E 's/^torch==([0-9.]+)\+.*$/torch==\1/'
  } > constraints.txt.new
  mv constraints.txt.new constraints.txt
  echo "constraints.txt: $(grep -c '==' constraints.txt) pinned packages from $1"
}

if [ "${1:-}" = "--freeze" ]; then
  freeze "${2:?usage: $0 --freeze VENV}"
  exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
venv="$scratch/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e ".[test,onnx]"
"$venv/bin/python" -c 'import torch, sys; sys.exit(None if torch.__version__.startswith("2.13.0") else f"torch {torch.__version__}: something upgraded torch 2.13.0")'
"$venv/bin/python" -m pytest -q
freeze "$venv"
