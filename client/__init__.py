"""gRPC client of the served ``driffusion`` model (tritonclient), used by the CLI and tests."""

from .client import (
    DriffusionClient,
    DriffusionError,
    GenerateResult,
    Progress,
    build_inputs,
    max_abs_diff,
    psnr,
    save_png,
)

__all__ = [
    "DriffusionClient",
    "DriffusionError",
    "GenerateResult",
    "Progress",
    "build_inputs",
    "max_abs_diff",
    "psnr",
    "save_png",
]
