"""The ``torch`` engine's component files: a pipeline module saved as its library saves it, and
loaded back behind its spec wrapper (``driffusion.export.wrappers``).

    <version>/component/component.json   role, spec, the module's class and library
    <version>/component/module/          the module's save_pretrained folder (config + safetensors)

Loading needs diffusers or transformers (whichever saved it) and torch; no ONNX, no TensorRT. On a
CUDA device the module runs in the dtype the repository was built for (fp16 by default), on the
CPU in fp32.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from driffusion.tensors import ModelSpec, model_from_dict

COMPONENT_FILE = "component.json"


def save_component(pipe: Any, spec: ModelSpec, folder: str | Path) -> dict[str, Any]:
    """Save the module ``spec`` names from ``pipe`` into ``folder``; returns the record written."""
    folder = Path(folder)
    module = getattr(pipe, spec.pipeline_attr, None)
    if module is None:
        raise ValueError(f"{spec.role}: the pipeline has no {spec.pipeline_attr!r} component")
    library = type(module).__module__.split(".")[0]  # "diffusers" | "transformers"
    if library not in ("diffusers", "transformers"):
        raise ValueError(
            f"{spec.role}: {type(module).__name__} is neither diffusers nor transformers"
        )
    module.save_pretrained(folder / "module", safe_serialization=True)
    record = {
        "role": spec.role,
        "spec": asdict(spec),
        "library": library,
        "class": type(module).__name__,
    }
    (folder / COMPONENT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return {k: v for k, v in record.items() if k != "spec"}


def load_component(folder: str | Path, *, device: str = "cpu", dtype: str = "float32"):
    """(wrapper module in eval mode on ``device`` in ``dtype``, its ModelSpec)."""
    import importlib

    import torch

    from .wrappers import wrap_component

    folder = Path(folder)
    record = json.loads((folder / COMPONENT_FILE).read_text())
    spec = model_from_dict(record["spec"])
    cls = getattr(importlib.import_module(record["library"]), record["class"])
    module = cls.from_pretrained(folder / "module", torch_dtype=getattr(torch, dtype))
    holder = type("Components", (), {spec.pipeline_attr: module})()
    wrapper = wrap_component(holder, spec)
    wrapper = wrapper.to(device=device, dtype=getattr(torch, dtype))  # buffers too (SDXL VAE stats)
    return wrapper.eval().requires_grad_(False), spec
