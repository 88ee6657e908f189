"""Write a Triton model repository of TensorRT engines for one diffusers pipeline (GPU serving).

    <repository>/
      text_encoder[_2]/1/model.plan     tensorrt_plan, one instance on the first GPU
      denoiser/1/model.plan             tensorrt_plan, one instance on EACH listed GPU
      vae_decoder/1/model.plan          tensorrt_plan, one instance on the first GPU
      <role>/1/model.plan.json          what the engine was built from (reuse check)
      driffusion/1/...                  the BLS orchestrator, exactly as build.py writes it
      repository.json                   what the repository was built from
    <work dir>/onnx/<role>/model.onnx[.data]   the ONNX exports the engines are built from
    <work dir>/timing.cache                    TensorRT timing cache (default location)

Engines are built strongly typed from ONNX files at ``settings.precision`` (fp16 by default; SDXL's
VAE stays fp32), on the first listed GPU, with the TensorRT of the serving Triton (checked); the
denoiser engine has two optimization profiles (``export.tensorrt.engine_profiles``) and every
denoiser instance lists both in ``config.pbtxt``.

The work dir defaults to ``<repository>.work`` beside the repository: Triton treats every folder in
the repository as a model, so intermediate files stay out of it. Every step is skipped when its
output is up to date (ONNX files with the spec's tensors, engines with the same record) unless
``force``; configs and the orchestrator are always rewritten (cheap). The fan-out width of the
orchestrator is the number of GPUs: one denoiser request per GPU per round, one batched request on
a single GPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from driffusion.specs import (
    DENOISER,
    PRECISIONS,
    FamilySpec,
    at_precision,
    family_for_pipeline,
)

from .build import MANIFEST, ORCHESTRATOR, RepositorySettings, write_orchestrator
from .config import component_config

ENGINE_FILE = "model.plan"  # the file name Triton's TensorRT backend loads
# Left behind by an ONNX (CPU) build into the same folder; a tensorrt_plan model does not use them.
_STALE_CPU_FILES = ("model.onnx", "model.onnx.data", "model.py")


class RepositoryBuildError(RuntimeError):
    """A step of the build failed; the message names the step, the component and why."""


@dataclass(frozen=True)
class TensorRTSettings:
    """How the TensorRT repository is built and served."""

    family: str = "sd21"  # spec family of the pipeline: sd21 | sdxl | sd3
    gpus: tuple[int, ...] = (0,)  # one denoiser instance per GPU; the other models on gpus[0]
    orchestrator_instances: int = 4  # concurrent requests served without queueing
    max_k: int = 4  # largest k a request may ask for; the denoiser profile covers batch 1..2*max_k
    opset: int = 18  # ONNX opset of the exports
    workspace_gib: float | None = None  # cap on TensorRT's builder scratch memory (None: its own)
    precision: str = "fp16"  # fp16 | fp32: ONNX weights and served dtypes (specs.at_precision)

    def __post_init__(self) -> None:
        gpus = tuple(self.gpus)
        object.__setattr__(self, "gpus", gpus)
        if not gpus or any(not isinstance(g, int) or g < 0 for g in gpus):
            raise ValueError(f"gpus must list GPU indices >= 0, got {list(gpus)}")
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"gpus must not repeat an index, got {list(gpus)}")
        for name in ("orchestrator_instances", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.opset < 18:
            raise ValueError(f"opset must be >= 18, got {self.opset}")

    def repository_settings(self) -> RepositorySettings:
        """The orchestrator's settings (build.py's): fan-out width = number of GPUs."""
        return RepositorySettings(
            family=self.family,
            denoiser_instances=len(self.gpus),
            orchestrator_instances=self.orchestrator_instances,
            max_k=self.max_k,
        )


def component_configs(
    family: FamilySpec, gpus: Sequence[int], profile_counts: Mapping[str, int] | None = None
) -> dict[str, str]:
    """{role: config.pbtxt text}: the denoiser on every GPU, the other components on gpus[0];
    each instance may use all of its engine's optimization profiles (``profile_counts``, default
    one per role: no ``profile`` field)."""
    counts = profile_counts or {}
    return {
        role: component_config(
            role,
            spec,
            engine="tensorrt",
            gpus=list(gpus) if role == DENOISER else [gpus[0]],
            profiles=range(counts[role]) if counts.get(role, 1) > 1 else (),
        )
        for role, spec in family.components.items()
    }


EngineBuilder = Callable[..., object]  # the signature of driffusion.export.tensorrt.build_engine


def build_tensorrt_repository(
    pipeline: str | Path,
    out: str | Path,
    settings: TensorRTSettings | None = None,
    *,
    work_dir: str | Path | None = None,
    timing_cache: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], object] | None = print,
    engine_builder: EngineBuilder | None = None,
) -> Path:
    """Export ``pipeline`` (hub id or diffusers folder), build its engines, write the repository.

    ``engine_builder`` defaults to :func:`driffusion.export.tensorrt.build_engine` (tests pass a
    stand-in where TensorRT is absent). Raises RepositoryBuildError naming the failed step.
    """
    from driffusion.export import tensorrt as trt_build
    from driffusion.export.onnx import export_pipeline_to_onnx
    from driffusion.export.pipelines import load_pipeline

    settings = settings or TensorRTSettings()
    say = progress or (lambda _m: None)
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(f"{out.name}.work")
    cache = Path(timing_cache) if timing_cache is not None else work / "timing.cache"
    start = time.perf_counter()

    gpu = None
    if engine_builder is None:  # the real build: fail before the long export if it cannot run
        engine_builder = trt_build.build_engine
        version = trt_build.import_tensorrt().__version__
        try:
            trt_build.check_tensorrt_version(version)
            server, source = trt_build.server_tensorrt_version()
            trt_build.check_server_tensorrt(version, server, source)
            gpu = trt_build.check_gpus(settings.gpus, trt_build.query_gpus(), version)
            trt_build.select_device(settings.gpus[0])  # build on a GPU the engines serve on
        except trt_build.EngineBuildError as exc:
            raise RepositoryBuildError(f"checking TensorRT and the GPUs failed: {exc}") from exc
        where = "nvidia-smi not found, GPUs not checked" if gpu is None else gpu.name
        say(
            f"[repository] TensorRT {version} (server's: {server}, {source}); engines for "
            f"{where}, built on GPU {settings.gpus[0]}"
        )

    say(f"[repository] loading pipeline {pipeline}")
    try:
        pipe = load_pipeline(pipeline)
        family = at_precision(family_for_pipeline(settings.family, pipe), settings.precision)
    except Exception as exc:
        raise RepositoryBuildError(
            f"loading pipeline {pipeline} as {settings.family} failed: {type(exc).__name__}: {exc}"
        ) from exc
    profiles = trt_build.engine_profiles(family, settings.max_k)

    try:
        onnx_paths = export_pipeline_to_onnx(
            pipe, family, work / "onnx", opset=settings.opset, force=force, progress=say
        )
    except Exception as exc:  # ExportError names the component
        raise RepositoryBuildError(f"ONNX export failed: {exc}") from exc

    records = {}
    for role, spec in family.components.items():
        version_dir = out / role / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        try:
            info = engine_builder(
                onnx_paths[role],
                version_dir / ENGINE_FILE,
                spec,
                profiles[role],
                timing_cache=cache,
                workspace_gib=settings.workspace_gib,
                gpu=gpu,
                force=force,
                progress=say,
            )
        except Exception as exc:
            raise RepositoryBuildError(
                f"building the TensorRT engine of {role} failed: {type(exc).__name__}: {exc}"
            ) from exc
        records[role] = getattr(info, "record", None)
        for name in _STALE_CPU_FILES:
            (version_dir / name).unlink(missing_ok=True)

    counts = {role: len(p) for role, p in profiles.items()}
    for role, text in component_configs(family, settings.gpus, counts).items():
        (out / role / "config.pbtxt").write_text(text)
    write_orchestrator(out / ORCHESTRATOR, pipe, family, settings.repository_settings())
    manifest = {
        "pipeline": str(pipeline),
        "engine": "tensorrt",
        "settings": asdict(settings),
        "engines": records,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"[repository] {out} ready in {time.perf_counter() - start:.1f} s")
    return out


__all__ = [
    "ENGINE_FILE",
    "RepositoryBuildError",
    "TensorRTSettings",
    "build_tensorrt_repository",
    "component_configs",
]
