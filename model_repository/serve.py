"""``driffusion serve``: write (or reuse) the model repository and run Triton on it.

repository = prepare_repository(None, RepositorySettings())   # the embedded model
serve(repository, ServerOptions(grpc_port=8001))               # until SIGTERM / Ctrl-C
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .build import RepositorySettings, build_repository, is_up_to_date, read_manifest
from .paths import cache_dir, embedded_dir

# The embedded model's guidance: 100% prompt-match accuracy at 1.5 and 3.0, lower Frechet
# distance at 1.5 (training/README.md).
EMBEDDED_GUIDANCE = 1.5
Say = Callable[[str], object]


def embedded_pipeline(progress: Say = print) -> tuple[Path, float | None]:
    """(pipeline folder, default guidance) of the embedded default model.

    The trained digits pipeline shipped with the package; where it is absent (a checkout without
    it), a tiny random-weight SD2.1-like pipeline built from config (it shows the serving path,
    not image quality).
    """
    digits = embedded_dir() / "digits"
    if (digits / "model_index.json").exists():
        return digits, EMBEDDED_GUIDANCE
    from driffusion.export.tiny import build_tiny_pipeline

    tiny = cache_dir() / "tiny-sd21"
    if not (tiny / "model_index.json").exists():
        progress(f"[serve] no embedded model: building a random-weight tiny pipeline {tiny}")
        build_tiny_pipeline("sd21", tiny)
    return tiny, None


def prepare_repository(
    repository: Path | None,
    settings: RepositorySettings,
    pipeline: str | Path | None = None,
    *,
    rebuild: bool = False,
    timing_cache: Path | None = None,
    progress: Say = print,
) -> Path:
    """The repository to serve: built for ``pipeline`` (default: the embedded model) with
    ``settings``, or reused when it was built the same way by this driffusion.

    ``repository`` defaults to ``model_repository`` in the cache folder. A repository given
    without a pipeline that holds a driffusion build is served as it was built.
    """
    if repository is not None and pipeline is None and not rebuild:
        manifest = read_manifest(repository)
        if manifest is not None:
            progress(f"[serve] serving {repository} as built from {manifest['pipeline']}")
            return Path(repository)
    repository = Path(repository) if repository is not None else cache_dir() / "model_repository"
    if pipeline is None:
        pipeline, guidance = embedded_pipeline(progress)
        settings = replace(settings, default_guidance=guidance)
    if not rebuild and is_up_to_date(repository, pipeline, settings):
        progress(f"[serve] reusing {repository} (built from {pipeline})")
        return repository
    return build_repository(
        pipeline,
        repository,
        settings,
        force=rebuild,
        timing_cache=timing_cache,
        progress=progress,
    )


@dataclass(frozen=True)
class ServerOptions:
    """How ``serve`` runs Triton."""

    address: str = "127.0.0.1"  # bind address of HTTP, gRPC and metrics
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log: Path | None = None  # server log file (default: a temp file)
    tritonserver: Path | None = None  # a tritonserver binary (default: the pytriton wheel's)


def serve(repository: Path, options: ServerOptions, progress: Say = print) -> int:
    """Start Triton on ``repository`` and keep it up until SIGTERM or Ctrl-C; 0 when stopped, 1
    when the server exited by itself."""
    from .server import TritonServer

    server = TritonServer(
        repository,
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        metrics_port=options.metrics_port,
        address=options.address,
        log_path=options.log,
        binary=options.tritonserver,
    )
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    progress(f"[serve] starting tritonserver on {repository} ...")
    server.start()
    progress(
        f"[serve] ready: gRPC {server.grpc_url}  HTTP http://{server.http_url}  "
        f"metrics {server.metrics_url}"
    )
    progress(f"[serve] log: {server.log_path}; stop with Ctrl-C or SIGTERM")
    try:
        while stop["signal"] is None and server.returncode is None:
            time.sleep(0.2)
    finally:
        code = server.returncode
        progress("[serve] stopping ...")
        server.stop()
    if code is not None:
        print(
            f"[serve] tritonserver exited by itself with code {code}\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    progress("[serve] stopped")
    return 0
