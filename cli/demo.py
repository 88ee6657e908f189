"""``driffusion demo``: the main job, end to end on this machine.

Builds (or reuses) the model repository of the embedded model, starts a real Triton server on free
local ports, compares sequential sampling with DRiffusion on one seed over gRPC (latency, rounds,
image difference, PNGs and an enlarged side-by-side comparison), then stops the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .progress import progress

DEFAULT_PROMPT = "a handwritten digit seven"
# On the CPU every denoiser call is padded to this, standing for one GPU per denoiser instance.
DEFAULT_EMULATED_LATENCY_MS = 50.0


def run_demo(
    settings,
    request: dict[str, Any],
    repeats: int,
    out_dir: Path | None,
    repository: Path | None,
    *,
    pipeline: str | None = None,
) -> int:
    """Serve ``settings``' repository (the embedded model unless ``pipeline``), print the
    comparison of ``request`` against sequential, write the images to ``out_dir``."""
    from driffusion.client import DriffusionClient
    from driffusion.client.bench import compare
    from driffusion.model_repository.paths import cache_dir
    from driffusion.model_repository.serve import prepare_repository
    from driffusion.model_repository.server import TritonServer

    print("== DRiffusion demo: draft-and-refine sampling served by Triton ==", flush=True)
    out_dir = out_dir or cache_dir() / "demo"
    repository = prepare_repository(repository, settings, pipeline, progress=print)
    server = TritonServer.on_free_ports(repository)
    print(f"[demo] starting tritonserver (gRPC {server.grpc_url}) ...", flush=True)
    with server:
        print(f"[demo] server ready; log {server.log_path}", flush=True)
        if settings.emulated_latency_ms:
            print(
                f"[demo] every denoiser call is padded to >= {settings.emulated_latency_ms:g} ms, "
                f"standing for one GPU per denoiser instance ({settings.instances} instances); "
                "--emulated-latency-ms 0 shows raw CPU time",
                flush=True,
            )
        with DriffusionClient(server.grpc_url) as client:
            client.wait_ready(timeout_s=60)
            result = compare(client, request, repeats, progress=progress)
    print("[demo] server stopped", flush=True)
    print(result.table())
    paths = result.write_images(out_dir)
    for path in paths:
        print(f"wrote {path}")
    side = side_by_side(paths, out_dir / "comparison.png")
    print(f"[demo] sequential | {result.mode} k={result.k}, enlarged: {side}")
    return 0


def side_by_side(paths: list[Path], out: Path, height: int = 256) -> Path:
    """The images next to each other, enlarged (nearest neighbour) to ``height`` pixels."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    scaled = [im.resize((im.width * height // im.height, height), Image.NEAREST) for im in images]
    gap = 8
    canvas = Image.new(
        "RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white"
    )
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    canvas.save(out)
    return out
