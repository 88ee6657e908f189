#!/usr/bin/env bash
# The served GPU benchmark (benchmarks/bench_gpu_served.py: SD2.1 768 px in a real Triton server,
# torch engine, one GPU) and the library-level one beside it (benchmarks/bench_gpu.py, eager and
# --cuda-graphs), on the lent GPU machine, from what benchmarks/gpu/pack_server.sh packed here.
#
#   Device tool: command `bash benchmarks/gpu/run_served.sh`, carry ["benchmarks/gpu/carry"],
#                timeout_s 540 (the steps' own limits end it within 8 minutes).
#   Dry run here: bash benchmarks/gpu/pack_server.sh
#                 OUT=/tmp/gpu-dry bash benchmarks/gpu/run_served.sh --tiny --device cpu
#
# 1. unpacks the server into a temporary folder; 2. makes two virtual environments over
#    $PYTHON's (its packages seen through a .pth file, nothing of it changed) and installs the
#    carried wheels offline where that environment lacks them or has another version: "models"
#    (what the Triton models run in: numpy<2, which Triton 2.51's stub needs, diffusers, this
#    driffusion) and "driver" (the benchmarks and the gRPC client: the machine's numpy,
#    diffusers, tritonclient, this driffusion); 3. checks that both import and that the stub's
#    libraries resolve; 4. the served benchmark (the most important numbers: k=4 first, then k=8);
#    5. bench_gpu.py eager; 6. bench_gpu.py --cuda-graphs (on a GPU only). Each step has a time
#    limit and writes its tables as soon as they are measured, so a step that fails or runs out of
#    time leaves the others' results.
#
# Arguments go to bench_gpu_served.py; --tiny, --device, --steps, --repeats, --seed and --k (one
# k, default 4) also to bench_gpu.py. Environment: PYTHON (default .venv/bin/python where there
# is one, else python3), CARRY (default benchmarks/gpu/carry), OUT (default out/), WRITE=0 (no
# --write), SERVED_S, LIBRARY_S, GRAPHS_S (time limits of steps 4-6, seconds).
#
# $OUT: run.log (all of the output), gpu_served.md, server-4.log, server-8.log, bench_gpu.md,
# bench_gpu_graphs.md and BENCHMARKS.md (this checkout's, with the sections the runs wrote:
# gpu-served, gpu, gpu-graphs).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
out="${OUT:-$root/out}"
mkdir -p "$out"

main() {
  local begin python carry tmp write status=0 served_ok=1 cpu=0 lib_args=() k=4 args=("$@")
  begin=$(date +%s)
  python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
  fi
  carry="${CARRY:-$here/carry}"
  if [ ! -f "$carry/triton-server.tar.xz" ]; then
    echo "no $carry/triton-server.tar.xz: run benchmarks/gpu/pack_server.sh first and carry it"
    return 2
  fi
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --tiny) lib_args+=(--tiny) ;;
      --device | --steps | --repeats | --seed) lib_args+=("${args[i]}" "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --device=* | --steps=* | --repeats=* | --seed=*) lib_args+=("${args[i]}") ;;
      --k) k="${args[i + 1]:-4}"; i=$((i + 1)) ;;
      --k=*) k="${args[i]#--k=}" ;;
    esac
    case "${args[i]}" in cpu | --device=cpu) cpu=1 ;; esac
  done
  lib_args+=(--k "$k")
  write=--write
  [ "${WRITE:-1}" = 0 ] && write=
  # the CPU dry run starts its servers on 2 cores: minutes, where the GPU machine takes seconds
  local served_s="${SERVED_S:-$((cpu ? 900 : 270))}" library_s="${LIBRARY_S:-$((cpu ? 300 : 75))}"
  local graphs_s="${GRAPHS_S:-90}"
  export DRIFFUSION_COMMIT
  DRIFFUSION_COMMIT="$(cat "$carry/COMMIT" 2>/dev/null || echo unknown)"
  cp BENCHMARKS.md "$out/BENCHMARKS.md"
  export DRIFFUSION_BENCHMARKS="$out/BENCHMARKS.md" # --write goes into the copy in $OUT
  tmp="$(mktemp -d /tmp/driffusion-gpu.XXXXXX)"
  trap 'rm -rf "$tmp"' EXIT # main runs in a subshell (the pipeline into tee)
  export DRIFFUSION_CACHE="$tmp/cache" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

  echo "== machine (packed commit $DRIFFUSION_COMMIT)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  "$python" -c 'import sys, sysconfig, numpy, torch
print("python", sys.version.split()[0], sys.executable, "| libpython", sysconfig.get_config_var("LIBDIR"),
      sysconfig.get_config_var("LDLIBRARY"), "| numpy", numpy.__version__, "| torch", torch.__version__,
      "cuda", torch.cuda.is_available())' || return 2

  echo "== 1. unpack the server ($(($(date +%s) - begin)) s)"
  mkdir "$tmp/triton" || return 2
  if command -v xz >/dev/null; then
    tar -xJf "$carry/triton-server.tar.xz" -C "$tmp/triton" || return 2
  else # no xz binary: Python's tarfile reads .tar.xz itself
    "$python" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as pack:
    kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    pack.extractall(sys.argv[2], **kw)' "$carry/triton-server.tar.xz" "$tmp/triton" || return 2
  fi
  du -sh "$tmp/triton"
  df -h /dev/shm "$tmp" | sed 's/^/  /' # the python backend's shared memory; the models' files

  echo "== 2. environments ($(($(date +%s) - begin)) s)"
  make_env "$tmp/models" numpy diffusers importlib_metadata driffusion || served_ok=0
  make_env "$tmp/driver" diffusers importlib_metadata tritonclient python_rapidjson protobuf \
    driffusion || return 2 # every step needs it

  echo "== 3. checks ($(($(date +%s) - begin)) s)"
  [ "$served_ok" = 1 ] && "$tmp/models/bin/python" -c 'import numpy, torch, diffusers, transformers, driffusion
import driffusion.service, driffusion.export.torch_modules
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: the stub needs numpy<2"
assert torch.from_numpy(numpy.arange(3.0)).numpy().sum() == 3
print("models: numpy", numpy.__version__, "torch", torch.__version__, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "driffusion from", driffusion.__file__)' || served_ok=0
  check_driver "$tmp/driver" || served_ok=0
  local pyver libdir stub
  pyver="$("$tmp/models/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  libdir="$("$tmp/models/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')"
  stub="$tmp/triton/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub"
  for binary in "$tmp/triton/pytriton/tritonserver/bin/tritonserver" "$stub"; do
    if [ ! -f "$binary" ]; then
      echo "missing: $binary (the pack has stubs for 3.11 and 3.12)"
      served_ok=0
    elif LD_LIBRARY_PATH="$tmp/triton/nvidia_pytriton.libs:$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      ldd "$binary" | grep "not found"; then
      echo "unresolved libraries of $binary (above)"
      served_ok=0
    fi
  done

  echo "== 4. served benchmark, limit $served_s s ($(($(date +%s) - begin)) s)"
  if [ "$served_ok" = 1 ]; then
    timeout -k 20 "$served_s" "$tmp/driver/bin/python" benchmarks/bench_gpu_served.py \
      --triton "$tmp/triton" --python "$tmp/models/bin/python" --out "$out" $write "$@" \
      || { status=$?; echo "bench_gpu_served.py: exit $status (124: out of time)"; }
  else
    echo "skipped: the checks above failed"
    status=2
  fi

  echo "== 5. library benchmark, eager, limit $library_s s ($(($(date +%s) - begin)) s)"
  timeout -k 20 "$library_s" "$tmp/driver/bin/python" benchmarks/bench_gpu.py "${lib_args[@]}" \
    $write >"$out/bench_gpu.md" || { status=$?; echo "bench_gpu.py: exit $status"; }
  cat "$out/bench_gpu.md"

  echo "== 6. library benchmark, CUDA graphs, limit $graphs_s s ($(($(date +%s) - begin)) s)"
  if [ "$cpu" = 0 ] && "$tmp/driver/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    timeout -k 20 "$graphs_s" "$tmp/driver/bin/python" benchmarks/bench_gpu.py --cuda-graphs \
      "${lib_args[@]}" $write >"$out/bench_gpu_graphs.md" || { status=$?; echo "exit $status"; }
    cat "$out/bench_gpu_graphs.md"
  else
    echo "skipped: no CUDA device"
  fi
  echo "== done in $(($(date +%s) - begin)) s, status $status; results in $out: $(ls "$out" | tr '\n' ' ')"
  return "$status"
}

# A virtual environment at $1 over $python's packages, with the carried wheels of the packages
# $2... installed where that environment lacks them or has another version (driffusion: always).
make_env() {
  local env="$1"
  shift
  "$python" -m venv --without-pip "$env" || return 1
  "$env/bin/python" - "$python" "$carry/wheels" "$@" <<'PY'
import importlib.metadata, json, re, site, subprocess, sys, sysconfig
from pathlib import Path

parent, wheels, packages = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
sites = json.loads(subprocess.run(
    [parent, "-c", "import json, site; print(json.dumps(site.getsitepackages()))"],
    capture_output=True, text=True, check=True).stdout)
own = Path(sysconfig.get_paths()["purelib"])
(own / "_parent_environment.pth").write_text("".join(f"import site; site.addsitedir({s!r})\n" for s in sites))
for s in sites:
    site.addsitedir(s)
try:
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
supported = set(sys_tags())
install = []
for package in packages:
    found = [(w, *parse_wheel_filename(w.name)) for w in sorted(wheels.glob("*.whl"))]
    found = [f for f in found if f[1] == canonicalize_name(package)]
    if not found:
        sys.exit(f"no wheel of {package} in {wheels}")
    wheel, name, version, _build, tags = found[-1]
    try:
        have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have == str(version) and name != "driffusion":
        print(f"  {name} {have}: already there")
    elif not tags & supported:
        print(f"  {name}: the carried wheel {wheel.name} is for another Python; keeping {have}")
    else:
        print(f"  {name}: {have or 'missing'} -> {version}")
        install.append(str(wheel))
if install:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--force-reinstall", *install], check=True)
PY
}

# The driver's gRPC client imports, or is made to: tritonclient's generated code checks the
# protobuf and grpcio versions it was generated with (grpcio is not carried: too large).
check_driver() {
  local env="$1" err
  err="$(mktemp)"
  local check='import tritonclient.grpc, diffusers, numpy, driffusion.client
print("driver: numpy", numpy.__version__, "diffusers", diffusers.__version__, "driffusion from", driffusion.__file__)'
  "$env/bin/python" -c "$check" 2>"$err" && return 0
  cat "$err"
  if grep -q "Protobuf Gencode/Runtime" "$err"; then
    echo "protobuf older than tritonclient's generated code: TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK"
    export TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK=true
  elif grep -q "grpc package installed is at version" "$err"; then
    echo "grpcio older than tritonclient's generated code: its version check switched off here"
    sed -i 's/^\( *\)_version_not_supported = first_version_is_lower(.*/\1_version_not_supported = False/' \
      "$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tritonclient/grpc/service_pb2_grpc.py"
  else
    return 1
  fi
  "$env/bin/python" -c "$check"
}

set -o pipefail
main "$@" 2>&1 | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
