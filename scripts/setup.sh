#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it: torch==2.13.0 first, so nothing pulls CUDA wheels,
# then every other package at the version the suite was tested with (constraints.txt; refresh it with
# scripts/refresh-constraints.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,onnx]"
# Guard: the project must never upgrade torch or bring CUDA packages.
.venv/bin/python - <<'PY'
import importlib.metadata as md, sys
torch = md.version("torch")
cuda = sorted(d.metadata["Name"] for d in md.distributions() if d.metadata["Name"].lower().startswith("nvidia-"))
if not torch.startswith("2.13.0") or cuda:
    sys.exit(f"setup: expected torch 2.13.0 without CUDA packages, got torch {torch}, {cuda}")
print(f"setup: torch {torch}, no CUDA packages")
PY
