"""Where driffusion keeps what it builds, and where the embedded model is.

One rule, the same from a checkout and from an installed wheel: build outputs (model
repositories, ONNX exports, the TensorRT timing cache, demo images, the Triton backend folder) go
under ``$DRIFFUSION_CACHE`` when set, else ``$XDG_CACHE_HOME/driffusion`` (default
``~/.cache/driffusion``). The checkout's ``make demo`` sets ``DRIFFUSION_CACHE=.build``.
The embedded model is package data: ``driffusion.embedded`` (the ``embedded/`` folder).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DRIFFUSION_CACHE"


def cache_dir() -> Path:
    """``$DRIFFUSION_CACHE``, else ``$XDG_CACHE_HOME/driffusion`` (``~/.cache/driffusion``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "driffusion"


def embedded_dir() -> Path:
    """The folder of the embedded models shipped with the package (``embedded/`` in a checkout)."""
    import driffusion.embedded

    return Path(driffusion.embedded.__file__).resolve().parent
