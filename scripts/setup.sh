#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it: torch==2.13.0 first, the build chosen by
# scripts/torch_install.py (SPACECLIP_TORCH=auto|cpu|cuda: the CUDA build where an NVIDIA GPU is visible), so that
# nothing else picks torch; then every other package at the version the suite was tested with (constraints.txt;
# refresh it with scripts/refresh-constraints.sh); then a check that torch is still that build.
set -euo pipefail
cd "$(dirname "$0")/.."
args=$(python3 scripts/torch_install.py pip-args)
python3 -m venv .venv
# shellcheck disable=SC2086  # one argument a line, none with spaces
.venv/bin/python -m pip install -q $args
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,onnx]"
.venv/bin/python scripts/torch_install.py check
# The project's Prefect database (.prefect/, where `spaceclip` keeps its flow runs) made now rather than by the
# first command: its migrations take ~9 s of 2 cores. Skipped, with the reason, if it fails: the first command
# then migrates it itself.
PREFECT_HOME="$PWD/.prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false \
  .venv/bin/prefect server database upgrade -y > /dev/null \
  || echo "setup: the Prefect database was not created now; the first spaceclip command creates it"
