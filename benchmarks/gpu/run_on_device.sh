#!/usr/bin/env bash
# Run benchmarks/bench_gpu.py on the lent GPU machine (torch and numpy, no diffusers, no network).
#
# Device tool: command `bash benchmarks/gpu/run_on_device.sh --write`, carry
# ["benchmarks/gpu/wheels"] (fetch them first with benchmarks/gpu/fetch_wheels.sh), timeout 600 s.
# Writes $OUT/bench_gpu.md (eager), $OUT/bench_gpu_graphs.md (UNet replayed from CUDA graphs) and
# $OUT/BENCHMARKS.md (the device's copy: with --write, its gpu and gpu-graphs sections).
# Arguments go to both runs (e.g. --write, --repeats 5). Environment: PYTHON (default python3),
# WHEELS (default benchmarks/gpu/wheels), OUT (default out/).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/out}"
mkdir -p "$out"
python="${PYTHON:-python3}"

# 1. diffusers, transformers and their dependencies, offline from the carried wheels; pip
#    resolves against what is installed, so torch, numpy and the like are left as they are.
wheels="${WHEELS:-$root/benchmarks/gpu/wheels}"
if ! "$python" -c "import diffusers, transformers" 2>/dev/null; then
  if [ ! -d "$wheels" ]; then
    echo "no diffusers here and no $wheels: run benchmarks/gpu/fetch_wheels.sh and carry it" >&2
    exit 2
  fi
  "$python" -m pip install --quiet --no-index --find-links "$wheels" diffusers transformers \
    || exit 2
fi

# 2. this checkout's driffusion, uninstalled: the package `driffusion` is the folder
#    orchestrator/ with export/ as `driffusion.export` (pyproject.toml); link them into a
#    temporary folder on PYTHONPATH.
if ! "$python" -c "import driffusion.export.tiny" 2>/dev/null; then
  shim="$(mktemp -d)"
  mkdir "$shim/driffusion"
  ln -s "$root"/orchestrator/*.py "$shim/driffusion/"
  ln -s "$root/export" "$shim/driffusion/export"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 3. eager first, so its table survives if the graph capture fails.
status=0
"$python" benchmarks/bench_gpu.py "$@" >"$out/bench_gpu.md" || status=$?
cat "$out/bench_gpu.md"
"$python" benchmarks/bench_gpu.py --cuda-graphs "$@" >"$out/bench_gpu_graphs.md" || status=$?
cat "$out/bench_gpu_graphs.md"
cp BENCHMARKS.md "$out/BENCHMARKS.md"
exit "$status"
