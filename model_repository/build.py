"""Write a complete Triton model repository for one diffusers pipeline, for one engine.

    <repository>/
      text_encoder[_2]/1/...       one model per pipeline component; what the folder holds depends
      denoiser/1/...               on the engine (below); the denoiser has one instance per device
      vae_decoder/1/...            (or ``denoiser_instances`` CPU instances)
      driffusion/1/model.py        the BLS orchestrator (the served model)
      driffusion/1/settings.json   family spec, limits, defaults, fan-out width
      driffusion/1/pipeline/       tokenizer(s) and scheduler config
      repository.json              what it was built from (pipeline, LoRAs, code, settings, engines)

Engines, one step each:

- ``onnx``: ONNX files run by ONNX Runtime in python-backend models on the CPU (the CPU server);
- ``tensorrt``: ONNX exports built into TensorRT engines on this machine's GPUs, served as
  ``tensorrt_plan`` models (``driffusion.export.tensorrt``);
- ``torch``: the pipeline's own modules run by PyTorch in python-backend models, on the listed
  GPUs in fp16, or on the CPU in fp32.

LoRAs (``settings.loras``) are fused into the pipeline's weights before any engine's step
(``driffusion.export.lora``). Every ``config.pbtxt`` is rendered from the specs (``config.py``).
ONNX exports are cached by pipeline (and LoRAs) and spec under ``<cache>/onnx`` and linked into
each repository, so repositories that differ only in their settings are not exported twice;
``force`` exports again. Configs and the orchestrator are always rewritten (cheap, and they follow
the settings).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from driffusion import api
from driffusion.export.lora import Lora, LoraError, fuse_loras, lora_records
from driffusion.families import FAMILY_NAMES, PRECISIONS, FamilySpec, at_precision
from driffusion.schedule import max_steps
from driffusion.service import ServiceSettings
from driffusion.tensors import DENOISER, ModelSpec

from .config import component_config, orchestrator_config
from .paths import cache_dir

ORCHESTRATOR = "driffusion"  # the served model's name
STREAM = "driffusion_stream"  # the same, decoupled: a response per round (gRPC streaming)
MODELS_DIR = Path(__file__).resolve().parent / "models"
MANIFEST = "repository.json"
ENGINES = ("onnx", "tensorrt", "torch")
ENGINE_FILE = "model.plan"  # the file name Triton's TensorRT backend loads
RUNNERS = {"onnx": "onnx_runtime", "torch": "torch_runner"}  # python-backend model folders
Say = Callable[[str], object]


class RepositoryBuildError(RuntimeError):
    """A step of the build failed; the message names the step, the component and why."""


@dataclass(frozen=True)
class RepositorySettings:
    """How a repository is built and served: one type for every engine."""

    family: str = "sd21"  # spec family of the pipeline: sd21 | sdxl | sd3
    engine: str = "onnx"  # onnx (CPU) | tensorrt (GPU engines) | torch (PyTorch, GPU or CPU)
    gpus: tuple[int, ...] = ()  # GPU indices (tensorrt, torch); the other models on gpus[0]
    denoiser_instances: int | None = None  # None: one per GPU, or 4 on the CPU
    orchestrator_instances: int = 4  # concurrent requests served without queueing
    max_k: int = 8  # largest k a request may ask for; bounds the denoiser's batch (2 * max_k)
    max_images: int = 4  # largest num_images a request may ask for (batches scale with it)
    stream_instances: int = 1  # instances of driffusion_stream (streamed progress); 0: none
    # fp16 | fp32 (families.at_precision): weights and the served tensors' dtypes; None: fp16 for
    # tensorrt and for torch on GPUs, else fp32. ONNX Runtime's CPU provider runs most fp16
    # operators in float32 behind inserted casts; torch on the CPU always computes in float32.
    precision: str | None = None
    model_timeout_s: float = 120.0  # a model call not answered by then is retried or fails
    request_timeout_s: float = 300.0  # a request still running then fails
    default_steps: int | None = None  # None: the family's
    default_guidance: float | None = None  # None: the family's
    # CPU serving (onnx): threads, and the GPU emulation that pads each denoiser call
    intra_op_threads: int = 1  # ONNX Runtime threads per instance
    emulated_latency_ms: float = 0.0  # pad each denoiser call (stands for a GPU on a CPU box)
    emulated_latency_per_item_ms: float = 0.0  # ... plus this per batch row
    emulated_compute_delay_ms: float = 5.0  # ... the CPU model's work starts this far into it
    # export and TensorRT
    opset: int = 18  # ONNX opset of the exports (>= 18)
    workspace_gib: float | None = None  # cap on TensorRT's builder scratch memory
    # LoRAs fused into the denoiser and text encoders before export, in order (export/lora.py);
    # each a Lora, "PATH[:SCALE]" or {"path", "scale"}
    loras: tuple[Lora, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "loras", tuple(Lora.coerce(x) for x in self.loras))
        if self.family not in FAMILY_NAMES:
            raise ValueError(
                f"family must be one of {', '.join(FAMILY_NAMES)}, got {self.family!r}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if any(not isinstance(g, int) or isinstance(g, bool) or g < 0 for g in self.gpus):
            raise ValueError(f"gpus must list GPU indices >= 0, got {list(self.gpus)}")
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus must not repeat an index, got {list(self.gpus)}")
        if self.engine == "tensorrt" and not self.gpus:
            raise ValueError("gpus must list at least one GPU for engine tensorrt")
        if self.engine == "onnx" and self.gpus:
            raise ValueError("engine onnx runs on the CPU: leave gpus empty (or use torch)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp16 or fp32, got {self.precision!r}")
        if self.stream_instances < 0:
            raise ValueError(f"stream_instances must be >= 0, got {self.stream_instances}")
        for name in ("orchestrator_instances", "max_k", "max_images", "intra_op_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.denoiser_instances is not None:
            n = self.denoiser_instances
            if n < 1:
                raise ValueError(f"denoiser_instances must be >= 1, got {n}")
            if self.gpus and n % len(self.gpus):
                raise ValueError(
                    f"denoiser_instances must be a multiple of the {len(self.gpus)} GPUs "
                    f"(the same count on each), got {n}"
                )
            if self.engine == "tensorrt" and n != len(self.gpus):
                raise ValueError("engine tensorrt serves one denoiser instance per GPU")
        for name in ("model_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "emulated_latency_ms",
            "emulated_latency_per_item_ms",
            "emulated_compute_delay_ms",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.opset < 18:
            raise ValueError(f"opset must be >= 18, got {self.opset}")

    @property
    def instances(self) -> int:
        """Denoiser instances in all (the orchestrator's fan-out width)."""
        if self.denoiser_instances is not None:
            return self.denoiser_instances
        return len(self.gpus) if self.gpus else 4

    @property
    def resolved_precision(self) -> str:
        if self.precision is not None:
            return self.precision
        return (
            "fp16"
            if self.engine == "tensorrt" or (self.engine == "torch" and self.gpus)
            else "fp32"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepositorySettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def build_repository(
    pipeline: str | Path,
    out: str | Path,
    settings: RepositorySettings | None = None,
    *,
    force: bool = False,
    cache: str | Path | None = None,
    timing_cache: str | Path | None = None,
    progress: Say | None = print,
    engine_builder: Callable[..., Any] | None = None,
) -> Path:
    """Export ``pipeline`` (a diffusers folder or hub id) and write the repository to ``out``.

    ``cache``: where ONNX exports are kept (default ``paths.cache_dir()``);
    ``timing_cache``: TensorRT's (default ``<cache>/tensorrt/timing.cache``); ``engine_builder``
    replaces :func:`driffusion.export.tensorrt.build_engine` (tests without TensorRT). Raises
    RepositoryBuildError naming the failed step.
    """
    from driffusion.export.introspect import family_for_pipeline
    from driffusion.export.pipelines import load_pipeline

    settings = settings or RepositorySettings()
    say = progress or (lambda _m: None)
    out = Path(out)
    cache = Path(cache) if cache is not None else cache_dir()
    start = time.perf_counter()
    if settings.engine == "tensorrt" and engine_builder is None:
        engine_builder = _check_tensorrt(settings, say)  # fails before the long export
    try:  # --- LoRAs: a missing file fails before the pipeline loads
        lora_records(settings.loras)
    except LoraError as exc:
        raise RepositoryBuildError(str(exc)) from exc
    _check_scheduler(pipeline)  # refused before any weight is loaded or file exported
    say(f"[repository] loading {pipeline}")
    try:
        pipe = load_pipeline(pipeline)
        family = at_precision(
            family_for_pipeline(settings.family, pipe), settings.resolved_precision
        )
    except Exception as exc:
        raise RepositoryBuildError(
            f"loading pipeline {pipeline} as {settings.family} failed: {type(exc).__name__}: {exc}"
        ) from exc
    try:  # --- LoRAs: fused into the weights every engine exports, saves or runs
        fuse_loras(pipe, settings.loras, say)
    except LoraError as exc:
        raise RepositoryBuildError(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    manifest = repository_manifest(pipeline, settings)
    previous = read_manifest(out)
    weights = _weights_key(manifest)  # the pipeline's files and the LoRAs fused into them
    if previous is not None and _weights_key(previous) != weights:
        say(f"[repository] {out} was built from another pipeline, weights or LoRAs: rebuilding")
    exports = lambda: _cached_exports(  # noqa: E731 (onnx and tensorrt)
        pipe, family, weights, settings, cache, force, say
    )
    if settings.engine == "onnx":
        records = _onnx_step(exports(), family, out, settings)
    elif settings.engine == "tensorrt":
        records = _tensorrt_step(
            exports(), family, out, settings, cache, timing_cache, engine_builder, force, say
        )
    else:
        records = _torch_step(pipe, family, out, settings, say)
    for role, text in component_configs(family, settings).items():
        (out / role / "config.pbtxt").write_text(text)
    write_orchestrator(out, pipe, family, settings)
    (out / MANIFEST).write_text(json.dumps({**manifest, "engines": records}, indent=2) + "\n")
    say(f"[repository] {out} ready in {time.perf_counter() - start:.1f} s")
    return out


# --- one step per engine -----------------------------------------------------------------------


def _onnx_step(exports, family, out, settings) -> dict[str, Any]:
    for role in family.components:
        version = _version_dir(out, role)
        _link(exports[role], version)
        shutil.copy2(MODELS_DIR / RUNNERS["onnx"] / "model.py", version / "model.py")
    return {role: {"onnx": str(path)} for role, path in exports.items()}


def _tensorrt_step(exports, family, out, settings, cache, timing_cache, builder, force, say):
    timing = Path(timing_cache) if timing_cache is not None else cache / "tensorrt" / "timing.cache"
    from driffusion.export.tensorrt import engine_profiles

    profiles = engine_profiles(family, settings.max_k, settings.max_images)
    records = {}
    for role, spec in family.components.items():
        version = _version_dir(out, role)
        try:
            info = builder(
                exports[role] / "model.onnx",
                version / ENGINE_FILE,
                spec,
                profiles[role],
                timing_cache=timing,
                workspace_gib=settings.workspace_gib,
                force=force,
                progress=say,
            )
        except Exception as exc:
            raise RepositoryBuildError(
                f"building the TensorRT engine of {role} failed: {type(exc).__name__}: {exc}"
            ) from exc
        records[role] = getattr(info, "record", None)
        _remove_other_engine_files(version, keep=(ENGINE_FILE, f"{ENGINE_FILE}.json"))
    return records


def _torch_step(pipe, family, out, settings, say) -> dict[str, Any]:
    from driffusion.export.torch_modules import save_component

    records = {}
    for role, spec in family.components.items():
        version = _version_dir(out, role)
        _remove_other_engine_files(version, keep=())
        t0 = time.perf_counter()
        records[role] = save_component(pipe, spec, version / "component")
        say(f"[repository] {role}: torch weights saved in {time.perf_counter() - t0:.1f} s")
        shutil.copy2(MODELS_DIR / RUNNERS["torch"] / "model.py", version / "model.py")
    return records


def _check_scheduler(pipeline: str | Path) -> None:
    """``ValueError`` naming the scheduler and what is supported, read from a pipeline folder's
    ``scheduler/scheduler_config.json`` (a hub id is checked once loaded)."""
    from driffusion.samplers import check_supported

    path = Path(pipeline) / "scheduler" / "scheduler_config.json"
    if path.exists():
        check_supported(json.loads(path.read_text()))


def component_configs(family: FamilySpec, settings: RepositorySettings) -> dict[str, str]:
    """{role: config.pbtxt text} of every component for ``settings.engine``: the denoiser's
    instances on every GPU (or on the CPU), the other components once, on the first GPU."""
    configs = {}
    for role, spec in family.components.items():
        gpus = (settings.gpus if role == DENOISER else settings.gpus[:1]) or None
        if settings.engine == "tensorrt":
            count = len(_engine_profiles(family, settings)[role])
            configs[role] = component_config(
                role,
                spec,
                platform="tensorrt_plan",
                gpus=gpus,
                profiles=range(count) if count > 1 else (),
            )
            continue
        instances = settings.instances // max(len(settings.gpus), 1) if role == DENOISER else 1
        params: dict[str, object] = dict(_contract(spec, family, settings))
        if settings.engine == "torch":
            params["dtype"] = "float16" if spec.precision == "fp16" else "float32"
        else:
            params["intra_op_threads"] = settings.intra_op_threads
        if role == DENOISER and settings.engine == "onnx":
            params["emulated_latency_ms"] = settings.emulated_latency_ms
            params["emulated_latency_per_item_ms"] = settings.emulated_latency_per_item_ms
            params["emulated_compute_delay_ms"] = settings.emulated_compute_delay_ms
        configs[role] = component_config(
            role, spec, backend="python", instances=instances, gpus=gpus, parameters=params
        )
    return configs


def _engine_profiles(family: FamilySpec, settings: RepositorySettings):
    from driffusion.export.tensorrt import engine_profiles

    return engine_profiles(family, settings.max_k, settings.max_images)


def _cached_exports(pipe, family, fingerprint, settings, cache, force, say) -> dict[str, Path]:
    """{role: folder with model.onnx[.data]}: exported once per pipeline (``fingerprint``: its
    files and LoRAs, ``_weights_key``), spec and precision."""
    from driffusion.export.onnx import export_component, matches_spec

    folders = {}
    for role, spec in family.components.items():
        key = _digest(fingerprint, json.dumps(asdict(spec), sort_keys=True), settings.opset)
        folder = cache / "onnx" / f"{role}-{key}"
        onnx = folder / "model.onnx"
        if force or not onnx.exists() or not matches_spec(onnx, spec):
            t0 = time.perf_counter()
            say(f"[repository] exporting {role} to ONNX ({spec.precision}) ...")
            folder.mkdir(parents=True, exist_ok=True)
            trace = (family.min_size, family.min_size)
            try:
                export_component(pipe, spec, onnx, trace_size=trace, opset=settings.opset)
            except Exception as exc:
                raise RepositoryBuildError(f"ONNX export of {role} failed: {exc}") from exc
            say(f"[repository] exported {role} in {time.perf_counter() - t0:.1f} s")
        else:
            say(f"[repository] {role}: reusing the ONNX export in {folder} (--force re-exports)")
        folders[role] = folder
    return folders


def _contract(spec: ModelSpec, family: FamilySpec, settings: RepositorySettings) -> dict[str, str]:
    """The shapes a component may be sent, as ``config.pbtxt`` parameters its runner enforces:
    the largest batch a valid ``driffusion`` request makes, and the served size range."""
    bounds = {
        "batch": [1, spec.max_batch(settings.max_k, settings.max_images)],
        "height": [family.min_size, family.max_size],
        "width": [family.min_size, family.max_size],
        "latent_height": [
            family.min_size // family.vae_scale_factor,
            family.max_size // family.vae_scale_factor,
        ],
        "latent_width": [
            family.min_size // family.vae_scale_factor,
            family.max_size // family.vae_scale_factor,
        ],
    }
    shapes = {t.name: list(t.shape) for t in spec.inputs}
    return {"input_shapes": json.dumps(shapes), "dim_bounds": json.dumps(bounds)}


def _version_dir(out: Path, role: str) -> Path:
    version = out / role / "1"
    version.mkdir(parents=True, exist_ok=True)
    return version


def _link(source: Path, version: Path) -> None:
    """The export's files into ``version`` (hard links, else copies)."""
    for stale in version.glob("model.onnx*"):
        stale.unlink()
    for src in source.glob("model.onnx*"):
        try:
            os.link(src, version / src.name)
        except OSError:
            shutil.copy2(src, version / src.name)


def _remove_other_engine_files(version: Path, keep: tuple[str, ...]) -> None:
    """Files another engine left in a version folder (a repository rebuilt for another engine)."""
    for path in version.iterdir():
        if path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_tensorrt(settings: RepositorySettings, say: Say):
    """Fail before the long export when TensorRT or the GPUs cannot build; the engine builder."""
    from driffusion.export import tensorrt as trt_build

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
        f"[repository] TensorRT {version} (server's: {server}, {source}); engines for {where}, "
        f"built on GPU {settings.gpus[0]}"
    )

    def build(*args, **kwargs):
        return trt_build.build_engine(*args, gpu=gpu, **kwargs)

    return build


# --- the orchestrator ---------------------------------------------------------------------------


def write_orchestrator(out: Path, pipe, family: FamilySpec, settings: RepositorySettings):
    """The ``driffusion`` model (and ``driffusion_stream``, its decoupled twin, unless
    ``stream_instances`` is 0): the BLS model, its settings and the pipeline's tokenizers and
    scheduler config."""
    service = orchestrator_settings(pipe, family, settings)
    models = {ORCHESTRATOR: (settings.orchestrator_instances, False)}
    if settings.stream_instances:
        models[STREAM] = (settings.stream_instances, True)
    stale = out / STREAM
    if not settings.stream_instances and stale.exists():
        shutil.rmtree(stale)
    for name, (instances, decoupled) in models.items():
        version = out / name / "1"
        assets = version / "pipeline"
        if assets.exists():
            shutil.rmtree(assets)
        assets.mkdir(parents=True)
        for role in family.text_roles:  # tokenizer of text_encoder[_2] is tokenizer[_2]
            attr = family.components[role].pipeline_attr.replace("text_encoder", "tokenizer")
            getattr(pipe, attr).save_pretrained(assets / attr)
        pipe.scheduler.save_config(assets / "scheduler")
        shutil.copy2(MODELS_DIR / ORCHESTRATOR / "model.py", version / "model.py")
        service.save(version)
        (out / name / "config.pbtxt").write_text(
            orchestrator_config(name, instances, decoupled=decoupled)
        )


def orchestrator_settings(pipe, family: FamilySpec, settings: RepositorySettings):
    """What the orchestrator needs to serve ``pipe``: limits, defaults, the samplers a request
    may choose and the preview map."""
    from driffusion.export.wrappers import fit_preview
    from driffusion.samplers import check_supported, make_scheduler, sampler_name, samplers_for

    check_supported(pipe.scheduler)
    config = dict(pipe.scheduler.config)
    config["_class_name"] = type(pipe.scheduler).__name__
    own = sampler_name(config)
    prediction = "flow" if family.conditioning == "sd3" else config.get("prediction_type")
    samplers = samplers_for(prediction or "epsilon")
    limit = api.Limits().max_steps
    steps_limit = min(
        [max_steps(copy.deepcopy(pipe.scheduler), limit)]
        + [max_steps(make_scheduler(name, config), limit) for name in samplers]
    )
    if steps_limit < 1:
        raise RepositoryBuildError(f"{type(pipe.scheduler).__name__}: no step count works")
    height, width = family.default_size
    return ServiceSettings(
        family=family,
        denoiser_instances=settings.instances,
        model_timeout_s=settings.model_timeout_s,
        request_timeout_s=settings.request_timeout_s,
        limits=api.Limits(
            max_steps=steps_limit,
            max_k=settings.max_k,
            min_size=family.min_size,
            max_size=family.max_size,
            size_multiple=family.size_multiple,
            max_images=settings.max_images,
            samplers=samplers,
        ),
        defaults=api.Defaults(
            steps=settings.default_steps or family.num_inference_steps,
            guidance_scale=(
                family.guidance_scale
                if settings.default_guidance is None
                else settings.default_guidance
            ),
            height=height,
            width=width,
            k=min(4, settings.max_k),
            scheduler=own,
        ),
        preview=fit_preview(pipe.vae, family),
    )


# --- what a repository was built from ----------------------------------------------------------


def repository_manifest(pipeline: str | Path, settings: RepositorySettings) -> dict:
    """What ``build_repository`` records in ``repository.json`` (besides the engine records): the
    pipeline, a fingerprint of its files, of this driffusion's code, and the settings. A
    repository whose record has these same values is up to date."""
    return {
        "pipeline": str(Path(pipeline).resolve()) if Path(pipeline).exists() else str(pipeline),
        "fingerprint": pipeline_fingerprint(pipeline),
        "loras": lora_records(settings.loras),  # path, scale, fingerprint of the weights file
        "code": code_fingerprint(),
        "settings": json.loads(json.dumps(asdict(settings))),  # as read back from JSON
    }


def _weights_key(manifest: dict) -> str:
    """Identity of the weights a manifest's repository serves: the pipeline's fingerprint, and
    with LoRAs, theirs and their scales (order matters: fusing is a sum, but in floating point)."""
    loras = manifest.get("loras") or []
    if not loras:
        return manifest.get("fingerprint", "")  # the key of a build without LoRAs, as before
    return _digest(
        manifest.get("fingerprint"), *(f"{r['fingerprint']}*{r['scale']!r}" for r in loras)
    )


def is_up_to_date(repository: str | Path, pipeline: str | Path, settings: RepositorySettings):
    """Whether ``repository`` was built from ``pipeline`` with ``settings`` by this code."""
    previous = read_manifest(repository)
    wanted = repository_manifest(pipeline, settings)
    return previous is not None and all(previous.get(k) == v for k, v in wanted.items())


def pipeline_fingerprint(pipeline: str | Path) -> str:
    """A cheap identity of a pipeline folder's files (path, size, mtime): changes when it is
    retrained or replaced, so the repository is re-exported instead of serving stale weights. A
    hub id is its own identity."""
    folder = Path(pipeline)
    if not folder.is_dir():
        return _digest(str(pipeline))
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def code_fingerprint() -> str:
    """Identity of the code that writes a repository and reads it back (the models' ``model.py``,
    the settings and config formats): a repository written by another driffusion version is
    rewritten rather than served with settings this version cannot read."""
    import driffusion

    package = Path(driffusion.__file__).resolve().parent
    files = sorted(MODELS_DIR.rglob("*.py")) + [
        package / name for name in ("api.py", "service.py", "tensors.py", "families.py")
    ]
    files += [Path(__file__).resolve(), Path(__file__).resolve().parent / "config.py"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def read_manifest(repository: str | Path) -> dict | None:
    """What a repository was built from, or None if it is not one of ours."""
    path = Path(repository) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
