"""Build TensorRT engines from the ONNX exports with the TensorRT Python API.

One engine per component, built strongly typed on TensorRT 10 and 11 alike
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; no precision builder flags: ``BuilderFlag.FP16``
is deprecated since 10.12 and removed in 11, where every network is strongly typed and the flag is
accepted and ignored). The engine therefore runs in exactly the ONNX file's types: an fp16 export
(``driffusion.export.onnx``, ``specs.at_precision``) gives an fp16 engine with float16 I/O and the
float32 islands the model asks for (timestep embeddings, upcast attention); an fp32 export an fp32
(TF32 on Ampere and later) engine. The record says which, read from the ONNX weights.

The ONNX file is parsed from disk (so ``model.onnx.data`` beside it is found), the builder gets the
role's optimization profiles (:func:`engine_profiles`: the denoiser has two, see there), a timing
cache loaded from and saved back to a file, and a progress monitor that prints the build phases.
The engine is written atomically, deserialized once to check its tensors against the spec, and
recorded in ``model.plan.json`` beside it; a later build with the same record (ONNX file,
profiles, precision, TensorRT version, GPU model) is skipped unless ``force``.

Engines are specific to the GPU model and the TensorRT version:

- they are built on the GPU they will serve on: :func:`select_device` makes the first listed GPU
  (``--gpus``) the current CUDA device before the build (all listed GPUs are one model,
  :func:`check_gpus`);
- :func:`check_server_tensorrt` refuses to build when the Python ``tensorrt`` differs from the
  ``libnvinfer`` of the Triton server that will load the engines (an engine built by another
  TensorRT version does not deserialize). Inside the engines image the server's library is the
  image's own (docker/Dockerfile); elsewhere set ``DRIFFUSION_SERVER_TENSORRT`` to the server's
  TensorRT version or to the path of its ``libnvinfer.so.X.Y.Z``.

    info = build_engine("work/onnx/denoiser/model.onnx", "repo/denoiser/1/model.plan", spec,
                        engine_profiles(family, max_k=4)["denoiser"], timing_cache="timing.cache")

``tensorrt`` is imported only when a build starts; without it :class:`TensorRTUnavailable` says what
to install.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from driffusion.families import FamilySpec
from driffusion.tensors import DENOISER, ModelSpec

# (min, opt, max) shape per input name, as FamilySpec.trt_profiles gives it for one role.
Profile = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
FANOUT_OPT_BATCH = 2  # one CFG pair: what each instance gets per round when k <= number of GPUs
SERVER_TENSORRT_ENV = "DRIFFUSION_SERVER_TENSORRT"  # the serving Triton's TensorRT: X.Y.Z or a path
# Where NGC images and TensorRT packages put libnvinfer (searched after ldconfig's cache).
LIBNVINFER_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/local/tensorrt/lib",
    "/opt/tensorrt/lib",
)
MIN_TENSORRT = (10, 0)  # strongly typed ONNX builds and the I/O-tensor API

RECORD_SUFFIX = ".json"  # model.plan -> model.plan.json
VOLTA = (7, 0)  # compute capability of the V100
LAST_VOLTA_TENSORRT = (10, 4)  # TensorRT 10.5 removed Volta (TensorRT 10.5.0 release notes)
_INSTALL_HINT = (
    "install the TensorRT Python API of the Triton release that will serve the engines "
    "(pip install tensorrt-cu12==<its version>), or run `driffusion export` inside the engines "
    "image of docker-compose.yml (docs/DEPLOY.md)"
)


class TensorRTUnavailable(RuntimeError):
    """The TensorRT Python API (or a tool a build needs) is not installed."""


class EngineBuildError(RuntimeError):
    """An engine could not be built; the message names the component and says why."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as ``nvidia-smi`` reports it."""

    index: int
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]  # (9, 0) for H100


@dataclass(frozen=True)
class EngineInfo:
    """What :func:`build_engine` did for one component."""

    role: str
    path: Path
    record: dict[str, Any]  # as written to model.plan.json
    skipped: bool  # True: an engine with the same record already existed
    seconds: float


# --- environment -------------------------------------------------------------------------------


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"the TensorRT Python API is not installed: {_INSTALL_HINT}"
        ) from exc
    return tensorrt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None when it is not installed."""
    try:
        return import_tensorrt().__version__
    except TensorRTUnavailable:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.4.0.26"`` -> ``(10, 4, 0, 26)`` (non-numeric parts end the tuple)."""
    parts = []
    for part in version.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def query_gpus() -> list[GpuInfo]:
    """The GPUs ``nvidia-smi`` sees (physical indices); [] when it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    cmd = [exe, "--query-gpu=index,name,compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, cap = (field.strip() for field in line.split(","))
        major, _, minor = cap.partition(".")
        gpus.append(GpuInfo(int(index), name, (int(major), int(minor or 0))))
    return gpus


def check_gpus(
    gpus: Sequence[int], available: Sequence[GpuInfo], trt_version: str
) -> GpuInfo | None:
    """The GPU model the engines are built for, after checking the listed ``gpus``.

    Every listed index must exist and all must be one model (an engine runs only on the GPU model
    it was built on); a Volta GPU needs TensorRT 10.4 or older. Returns None when ``available`` is
    empty (no nvidia-smi: nothing to check). Raises EngineBuildError naming the problem.
    """
    if not available:
        return None
    by_index = {g.index: g for g in available}
    missing = [i for i in gpus if i not in by_index]
    if missing:
        seen = ", ".join(f"{g.index}: {g.name}" for g in available)
        raise EngineBuildError(f"GPU(s) {missing} not found; this machine has {seen}")
    listed = [by_index[i] for i in gpus]
    models = sorted({g.name for g in listed})
    if len(models) > 1:
        raise EngineBuildError(
            f"GPUs {list(gpus)} are of different models {models}: a TensorRT engine runs only on "
            "the GPU model it was built on; list GPUs of one model"
        )
    gpu = listed[0]
    if gpu.compute_capability == VOLTA and version_tuple(trt_version)[:2] > LAST_VOLTA_TENSORRT:
        raise EngineBuildError(
            f"{gpu.name} (Volta, compute capability 7.0) is not supported by TensorRT "
            f"{trt_version}: TensorRT removed Volta in 10.5; use a Triton release with TensorRT "
            "10.4 or older (TRITON_TAG=24.08 in docker-compose.yml, docs/DEPLOY.md)"
        )
    return gpu


# --- the serving Triton's TensorRT ---------------------------------------------------------------


def libnvinfer_file_version(path: str | Path) -> str | None:
    """``".../libnvinfer.so.10.14.1"`` -> ``"10.14.1"`` (symlinks followed); None when the file
    name carries no full X.Y.Z version (``libnvinfer.so.10``)."""
    name = Path(os.path.realpath(path)).name
    match = re.fullmatch(r"libnvinfer\.so\.(\d+\.\d+\.\d+)(?:\.\d+)*", name)
    return match.group(1) if match else None


def infer_lib_version(number: int) -> str:
    """``getInferLibVersion()`` -> "X.Y.Z": MAJOR*10000 + MINOR*100 + PATCH since TensorRT 10
    (101401 -> "10.14.1"), MAJOR*1000 + MINOR*100 + PATCH before (8601 -> "8.6.1")."""
    if number >= 100_000:
        return f"{number // 10_000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def _ldconfig_libnvinfer() -> list[str]:
    exe = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        line.split("=>")[-1].strip()
        for line in out.splitlines()
        if line.strip().startswith("libnvinfer.so.") and "=>" in line
    ]


def find_libnvinfer(dirs: Sequence[str] = LIBNVINFER_DIRS) -> Path | None:
    """The system's ``libnvinfer.so.N`` (the one Triton's TensorRT backend loads): ldconfig's
    cache first, then ``dirs``; never a Python wheel's copy. None when there is none."""
    candidates = _ldconfig_libnvinfer()
    for folder in dirs:
        candidates += sorted(glob.glob(os.path.join(folder, "libnvinfer.so.*")))
    for candidate in candidates:
        if "site-packages" not in candidate and os.path.exists(candidate):
            return Path(os.path.realpath(candidate))
    return None


def probe_libnvinfer(path: str | Path) -> str:
    """The version a ``libnvinfer`` reports through ``getInferLibVersion()``, loaded in a child
    process (a second libnvinfer in this process, beside the wheel's, is asking for trouble)."""
    code = "import ctypes,sys; print(ctypes.CDLL(sys.argv[1]).getInferLibVersion())"
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise EngineBuildError(f"cannot load {path} to read its version: {done.stderr.strip()}")
    return infer_lib_version(int(done.stdout.strip()))


def server_tensorrt_version(
    environ: Mapping[str, str] = os.environ,
    find: Callable[[], Path | None] = find_libnvinfer,
    probe: Callable[[Path], str] = probe_libnvinfer,
) -> tuple[str, str]:
    """(X.Y.Z, where it was read) of the TensorRT that will serve the engines.

    ``DRIFFUSION_SERVER_TENSORRT`` wins: a version ("10.14.1") or a ``libnvinfer`` path. Otherwise
    the system's ``libnvinfer`` (:func:`find_libnvinfer`; in the engines image, the server's).
    Raises EngineBuildError when none can be read.
    """
    given = environ.get(SERVER_TENSORRT_ENV, "").strip()
    if given and re.fullmatch(r"\d+\.\d+\.\d+(\.\d+)*", given):
        return ".".join(given.split(".")[:3]), f"${SERVER_TENSORRT_ENV}"
    path = Path(given) if given else find()
    if path is None:
        raise EngineBuildError(
            "cannot tell which TensorRT the Triton server runs: no system libnvinfer found. Build "
            "inside the engines image (docker-compose.yml), or set "
            f"{SERVER_TENSORRT_ENV}=<the server's TensorRT version, e.g. 10.14.1> or the path of "
            "its libnvinfer.so.X.Y.Z"
        )
    if not Path(path).exists():
        raise EngineBuildError(f"{SERVER_TENSORRT_ENV}={given}: no such file")
    return libnvinfer_file_version(path) or probe(Path(path)), str(path)


def check_server_tensorrt(wheel_version: str, server_version: str, where: str) -> None:
    """EngineBuildError unless the Python ``tensorrt`` (``wheel_version``, e.g. "10.14.1.48") is
    the server's TensorRT (``server_version``, "10.14.1", read from ``where``): an engine loads
    only in the TensorRT version that built it."""
    if version_tuple(wheel_version)[:3] != version_tuple(server_version)[:3]:
        raise EngineBuildError(
            f"the TensorRT Python package is {wheel_version} but the Triton server's libnvinfer "
            f"is {server_version} ({where}); engines built by one TensorRT version do not load in "
            f"another. Install tensorrt-cu12/-cu13=={server_version}.* (the engines image does: "
            "docker/Dockerfile), or build for the server you run"
        )


def check_tensorrt_version(version: str) -> None:
    """EngineBuildError for TensorRT older than 10 (no strongly typed ONNX builds here)."""
    if version_tuple(version)[:2] < MIN_TENSORRT:
        raise EngineBuildError(
            f"TensorRT {version} is too old: driffusion builds strongly typed engines with "
            f"TensorRT {'.'.join(map(str, MIN_TENSORRT))} or newer"
        )


def network_flags(trt) -> int:
    """``create_network`` flags: strongly typed. TensorRT 10 needs the flag; 11 is always strongly
    typed and accepts the flag (deprecated, ignored), which a later release may drop."""
    check_tensorrt_version(trt.__version__)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if version_tuple(trt.__version__)[:1] < (11,):
            raise EngineBuildError(f"TensorRT {trt.__version__} has no STRONGLY_TYPED network flag")
        return 0
    return 1 << int(flag)


# --- the GPU the build runs on -------------------------------------------------------------------

_CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


def _load_cudart():
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def select_device(index: int, cudart: Callable[[], object] = _load_cudart) -> None:
    """Make GPU ``index`` (CUDA's numbering, as Triton's ``gpus``) the calling thread's current
    CUDA device, so the TensorRT builder that runs next tunes and builds on it. Through the CUDA
    runtime library of the image (``cudaSetDevice``); the builder's own CUDA runtime picks up the
    thread's current context. EngineBuildError when it cannot be set."""
    lib = cudart()
    if lib is None:
        raise EngineBuildError(
            f"cannot select GPU {index} for the build: no CUDA runtime library "
            f"({', '.join(_CUDART_NAMES)}) found"
        )
    status = lib.cudaSetDevice(int(index))
    if status != 0:
        raise EngineBuildError(f"cudaSetDevice({index}) failed with CUDA error {status}")


# --- optimization profiles -----------------------------------------------------------------------


def engine_profiles(
    family: FamilySpec, max_k: int, max_images: int = 1
) -> dict[str, list[Profile]]:
    """{role: [profile, ...]}: the optimization profiles each engine is built with.

    Batches run up to what ``max_k`` drafts of ``max_images`` images need (each role's
    ``max_batch``). The denoiser gets two, over the same shapes (the family's sizes), with
    different optima: profile 0 at batch 2*max_k (a whole round as one batch, fan-out "batch" or
    one GPU) and profile 1 at batch ``FANOUT_OPT_BATCH`` = 2 (one CFG pair: what each instance
    gets per round when fanning out over several GPUs). Every denoiser instance lists both
    (``config.pbtxt``: ``profile: ["0", "1"]``); Triton's TensorRT backend then runs each request
    in the listed profile whose optimum is nearest its shape. The other components have one.
    """
    rounds = family.trt_profiles(max_k, max_images=max_images)
    fanout = family.trt_profiles(
        max_k, opt_batch=min(FANOUT_OPT_BATCH, 2 * max_k), max_images=max_images
    )
    return {
        role: [profile, fanout[role]] if role == DENOISER else [profile]
        for role, profile in rounds.items()
    }


# --- records: what an engine was built from ----------------------------------------------------


def engine_record(
    onnx_path: str | Path,
    spec: ModelSpec,
    profiles: Profile | Sequence[Profile],
    precision: str,
    trt_version: str,
    gpu: GpuInfo | None,
) -> dict[str, Any]:
    """The JSON-ready record that decides whether an existing engine can be reused."""
    onnx_path = Path(onnx_path)
    files = sorted(onnx_path.parent.glob(f"{onnx_path.name}*"))  # model.onnx [+ model.onnx.data]
    return {
        "role": spec.role,
        "onnx": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
        "profiles": [
            {name: [list(s) for s in shapes] for name, shapes in profile.items()}
            for profile in _as_list(profiles)
        ],
        "precision": precision,
        "tensorrt": trt_version,
        "gpu": None if gpu is None else asdict(gpu) | {"index": None},  # the model, not the slot
    }


def read_record(engine_path: str | Path) -> dict[str, Any] | None:
    """The record beside an engine, or None when there is no (readable) one."""
    path = Path(f"{engine_path}{RECORD_SUFFIX}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(engine_path: str | Path, record: Mapping[str, Any]) -> bool:
    """Whether ``engine_path`` exists and was built from exactly ``record``."""
    if not Path(engine_path).exists():
        return False
    return read_record(engine_path) == json.loads(json.dumps(record))


# --- the build ---------------------------------------------------------------------------------


def check_profile(spec: ModelSpec, profile: Profile) -> None:
    """ValueError unless ``profile`` covers exactly the spec's inputs with min <= opt <= max."""
    if set(profile) != set(spec.input_names):
        raise ValueError(
            f"{spec.role}: profile inputs {sorted(profile)} differ from the spec's "
            f"{sorted(spec.input_names)}"
        )
    for name, shapes in profile.items():
        lo, opt, hi = shapes
        rank = len(spec.tensor(name).shape)
        if not len(lo) == len(opt) == len(hi) == rank:
            raise ValueError(f"{spec.role}/{name}: profile shapes {shapes} are not of rank {rank}")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise ValueError(f"{spec.role}/{name}: profile needs min <= opt <= max, got {shapes}")


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    spec: ModelSpec,
    profiles: Profile | Sequence[Profile],
    *,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    gpu: GpuInfo | None = None,
    force: bool = False,
    progress: Callable[[str], object] | None = print,
) -> EngineInfo:
    """Build (or reuse) the engine of ``spec.role`` from ``onnx_path`` into ``engine_path``.

    ``profiles``: one {input: (min, opt, max)} or a list of them (profile i of the engine is the
    i-th, see :func:`engine_profiles`); the network is strongly typed, so the engine runs in the
    ONNX file's types, which must be the spec's (``spec.precision`` weights, the TensorSpecs'
    dtypes); ``timing_cache``: a file read before and written after the build (created when
    missing); ``workspace_gib``: cap on the builder's scratch memory (default TensorRT's);
    ``gpu``: the GPU model, for the record (see :func:`check_gpus`). The build runs on the
    current CUDA device (:func:`select_device`). Raises EngineBuildError naming the component.
    """
    from driffusion.export.onnx import matches_spec

    trt = import_tensorrt()
    say = progress or (lambda _msg: None)
    role = spec.role
    profiles = _as_list(profiles)
    if not profiles:
        raise ValueError(f"{role}: at least one optimization profile is needed")
    for profile in profiles:
        check_profile(spec, profile)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.exists():
        raise EngineBuildError(f"{role}: ONNX file {onnx_path} does not exist")
    if not matches_spec(onnx_path, spec):
        raise EngineBuildError(
            f"{role}: {onnx_path} does not hold the spec's tensors and {spec.precision} weights; "
            "export it again (--force)"
        )
    flags = network_flags(trt)
    record = engine_record(onnx_path, spec, profiles, spec.precision, trt.__version__, gpu)
    if not force and is_current(engine_path, record):
        say(f"[tensorrt] {role}: {engine_path} is up to date, skipped (--force rebuilds)")
        return EngineInfo(role, engine_path, record, skipped=True, seconds=0.0)

    start = time.perf_counter()
    say(
        f"[tensorrt] {role}: building a strongly typed {spec.precision} engine with "
        f"{len(profiles)} profile(s) from {onnx_path} (TensorRT {trt.__version__})"
    )
    logger = _make_logger(trt, say, role)
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{role}: TensorRT cannot parse {onnx_path}: {errors}")
    _check_io(
        role,
        spec,
        [network.get_input(i).name for i in range(network.num_inputs)],
        [network.get_output(i).name for i in range(network.num_outputs)],
    )

    _check_io_types(role, spec, network, trt)

    config = builder.create_builder_config()  # no precision flags: the network is strongly typed
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    for profile in profiles:  # engine profile i = profiles[i]
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
    cache = _load_timing_cache(config, timing_cache, say, role)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _make_progress_monitor(trt, say, role)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error was logged"
        raise EngineBuildError(f"{role}: TensorRT could not build the engine: {detail}")
    if timing_cache is not None:
        _save_timing_cache(config, cache, Path(timing_cache), say)

    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    if engine is None:
        raise EngineBuildError(f"{role}: the built engine does not deserialize")
    if engine.num_optimization_profiles != len(profiles):
        raise EngineBuildError(
            f"{role}: the engine has {engine.num_optimization_profiles} optimization profiles, "
            f"{len(profiles)} were given"
        )
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    is_input = [engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
    _check_io(
        role,
        spec,
        [n for n, i in zip(names, is_input, strict=True) if i],
        [n for n, i in zip(names, is_input, strict=True) if not i],
    )
    _write_atomically(engine_path, bytes(memoryview(serialized)))
    _write_atomically(
        Path(f"{engine_path}{RECORD_SUFFIX}"), (json.dumps(record, indent=2) + "\n").encode()
    )
    seconds = time.perf_counter() - start
    mib = engine_path.stat().st_size / 2**20
    say(f"[tensorrt] {role}: {engine_path} ({mib:.1f} MiB) in {seconds:.1f} s")
    return EngineInfo(role, engine_path, record, skipped=False, seconds=seconds)


# --- helpers -----------------------------------------------------------------------------------


def _check_io(role: str, spec: ModelSpec, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    if sorted(inputs) != sorted(spec.input_names) or sorted(outputs) != sorted(spec.output_names):
        raise EngineBuildError(
            f"{role}: network tensors (inputs {list(inputs)}, outputs {list(outputs)}) differ "
            f"from the spec's (inputs {list(spec.input_names)}, outputs {list(spec.output_names)})"
        )


def _as_list(profiles: Profile | Sequence[Profile]) -> list[Profile]:
    return [profiles] if isinstance(profiles, Mapping) else list(profiles)


def _check_io_types(role: str, spec: ModelSpec, network, trt) -> None:
    """The parsed network's I/O types are the spec's (the served dtypes of config.pbtxt)."""
    names = {trt.float32: "float32", trt.float16: "float16", trt.int64: "int64"}
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    tensors += [network.get_output(i) for i in range(network.num_outputs)]
    got = {t.name: names.get(t.dtype, str(t.dtype)) for t in tensors}
    want = {t.name: t.dtype for t in spec.inputs + spec.outputs}
    if got != want:
        raise EngineBuildError(f"{role}: network I/O types {got} differ from the spec's {want}")


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_timing_cache(config, path: str | Path | None, say, role: str):
    """A timing cache from ``path`` (empty when missing or from another GPU/TensorRT)."""
    blob = b""
    if path is not None and Path(path).exists():
        blob = Path(path).read_bytes()
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        say(
            f"[tensorrt] {role}: timing cache {path} is from another GPU or TensorRT; "
            "starting afresh"
        )
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    elif blob:
        say(f"[tensorrt] {role}: using timing cache {path}")
    return cache


def _save_timing_cache(config, cache, path: Path, say) -> None:
    merged = config.get_timing_cache() or cache
    _write_atomically(path, bytes(memoryview(merged.serialize())))
    say(f"[tensorrt] timing cache saved to {path}")


def _make_logger(trt, say, role: str):
    """A trt.ILogger printing warnings and errors; keeps the errors for the failure message."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if level <= int(trt.ILogger.Severity.WARNING):
                say(f"[tensorrt] {role}: {msg}")

    return Logger()


def _make_progress_monitor(trt, say, role: str, every_s: float = 10.0):
    """A trt.IProgressMonitor printing the top phases, and step counts at most every ``every_s``."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.steps: dict[str, int] = {}
            self.started: dict[str, float] = {}
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.depth[phase_name], self.steps[phase_name] = depth, num_steps
            self.started[phase_name] = time.perf_counter()
            if depth <= 1:
                say(f"[tensorrt] {role}: {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            now = time.perf_counter()
            if now - self.last >= every_s:
                self.last = now
                say(f"[tensorrt] {role}: {phase_name} {step + 1}/{self.steps.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            if self.depth.get(phase_name, 0) == 0:
                took = time.perf_counter() - self.started.get(phase_name, time.perf_counter())
                say(f"[tensorrt] {role}: {phase_name} done in {took:.1f} s")

    return Monitor()


__all__ = [
    "EngineBuildError",
    "EngineInfo",
    "GpuInfo",
    "TensorRTUnavailable",
    "build_engine",
    "check_gpus",
    "check_profile",
    "check_server_tensorrt",
    "engine_profiles",
    "engine_record",
    "find_libnvinfer",
    "import_tensorrt",
    "is_current",
    "network_flags",
    "query_gpus",
    "read_record",
    "select_device",
    "server_tensorrt_version",
    "tensorrt_version",
]
