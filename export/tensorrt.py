"""Build TensorRT engines from the ONNX exports with the TensorRT Python API.

One engine per component. The ONNX file is parsed from disk (so ``model.onnx.data`` beside it is
found), the builder gets ONE optimization profile from the family spec
(``FamilySpec.trt_profiles``), the spec's precision, a timing cache loaded from and saved back to a
file, and a progress monitor that prints the build phases. The engine is written atomically,
deserialized once to check its tensors against the spec, and recorded in ``model.plan.json`` beside
it; a later build with the same record (ONNX file, profile, precision, TensorRT version, GPU model)
is skipped unless ``force``.

Engines are specific to the GPU model and the TensorRT version: build them on the serving GPUs with
the TensorRT of the Triton release that serves them (docs/DEPLOY.md).

Precision. TensorRT 10 builds fp16 from the fp32 ONNX with the FP16 builder flag (weak typing).
TensorRT 11 removed weak typing: a strongly typed network runs in the ONNX file's own types, so
from the fp32 exports it builds fp32 (TF32 on Ampere and later) engines, says so, and records
"fp32". fp16 engines on TensorRT 11 need fp16 ONNX exports (not made yet: an ONNX-level fp16
conversion with onnxconverter-common 1.16 produced graphs with mismatched types for the UNet and
the VAE).

    info = build_engine("work/onnx/denoiser/model.onnx", "repo/denoiser/1/model.plan", spec,
                        family.trt_profiles(max_k=4)["denoiser"], timing_cache="timing.cache")

``tensorrt`` is imported only when a build starts; without it :class:`TensorRTUnavailable` says what
to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from driffusion.tensors import ModelSpec

# (min, opt, max) shape per input name, as FamilySpec.trt_profiles gives it for one role.
Profile = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

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


# --- records: what an engine was built from ----------------------------------------------------


def engine_record(
    onnx_path: str | Path,
    spec: ModelSpec,
    profile: Profile,
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
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
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
    profile: Profile,
    *,
    precision: str | None = None,
    timing_cache: str | Path | None = None,
    workspace_gib: float | None = None,
    gpu: GpuInfo | None = None,
    force: bool = False,
    progress: Callable[[str], object] | None = print,
) -> EngineInfo:
    """Build (or reuse) the engine of ``spec.role`` from ``onnx_path`` into ``engine_path``.

    ``profile``: {input: (min, opt, max)} for this role; ``precision`` defaults to the spec's
    ("fp16" | "fp32"); ``timing_cache``: a file read before and written after the build (created
    when missing); ``workspace_gib``: cap on the builder's scratch memory (default TensorRT's);
    ``gpu``: the GPU model, for the record (see :func:`check_gpus`). Raises EngineBuildError naming
    the component.
    """
    trt = import_tensorrt()
    say = progress or (lambda _msg: None)
    role = spec.role
    precision = precision or spec.precision
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"{role}: precision must be 'fp16' or 'fp32', got {precision!r}")
    check_profile(spec, profile)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.exists():
        raise EngineBuildError(f"{role}: ONNX file {onnx_path} does not exist")
    weak_typing = hasattr(trt.BuilderFlag, "FP16")  # removed in TensorRT 11
    downgraded = precision == "fp16" and not weak_typing
    if downgraded:  # strongly typed: the fp32 ONNX builds an fp32 engine (module docstring)
        precision = "fp32"
    record = engine_record(onnx_path, spec, profile, precision, trt.__version__, gpu)
    if not force and is_current(engine_path, record):
        say(f"[tensorrt] {role}: {engine_path} is up to date, skipped (--force rebuilds)")
        return EngineInfo(role, engine_path, record, skipped=True, seconds=0.0)

    start = time.perf_counter()
    say(
        f"[tensorrt] {role}: building a {precision} engine from {onnx_path} "
        f"(TensorRT {trt.__version__})"
    )
    logger = _make_logger(trt, say, role)
    builder = trt.Builder(logger)
    if downgraded:
        say(
            f"[tensorrt] {role}: WARNING: TensorRT {trt.__version__} builds strongly typed "
            "networks only; the ONNX export is fp32, so this engine is fp32 (TF32), not fp16. "
            "For fp16 engines use a Triton release with TensorRT 10 (docs/DEPLOY.md)."
        )
    flags = 0
    if version_tuple(trt.__version__)[:1] < (10,):  # TensorRT 8/9: explicit batch is opt-in
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if not weak_typing:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
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

    config = builder.create_builder_config()
    if weak_typing and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
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
    "engine_record",
    "import_tensorrt",
    "is_current",
    "query_gpus",
    "read_record",
    "tensorrt_version",
]
