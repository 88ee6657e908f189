"""Write a complete Triton model repository for one diffusers pipeline.

    <repository>/
      text_encoder[_2]/1/model.onnx + model.py   python backend, ONNX Runtime (CPU)
      denoiser/1/model.onnx + model.py           ``denoiser_instances`` instances
      vae_decoder/1/model.onnx + model.py
      driffusion/1/model.py                      the BLS orchestrator
      driffusion/1/settings.json                 family spec, limits, defaults, fan-out width
      driffusion/1/pipeline/                     tokenizer(s) and scheduler config
      repository.json                            what it was built from (for reuse)

Every ``config.pbtxt`` is rendered from the specs (``config.py``). Re-running reuses the ONNX files
unless ``force``; configs and settings are always rewritten (cheap, and they follow the settings).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from driffusion import api
from driffusion.service import ServiceSettings
from driffusion.specs import DENOISER, PRECISIONS, FamilySpec, at_precision, family_for_pipeline

from .config import component_config, orchestrator_config

ORCHESTRATOR = "driffusion"  # the served model's name
MODELS_DIR = Path(__file__).resolve().parent / "models"
MANIFEST = "repository.json"


@dataclass(frozen=True)
class RepositorySettings:
    """How the repository is laid out and served."""

    family: str = "sd21"  # spec family of the pipeline: sd21 | sdxl | sd3
    denoiser_instances: int = 4  # one per device; CPU: KIND_CPU instances
    orchestrator_instances: int = 4  # concurrent requests served without queueing
    max_k: int = 8  # largest k a request may ask for
    emulated_latency_ms: float = 0.0  # pad each denoiser call (stands for a GPU on a CPU box)
    emulated_latency_per_item_ms: float = 0.0  # ... plus this per batch row
    emulated_compute_delay_ms: float = 5.0  # ... the CPU model's work starts this far into it
    # fp32 | fp16 (specs.at_precision): the ONNX files' weights and the served tensors' dtypes.
    # ONNX Runtime's CPU provider runs most fp16 operators in float32 behind inserted casts.
    precision: str = "fp32"
    intra_op_threads: int = 1  # ONNX Runtime threads per instance
    model_timeout_s: float = 120.0  # a model call not answered by then fails its request
    default_steps: int | None = None  # None: the family's
    default_guidance: float | None = None  # None: the family's

    def __post_init__(self) -> None:
        for name in ("denoiser_instances", "orchestrator_instances", "max_k", "intra_op_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.model_timeout_s > 0:
            raise ValueError(f"model_timeout_s must be > 0, got {self.model_timeout_s}")
        for name in (
            "emulated_latency_ms",
            "emulated_latency_per_item_ms",
            "emulated_compute_delay_ms",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def build_repository(
    pipeline: str | Path,
    out: str | Path,
    settings: RepositorySettings | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], object] | None = print,
) -> Path:
    """Export ``pipeline`` (a diffusers folder) and write the repository to ``out``."""
    from driffusion.export.onnx import export_component, matches_spec
    from driffusion.export.pipelines import load_pipeline

    settings = settings or RepositorySettings()
    say = progress or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    say(f"[repository] loading {pipeline}")
    pipe = load_pipeline(pipeline)
    family = at_precision(family_for_pipeline(settings.family, pipe), settings.precision)
    previous, manifest = read_manifest(out), repository_manifest(pipeline, settings)
    if previous is not None and not force:
        if any(previous.get(key) != manifest[key] for key in ("pipeline", "fingerprint")):
            say(f"[repository] {out} was built from another pipeline or weights: re-exporting")
            force = True
    trace = (family.min_size, family.min_size)
    for role, spec in family.components.items():
        version = out / role / "1"
        version.mkdir(parents=True, exist_ok=True)
        onnx = version / "model.onnx"
        if force or not onnx.exists() or not matches_spec(onnx, spec):
            t0 = time.perf_counter()
            say(f"[repository] exporting {role} to ONNX ...")
            export_component(pipe, spec, onnx, trace_size=trace)
            say(f"[repository] exported {role} in {time.perf_counter() - t0:.1f} s")
        else:
            say(f"[repository] {role}: reusing {onnx} (--force re-exports)")
        shutil.copy2(MODELS_DIR / "onnx_runtime" / "model.py", version / "model.py")
        params: dict[str, object] = {"intra_op_threads": settings.intra_op_threads}
        instances = 1
        if role == DENOISER:
            instances = settings.denoiser_instances
            params["emulated_latency_ms"] = settings.emulated_latency_ms
            params["emulated_latency_per_item_ms"] = settings.emulated_latency_per_item_ms
            params["emulated_compute_delay_ms"] = settings.emulated_compute_delay_ms
        config = component_config(role, spec, engine="onnx", instances=instances, parameters=params)
        (out / role / "config.pbtxt").write_text(config)
    write_orchestrator(out / ORCHESTRATOR, pipe, family, settings)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    say(f"[repository] {out} ready in {time.perf_counter() - start:.1f} s")
    return out


def write_orchestrator(folder: Path, pipe, family: FamilySpec, settings: RepositorySettings):
    version = folder / "1"
    assets = version / "pipeline"
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir(parents=True)
    for role in family.text_roles:  # tokenizer of text_encoder[_2] is tokenizer[_2]
        attr = family.components[role].pipeline_attr.replace("text_encoder", "tokenizer")
        getattr(pipe, attr).save_pretrained(assets / attr)
    pipe.scheduler.save_config(assets / "scheduler")
    shutil.copy2(MODELS_DIR / ORCHESTRATOR / "model.py", version / "model.py")
    height, width = family.default_size
    service = ServiceSettings(
        family=family,
        denoiser_instances=settings.denoiser_instances,
        model_timeout_s=settings.model_timeout_s,
        limits=api.Limits(
            max_k=settings.max_k,
            min_size=family.min_size,
            max_size=family.max_size,
            size_multiple=family.size_multiple,
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
        ),
    )
    service.save(version)
    (folder / "config.pbtxt").write_text(
        orchestrator_config(ORCHESTRATOR, settings.orchestrator_instances)
    )


def repository_manifest(pipeline: str | Path, settings: RepositorySettings) -> dict:
    """What ``build_repository`` records in ``repository.json``: the pipeline folder and a
    fingerprint of its files, of this driffusion's code, and the settings. A repository whose
    record equals this one is up to date."""
    return {
        "pipeline": str(Path(pipeline).resolve()),
        "fingerprint": pipeline_fingerprint(pipeline),
        "code": code_fingerprint(),
        "settings": asdict(settings),
    }


def pipeline_fingerprint(pipeline: str | Path) -> str:
    """A cheap identity of a pipeline folder's files (path, size, mtime): changes when it is
    retrained or replaced, so the repository is re-exported instead of serving stale weights."""
    folder = Path(pipeline)
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
        package / name for name in ("api.py", "service.py", "specs.py")
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
