"""``driffusion serve``: write (or reuse) the model repository and run Triton on it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from .build import RepositorySettings, build_repository, read_manifest, repository_manifest

ROOT = Path(__file__).resolve().parent.parent  # the source checkout (editable install)
EMBEDDED = ROOT / "embedded" / "digits"  # the trained embedded default (a diffusers folder)
# Its guidance: 100% prompt-match accuracy at 1.5 and 3.0, lower Frechet distance at 1.5
# (embedded/digits/training_record.json; training/README.md).
EMBEDDED_GUIDANCE = 1.5
BUILD = ROOT / ".build"


def embedded_pipeline(progress=print) -> tuple[Path, str]:
    """(pipeline folder, family) of the embedded default model.

    The trained digits pipeline when the checkout has it; otherwise a tiny random-weight SD2.1-like
    pipeline built from config (it shows the serving path, not image quality).
    """
    if (EMBEDDED / "model_index.json").exists():
        return EMBEDDED, "sd21"
    from driffusion.export.tiny import build_tiny_pipeline

    tiny = BUILD / "tiny-sd21"
    if not (tiny / "model_index.json").exists():
        progress(
            f"[serve] no trained embedded model: building a random-weight tiny pipeline {tiny}"
        )
        build_tiny_pipeline("sd21", tiny)
    return tiny, "sd21"


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say which pipeline is served and how (shared by serve and demo)."""
    g = parser.add_argument_group("model repository")
    g.add_argument("--pipeline", help="diffusers pipeline folder (default: the embedded model)")
    g.add_argument(
        "--family",
        default=None,
        choices=("sd21", "sdxl", "sd3"),
        help="spec family of --pipeline (default sd21)",
    )
    g.add_argument(
        "--repository",
        type=Path,
        default=BUILD / "model_repository",
        help="where the repository is written or reused (default .build/model_repository)",
    )
    g.add_argument("--rebuild", action="store_true", help="re-export the ONNX files")
    g.add_argument(
        "--denoiser-instances",
        type=int,
        default=4,
        help="denoiser instances, one per device (default 4)",
    )
    g.add_argument(
        "--orchestrator-instances",
        type=int,
        default=4,
        help="requests served at once without queueing (default 4)",
    )
    g.add_argument(
        "--max-k", type=int, default=8, help="largest k a request may ask for (default 8)"
    )
    g.add_argument(
        "--emulated-latency-ms",
        type=float,
        default=0.0,
        help="pad every denoiser call to at least this long, standing for a GPU "
        "(default 0: raw CPU)",
    )


def prepare_repository(args: argparse.Namespace, progress=print) -> Path:
    """Build the repository for ``args``, or reuse it when it was built the same way."""
    guidance = None  # the family's default
    if args.pipeline:
        pipeline, family = Path(args.pipeline), args.family or "sd21"
    else:
        pipeline, family = embedded_pipeline(progress)
        family = args.family or family
        guidance = EMBEDDED_GUIDANCE if pipeline == EMBEDDED else None
    settings = RepositorySettings(
        default_guidance=guidance,
        family=family,
        denoiser_instances=args.denoiser_instances,
        orchestrator_instances=args.orchestrator_instances,
        max_k=args.max_k,
        emulated_latency_ms=args.emulated_latency_ms,
    )
    wanted = json.loads(json.dumps(repository_manifest(pipeline, settings)))  # as read back
    if read_manifest(args.repository) == wanted and not args.rebuild:
        progress(f"[serve] reusing {args.repository} (built from {pipeline})")
        return args.repository
    return build_repository(
        pipeline, args.repository, settings, force=args.rebuild, progress=progress
    )


def serve(args: argparse.Namespace) -> int:
    """Start Triton on the repository and keep it up until SIGTERM or Ctrl-C."""
    from .server import TritonServer

    repository = prepare_repository(args)
    server = TritonServer(
        repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        log_path=args.log,
    )
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"[serve] starting tritonserver on {repository} ...", flush=True)
    server.start()
    print(
        f"[serve] ready: gRPC {server.grpc_url}  HTTP http://{server.http_url}  "
        f"metrics {server.metrics_url}",
        flush=True,
    )
    print(f"[serve] log: {server.log_path}; stop with Ctrl-C or SIGTERM", flush=True)
    try:
        while stop["signal"] is None and server.returncode is None:
            time.sleep(0.2)
    finally:
        code = server.returncode
        print("[serve] stopping ...", flush=True)
        server.stop()
    if code is not None:
        print(
            f"[serve] tritonserver exited by itself with code {code}\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    print("[serve] stopped", flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the pipeline through Triton (gRPC 8001, HTTP 8000)")
    add_repository_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument(
        "--address",
        default="127.0.0.1",
        help="bind address for HTTP, gRPC and metrics (default 127.0.0.1: this machine "
        "only; 0.0.0.0 exposes it)",
    )
    g.add_argument("--http-port", type=int, default=8000, help="default 8000")
    g.add_argument("--grpc-port", type=int, default=8001, help="default 8001")
    g.add_argument("--metrics-port", type=int, default=8002, help="default 8002")
    g.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    p.set_defaults(func=serve)
