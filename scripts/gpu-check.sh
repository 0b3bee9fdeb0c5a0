#!/usr/bin/env bash
# bench/gpu_check.py on a machine with no network whose python already holds a CUDA torch, transformers, numpy,
# pandas, pillow, ... but not the project's other dependencies: a venv that sees that python's packages, the
# carried wheels (scripts/fetch-gpu-wheels.sh; pip --no-index, nothing fetched), the project (no deps), then
# the check, whose JSON is the last thing printed. Arguments go to bench/gpu_check.py.
#
#   bash scripts/gpu-check.sh --json "$OUT/gpu_check.json"
#   PYTHON=/path/to/python WHEELS=.whl-311 bash scripts/gpu-check.sh --device cpu --frames 16   # a rehearsal
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
venv=${GPU_CHECK_VENV:-/tmp/spaceclip-gpu-check}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
ls "$wheels"/*.whl > /dev/null || { echo "gpu-check: no wheels in $wheels (scripts/fetch-gpu-wheels.sh)" >&2; exit 2; }
rm -rf "$venv"
# No pip in the venv (a system python may lack ensurepip): the creating python's pip installs into it (--target).
"$py" -m venv --system-site-packages --without-pip "$venv"
# A venv made from another venv (as the GPU image's python is) sees the base interpreter's packages, not that
# venv's: name the creating python's site-packages in a .pth, after the venv's own.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$py" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
  > "$site/_gpu_check_base.pth"
"$py" -m pip install -q --no-index --no-deps --no-cache-dir --no-compile --target "$site" "$wheels"/*.whl
# The project itself as a path in the venv: what `pip install -e . --no-deps` amounts to, without the build backend
# (setuptools, wheel) that an offline editable install would need from the machine.
pwd > "$site/_spaceclip_project.pth"
exec "$venv/bin/python" bench/gpu_check.py "$@"
