"""Loading diffusers pipelines the way every driffusion tool does: fp32, from a folder or hub id."""

from __future__ import annotations

import json
from pathlib import Path


def load_pipeline(source: str | Path, *, local_files_only: bool | None = None):
    """``DiffusionPipeline.from_pretrained`` for a local folder or a hub id (fp32, CPU).

    SD3 is loaded without its T5 encoder (the context is then zero-filled, as diffusers does).
    A local folder never touches the network; a hub id needs a machine that can download.
    """
    from diffusers import DiffusionPipeline

    path = Path(source)
    local = path.is_dir() if local_files_only is None else local_files_only
    kwargs = {}
    index = path / "model_index.json"
    if index.exists():
        model_index = json.loads(index.read_text())
        if "text_encoder_3" in model_index:
            kwargs = dict(text_encoder_3=None, tokenizer_3=None)
    elif local:
        raise ValueError(f"{source}: no model_index.json, not a diffusers pipeline folder")
    return DiffusionPipeline.from_pretrained(str(source), local_files_only=local, **kwargs)
