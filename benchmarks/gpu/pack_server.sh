#!/usr/bin/env bash
# Pack, here, what benchmarks/gpu/run_served.sh needs on the lent GPU machine (Python 3.12, torch,
# numpy 2, transformers, grpcio; no diffusers, no tritonserver, no tritonclient, no network) into
# benchmarks/gpu/carry/ (git-ignored), which the device tool carries there:
#
#   carry/triton-server.tar.xz  the parts of the installed nvidia-pytriton wheel that serve our
#                               repository (benchmarks/gpu/server-files.txt: tritonserver, its
#                               libraries, the python backend, the 3.12 stub and this machine's
#                               3.11 one for the dry run), in the wheel's layout
#   carry/wheels/               wheels of what the GPU machine lacks (below) and of this checkout's
#                               driffusion (python -m build --wheel)
#   carry/COMMIT                the commit packed (the device's copy of the tree has no git)
#
#   bash benchmarks/gpu/pack_server.sh [PYTHON]   # PYTHON: default .venv/bin/python
#
# Prints the sizes; fails when the carry is over 60 MiB, or with the working tree (which travels
# too) over the device tool's 64 MiB. Environment: CARRY (default benchmarks/gpu/carry).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${1:-$root/.venv/bin/python}"
carry="${CARRY:-$here/carry}"
limit_mib=60
tool_limit_mib=64
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

rm -rf "$carry"
mkdir -p "$carry/wheels"

# 1. The server, from the installed wheel, in its layout (TritonDistribution.from_folder).
site="$("$python" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).resolve().parent.parent)')"
mapfile -t files < <(grep -v -e '^#' -e '^[[:space:]]*$' "$here/server-files.txt")
for f in "${files[@]}"; do
  [ -f "$site/$f" ] || { echo "pack_server.sh: $site/$f is missing (server-files.txt)" >&2; exit 1; }
done
echo "packing ${#files[@]} files of $site (xz -9e: about 2 minutes on 2 cores) ..."
tar -C "$site" -cf - "${files[@]}" | xz -9e -T0 >"$carry/triton-server.tar.xz"

# 2. Wheels the GPU machine lacks or has in a version that does not work with the server, at
#    this .venv's versions (the ones the tests ran), for CPython 3.12 on x86-64:
#    - numpy 1.26: Triton 2.51's python-backend stub garbles BYTES tensors (the prompt) under
#      numpy 2, which the GPU machine has; the models' environment gets numpy<2 (run_served.sh);
#    - diffusers and importlib_metadata (diffusers imports it; the machine has zipp only);
#    - tritonclient (gRPC) and python-rapidjson, which it imports; protobuf, as new as the one
#      tritonclient's generated code checks for (installed there only where it differs).
version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for package in numpy diffusers importlib_metadata tritonclient python-rapidjson protobuf; do
  pins+=("$package==$(version "$package")")
done
"$python" -m pip download --quiet --no-deps --dest "$carry/wheels" \
  --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform linux_x86_64 "${pins[@]}" 2>&1 \
  | grep -v "^WARNING: Location" >&2 || true
for pin in "${pins[@]}"; do
  name="${pin%%==*}"
  ls "$carry/wheels" | grep -q -i -E "^${name//-/[-_]}-${pin##*==}-" \
    || { echo "pack_server.sh: no wheel of $pin downloaded" >&2; exit 1; }
done

# 3. This checkout's driffusion (installed there with --no-deps: its pins are for this machine).
build_log="$(mktemp)"
if ! "$python" -m build --wheel --outdir "$carry/wheels" "$root" >"$build_log" 2>&1; then
  tail -30 "$build_log" >&2
  exit 1
fi
rm -f "$build_log"

# 4. The commit packed ("-dirty": with changes not committed).
commit="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit-dirty"
fi
echo "$commit" >"$carry/COMMIT"

# 5. Sizes: the carry, and with the working tree that travels with it (tracked and untracked
#    files git does not ignore).
(cd "$carry" && ls -l triton-server.tar.xz wheels/* | awk '{ printf "%10d  %s\n", $5, $9 }')
carry_bytes="$(find "$carry" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')"
tree_bytes="$(cd "$root" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')"
total=$((carry_bytes + tree_bytes))
echo "carry: $(mib "$carry_bytes") MiB in $carry (limit $limit_mib MiB); with the working tree" \
  "($(mib "$tree_bytes") MiB): $(mib "$total") MiB (device tool limit $tool_limit_mib MiB)"
if [ "$carry_bytes" -gt $((limit_mib * 1048576)) ] || [ "$total" -gt $((tool_limit_mib * 1048576)) ]; then
  echo "pack_server.sh: too large" >&2
  exit 1
fi
