#!/usr/bin/env bash
# Download, on a machine with network, the wheels that benchmarks/bench_gpu.py needs on the lent GPU
# machine (Python 3.12, x86-64, torch and numpy already there, no network) into
# benchmarks/gpu/wheels/ (git-ignored). Versions are this checkout's .venv's, so the device runs
# what the tests here ran. Then run benchmarks/gpu/run_on_device.sh there, carrying that folder.
#
#   bash benchmarks/gpu/fetch_wheels.sh [PYTHON]   # PYTHON: the interpreter whose pip to use
#
# Environment: WHEELS (default benchmarks/gpu/wheels), PYTHON_VERSION (default 3.12, the device's).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${1:-$root/.venv/bin/python}"
wheels="${WHEELS:-$here/wheels}"
mkdir -p "$wheels"

# Pin every package to the version installed here (torch and the project itself excluded).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$python" -m pip list --format=freeze --exclude-editable | grep -v -i -E '^(torch|driffusion)==' \
  >"$constraints"
pin() { grep -i -E "^$1==" "$constraints"; }

# diffusers and transformers with their whole dependency closure, as wheels for CPython on
# manylinux x86-64.
"$python" -m pip download --dest "$wheels" --constraint "$constraints" \
  --only-binary=:all: --implementation cp --python-version "${PYTHON_VERSION:-3.12}" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform linux_x86_64 \
  "$(pin diffusers)" "$(pin transformers)"

# The device has its own numpy (and torch's dependencies); leave those to it.
rm -f "$wheels"/numpy-*.whl
du -sh "$wheels"
ls "$wheels"
