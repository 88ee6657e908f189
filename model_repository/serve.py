"""``driffusion serve``: write (or reuse) the model repository and run Triton on it.

repository = prepare_repository(None, RepositorySettings())   # the embedded model
serve(repository, ServerOptions(grpc_port=8001))               # until SIGTERM / Ctrl-C
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from driffusion.tensors import DENOISER

from .build import (
    ORCHESTRATOR,
    RepositorySettings,
    build_repository,
    is_up_to_date,
    read_manifest,
)
from .paths import cache_dir, embedded_dir

# The embedded model's guidance: 100% prompt-match accuracy at 1.5 and 3.0, lower Frechet
# distance at 1.5 (training/README.md).
EMBEDDED_GUIDANCE = 1.5
ROLES = ("all", "denoiser")
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
    max_request_mb: float = 8.0  # largest request body / gRPC message, after decompression
    drain_s: float = 10.0  # on SIGTERM: not ready at once, in-flight requests get this long
    # all: the served pipeline; denoiser: only the denoiser instances, for other servers'
    # orchestrators (their --remote-denoisers)
    role: str = "all"
    # denoiser servers the orchestrator also fans a round's drafts out to: HOST:PORT[/N] each
    remote_denoisers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role == "denoiser" and self.remote_denoisers:
            raise ValueError("remote denoisers are for role all (a server with an orchestrator)")
        if self.remote_denoisers:
            from driffusion.routing import parse_endpoints

            parse_endpoints(",".join(self.remote_denoisers))  # ValueError names a bad entry


def serve(repository: Path, options: ServerOptions, progress: Say = print) -> int:
    """Serve ``repository`` until SIGTERM or Ctrl-C; 0 when stopped.

    Triton runs on loopback ports of its own under a :class:`Supervisor` (dead workers replaced,
    a dead server restarted); a :class:`Front` takes the public HTTP and gRPC ports: it bounds
    request sizes, answers the health endpoints with the supervisor's readiness, and lets an HTTP
    client's disconnect cancel its request. The admin APIs open only to requests carrying the key
    in ``$DRIFFUSION_ADMIN_KEY`` (closed to everyone when it is not set).

    ``options.role == "denoiser"`` loads only the denoiser (no orchestrator, text encoders or
    VAE), behind the same front, for the ``remote_denoisers`` of other servers. Those reach the
    orchestrator as its ``remote_denoisers`` config parameter, applied when Triton loads it
    (``TritonServer(config_parameters=...)``): the repository is not written to. The python
    models' warnings and errors in Triton's log are echoed to ``progress`` (:class:`LogEcho`).
    """
    from driffusion.routing import PARAMETER

    from .front import Front, FrontLimits
    from .server import ADMIN_HEADER, ADMIN_KEY_ENV, TritonServer, find_free_ports
    from .supervisor import Supervisor

    limits = FrontLimits(max_request_bytes=int(options.max_request_mb * 2**20))
    admin_key = os.environ.get(ADMIN_KEY_ENV) or None
    internal_http, internal_grpc = find_free_ports(2)
    only_denoiser = options.role == "denoiser"
    remote = ",".join(options.remote_denoisers)
    server = TritonServer(
        repository,
        http_port=internal_http,
        grpc_port=internal_grpc,
        metrics_port=options.metrics_port,
        address="127.0.0.1",
        metrics_address=options.address,
        log_path=options.log,
        binary=options.tritonserver,
        admin_key=admin_key,
        models=[DENOISER] if only_denoiser else None,
        config_parameters=(
            {m: {PARAMETER: remote} for m in orchestrators(repository)} if remote else None
        ),
        thread_pool_size=None if only_denoiser else bls_thread_pool_size(repository),
        # a request at the size limit fits the python backend's region without growing it
        shm_default_byte_size=max(16 * 2**20, 2 * limits.max_request_bytes),
    )
    supervisor = Supervisor(server, say=progress)
    stopping = {"signal": None}

    def readiness():
        if stopping["signal"] is not None:
            return False, "shutting down"
        return supervisor.readiness()

    front = Front(
        server.http_url,
        server.grpc_url,
        address=options.address,
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        limits=limits,
        readiness=readiness,
        liveness=supervisor.liveness,
    )

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if only_denoiser:
        progress(f"[serve] role denoiser: serving only the {DENOISER} of {repository}")
    if remote:
        progress(f"[serve] remote denoisers: {remote} (fan-out over them and the local instances)")
    progress(f"[serve] starting tritonserver on {repository} ...")
    supervisor.start()
    try:
        front.start()
        progress(
            f"[serve] ready: gRPC {front.grpc_url}  HTTP http://{front.http_url}  "
            f"metrics {server.metrics_url}  (health: /v2/health/ready)"
        )
        opened = f"open with header {ADMIN_HEADER}" if admin_key else f"closed; set {ADMIN_KEY_ENV}"
        progress(
            f"[serve] admin APIs (repository, shared memory, logging, trace, statistics): {opened}"
        )
        progress(
            f"[serve] requests up to {options.max_request_mb:g} MiB; log: {server.log_path}; "
            "stop with Ctrl-C or SIGTERM"
        )
        echo = LogEcho(server.log_path, progress)
        while stopping["signal"] is None:
            time.sleep(0.2)
            echo.poll()
    finally:
        progress("[serve] stopping: not ready, draining requests in flight ...")
        front.stop(grace_s=options.drain_s)
        supervisor.stop()
    progress("[serve] stopped")
    return 0


class LogEcho:
    """Echoes the warnings and errors that driffusion's python models write to Triton's log (a
    remote denoiser marked down, a failed request) to ``serve``'s own output, where container logs
    see them: ``[triton] W routing.py: remote denoiser ... failed: ...``. Only the first line of a
    record; a log that Triton truncated on a restart is read again from its start."""

    RECORD = re.compile(r'^([WEF])\d{4} \S+ +\d+ (\w+\.py):\d+\] "?(.*?)"?$')

    def __init__(self, path: Path | None, say: Say):
        self.path, self.say, self.offset = path, say, 0  # the server started it afresh

    def poll(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:
                    self.offset = 0  # truncated: a restarted server's log
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            m = self.RECORD.match(line)
            if m:
                self.say(f"[triton] {m.group(1)} {m.group(2)}: {m.group(3)}")


def orchestrators(repository: Path) -> list[str]:
    """The orchestrator models of a repository: ``driffusion`` and, where built, its streaming
    twin ``driffusion_stream``."""
    from .build import STREAM

    return [m for m in (ORCHESTRATOR, STREAM) if (Path(repository) / m / "config.pbtxt").exists()]


def bls_thread_pool_size(repository: Path) -> int:
    """Threads the python backend needs for the orchestrators' model calls: every orchestrator
    instance's executor at once (``service.executor_threads``), and at least Triton's default."""
    from driffusion.service import ServiceSettings, executor_threads

    from .build import ORCHESTRATOR
    from .config import parse_config

    folder = Path(repository) / ORCHESTRATOR
    config = parse_config((folder / "config.pbtxt").read_text())
    instances = sum(g.count for g in config.instance_group)
    return max(32, instances * executor_threads(ServiceSettings.load(folder / "1")))
