#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs on a GPU machine that has no network but already holds a CUDA torch,
# transformers, numpy, pandas, pillow, pyyaml, safetensors, huggingface_hub, tabulate, psutil, tqdm and matplotlib:
# the project's other imports (zarr and its needs, numcodecs, crc32c, imagecodecs, pydantic and its needs, and a
# typing_extensions new enough for pydantic), at the versions of constraints.txt, built for CPython 3.12 on
# manylinux x86_64, into .whl/ (ignored by git; carried to the machine and installed there with
# `pip install --no-index` by scripts/gpu-check.sh). About 38 MB; a device call carries 64 MiB with the tree.
#
#   scripts/fetch-gpu-wheels.sh                     # Python 3.12 into .whl/
#   scripts/fetch-gpu-wheels.sh 3.11 .whl-311       # another Python (e.g. to rehearse the install on this one)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
dest=${2:-.whl}
names=(zarr numcodecs google-crc32c donfig crc32c imagecodecs pydantic pydantic_core annotated-types
       typing-inspection typing-extensions)
specs=()
for n in "${names[@]}"; do  # the tested version of each, from constraints.txt (names compared case-, -/_-blind)
  v=$(python3 - "$n" <<'PY'
import re, sys
want = re.sub(r"[-_.]+", "-", sys.argv[1]).lower()
for line in open("constraints.txt"):
    name, _, version = line.strip().partition("==")
    if version and re.sub(r"[-_.]+", "-", name).lower() == want:
        print(version)
PY
)
  [ -n "$v" ] || { echo "fetch-gpu-wheels: $n is not in constraints.txt" >&2; exit 1; }
  specs+=("$n==$v")
done
rm -rf "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${specs[@]}"
ls -l "$dest"
echo "fetch-gpu-wheels: $(ls "$dest" | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest (the device carries 64 MiB)"
