"""LoRA adapters fused into a pipeline before it is exported or served.

``driffusion export --lora PATH[:SCALE]`` (repeatable) gives :class:`Lora` values;
:func:`fuse_loras` loads each into the pipeline with diffusers' PEFT backend
(``load_lora_weights``), weights them with ``set_adapters``, fuses them into the denoiser's and the
text encoders' weights (``fuse_lora``) and unloads the adapter modules, so that every engine
exports, saves or runs a plain module with the adapted weights.

A LoRA is a local ``.safetensors`` file, a folder holding one (``pytorch_lora_weights.safetensors``,
or its only ``.safetensors`` file), or a hub id on a machine that can download. Every failure is a
:class:`LoraError` naming the LoRA and saying why: a missing or unreadable file, weights that match
no module of this pipeline (a LoRA made for another model), a missing or too old ``peft``.

:func:`lora_records` is what a repository's manifest records of them (path, scale and a
fingerprint of the weights file), so that a changed or added LoRA rebuilds the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_PREFIX = "driffusion_lora_"  # adapter names while loading: driffusion_lora_0, ...
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
_SCALE = re.compile(r"[-+0-9.eE]*")  # what a ":SCALE" suffix looks like (else part of the path)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class LoraError(ValueError):
    """A LoRA cannot be applied; the message starts with ``LoRA <path>:`` and says why."""


@dataclass(frozen=True)
class Lora:
    """One adapter: ``path`` (a file, a folder or a hub id) fused at ``scale``."""

    path: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if not self.path:
            raise ValueError("a LoRA path must not be empty")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            scale = math.nan
        if isinstance(self.scale, bool) or not math.isfinite(scale):
            raise ValueError(f"LoRA {self.path}: scale must be a finite number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)

    @classmethod
    def parse(cls, text: str) -> Lora:
        """``"PATH"`` or ``"PATH:SCALE"`` (scale 1.0 by default). A suffix after the last colon
        that does not look like a number is part of the path."""
        path, colon, suffix = text.rpartition(":")
        if not colon or not _SCALE.fullmatch(suffix):
            return cls(text)
        try:
            scale = float(suffix)
        except ValueError:
            raise ValueError(f"LoRA {path}: scale must be a number, got {suffix!r}") from None
        return cls(path, scale)

    @classmethod
    def coerce(cls, value: Any) -> Lora:
        """A Lora from a Lora, ``"PATH[:SCALE]"``, ``{"path", "scale"}`` or ``(path, scale)``."""
        if isinstance(value, Lora):
            return value
        if isinstance(value, (str, Path)):
            return cls.parse(str(value))
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (list, tuple)) and len(value) in (1, 2):
            return cls(*value)
        raise ValueError(f"a LoRA is PATH[:SCALE] or {{'path', 'scale'}}, got {value!r}")

    def __str__(self) -> str:
        return self.path if self.scale == 1.0 else f"{self.path}:{self.scale:g}"


# --- where the weights are ---------------------------------------------------------------------


def weights_file(lora: Lora) -> Path | None:
    """The local weights file of ``lora``; None for a hub id. LoraError when a local path is
    missing or a folder holds no single weights file."""
    path = Path(lora.path).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if (path / DEFAULT_WEIGHT_NAME).is_file():
            return (path / DEFAULT_WEIGHT_NAME).resolve()
        if len(files) == 1:
            return files[0].resolve()
        if (path / "pytorch_lora_weights.bin").is_file():
            return (path / "pytorch_lora_weights.bin").resolve()
        found = ", ".join(f.name for f in files) or "none"
        raise LoraError(
            f"LoRA {lora.path}: the folder holds no single LoRA weights file (.safetensors files: "
            f"{found}); name the file itself"
        )
    if _is_hub_id(lora.path):
        return None
    raise LoraError(f"LoRA {lora.path}: no such file or folder")


def _is_hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path spelling (absolute, ./, ~, a weights file)."""
    return bool(_HUB_ID.fullmatch(text)) and not text.endswith((".safetensors", ".bin"))


def lora_fingerprint(lora: Lora) -> str:
    """SHA-256 (16 hex digits) of the weights file's bytes; for a hub id, of the id."""
    file = weights_file(lora)
    digest = hashlib.sha256()
    if file is None:
        digest.update(f"hub:{lora.path}".encode())
    else:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def lora_records(loras: Sequence[Lora]) -> list[dict[str, Any]]:
    """What a repository manifest records of its LoRAs, in order: the weights file (or hub id),
    the scale and the fingerprint of the file's bytes. LoraError for a missing path."""
    records = []
    for lora in loras:
        file = weights_file(lora)
        records.append(
            {
                "path": lora.path if file is None else str(file),
                "scale": lora.scale,
                "fingerprint": lora_fingerprint(lora),
            }
        )
    return records


# --- fusing --------------------------------------------------------------------------------------


def check_peft(version: str | None = None, name: str = "") -> None:
    """LoraError (naming the LoRA ``name``) unless diffusers' PEFT backend can load LoRAs:
    ``peft`` installed, at least diffusers' ``MIN_PEFT_VERSION``. ``version``: the installed
    peft's (default: read from the environment)."""
    from importlib import metadata

    from diffusers.utils import MIN_PEFT_VERSION, USE_PEFT_BACKEND
    from packaging.version import Version

    where = f"LoRA {name}: " if name else "LoRAs: "
    if version is None:
        try:
            version = metadata.version("peft")
        except metadata.PackageNotFoundError:
            raise LoraError(
                f"{where}loading LoRAs needs peft, which is not installed (driffusion pins it; "
                f"diffusers needs peft >= {MIN_PEFT_VERSION})"
            ) from None
    if Version(version) < Version(MIN_PEFT_VERSION):
        raise LoraError(
            f"{where}peft {version} is too old for diffusers' LoRA loading "
            f"(it needs peft >= {MIN_PEFT_VERSION})"
        )
    if not USE_PEFT_BACKEND:
        raise LoraError(
            f"{where}diffusers' PEFT backend is off (peft {version}; it also needs a recent "
            "transformers): reinstall driffusion's pinned dependencies"
        )


def fuse_loras(pipe: Any, loras: Sequence[Lora], progress=None) -> None:
    """Load ``loras`` into ``pipe``, fuse them at their scales into the denoiser and text
    encoders, and unload the adapter modules: the pipeline's modules are plain again, with the
    adapted weights. Raises LoraError naming the LoRA that failed (the pipeline is then partly
    modified: load it again)."""
    if not loras:
        return
    say = progress or (lambda _m: None)
    check_peft(name=loras[0].path)
    if not hasattr(pipe, "load_lora_weights"):
        raise LoraError(f"LoRA {loras[0].path}: {type(pipe).__name__} cannot load LoRAs")
    names = []
    for i, lora in enumerate(loras):
        name = f"{ADAPTER_PREFIX}{i}"
        _load(pipe, lora, name)
        names.append(name)
        say(f"[lora] loaded {lora} ({_adapter_parameters(pipe, name)} LoRA tensors)")
    components = [
        c for c, adapters in pipe.get_list_adapters().items() if set(adapters) & set(names)
    ]
    with _quiet():
        try:
            pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
            pipe.fuse_lora(
                components=components, lora_scale=1.0, safe_fusing=True, adapter_names=names
            )
            pipe.unload_lora_weights()
        except Exception as exc:
            which = ", ".join(lora.path for lora in loras)
            raise LoraError(
                f"LoRA {which}: fusing into {', '.join(components)} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    left = [c for c in components if _adapter_modules(getattr(pipe, c))]
    if left:
        raise LoraError(f"LoRA {loras[0].path}: adapter modules remain in {', '.join(left)}")
    say(f"[lora] fused {len(loras)} LoRA(s) into {', '.join(components)}")


def _load(pipe: Any, lora: Lora, name: str) -> None:
    file = weights_file(lora)
    if file is None:  # a hub id
        source, kwargs = lora.path, {}
    else:
        source, kwargs = str(file.parent), {"weight_name": file.name, "local_files_only": True}
    try:
        with _quiet():
            state = pipe.lora_state_dict(source, **kwargs)
            state = state[0] if isinstance(state, tuple) else state
            pipe.load_lora_weights(source, adapter_name=name, **kwargs)
    except Exception as exc:
        raise LoraError(f"LoRA {lora.path}: {_why(exc, file)}") from exc
    tensors = [k for k in state if "lora" in k and not k.endswith(".alpha")]
    loaded = _adapter_parameters(pipe, name)
    if loaded < len(tensors):
        unmatched = _unmatched_keys(pipe, tensors)
        example = f" (e.g. {', '.join(unmatched[:3])})" if unmatched else ""
        components = ", ".join(c for c in pipe._lora_loadable_modules if getattr(pipe, c, None))
        what = (
            f"none of its {len(tensors)} weight tensors match a module"
            if loaded == 0
            else f"{len(tensors) - loaded} of its {len(tensors)} weight tensors match no module"
        )
        raise LoraError(
            f"LoRA {lora.path}: {what} of this {type(pipe).__name__} ({components}): its target "
            f"modules were not found{example}; is it a LoRA for another model?"
        )


def _why(exc: Exception, file: Path | None) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if "size mismatch" in text:
        first = next((line.strip() for line in text.splitlines() if "size mismatch" in line), "")
        model = re.search(r"state_dict for (\w+)", text)
        return (
            "its weights do not fit this pipeline's modules (another model's LoRA?): "
            + (f"{model.group(1)}." if model else "")
            + first.removeprefix("size mismatch for ")
        )
    if "PEFT backend is required" in text:
        return f"diffusers' PEFT backend is unavailable (peft missing or too old): {text}"
    if file is None:
        return f"not a local file or folder, and loading it as a hub id failed: {text}"
    if isinstance(exc, OSError) or "Unable to load" in text or "header" in text.lower():
        return f"{file} cannot be read as LoRA weights: {text}"
    return text


def _adapter_parameters(pipe: Any, name: str) -> int:
    """Parameters of adapter ``name`` across the pipeline's LoRA-loadable components."""
    count = 0
    for component in pipe._lora_loadable_modules:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for key, _ in module.named_parameters():
            parts = key.split(".")
            count += name in parts
    return count


def _unmatched_keys(pipe: Any, keys: Sequence[str]) -> list[str]:
    """Keys of a LoRA state dict (``component.module.path.lora_X.weight``) naming no module."""
    out = []
    for key in keys:
        component, _, rest = key.partition(".")
        module = getattr(pipe, component, None)
        path = rest.split(".lora")[0]
        if module is None:
            out.append(key)
            continue
        try:
            module.get_submodule(path)
        except AttributeError:
            try:
                module.get_submodule(path.removeprefix("text_model."))
            except AttributeError:
                out.append(key)
    return out


def _adapter_modules(module: Any) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and transformers' loading chatter off (the checks here say what matters)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = (diffusers_logging.get_verbosity(), transformers_logging.get_verbosity())
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its own error log, re-raised
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # peft's config/state-dict notes
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
