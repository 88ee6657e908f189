"""Run NVIDIA Triton Inference Server on a model repository, without Docker.

The ``nvidia-pytriton`` wheel (pip extra ``driffusion[server]``) ships a real ``tritonserver``
binary, the python backend and one python-backend stub per Python version. ``TritonServer``
assembles a backend directory from them, starts the server in its own process group with the
environment the stub needs, waits until it is ready and cleans up (process group, shared memory)
on stop.

    with TritonServer("model_repository/models", models=["denoiser"]) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

What the stub needs (docs/facts.md): the wheel's ``nvidia_pytriton.libs`` on LD_LIBRARY_PATH
(without it the server hangs), the folder of this interpreter's ``libpython3.x.so`` too (else it
binds the system's), and this interpreter's ``bin`` first on PATH (that is how the stub finds the
venv's packages).

Where the wheel is not installed, ``distribution=TritonDistribution.from_folder(folder)`` runs its
server from its parts unpacked into ``folder`` (``benchmarks/gpu/pack_server.sh``); ``python=``
runs the models in another virtual environment than the caller's (its ``bin`` first on PATH).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.metadata
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import paths

_PIP_HINT = "install the server extra: pip install 'driffusion[server]'"
_SHM_DIR = Path("/dev/shm")
STUB = "triton_python_backend_stub"


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def read_metrics(url: str, timeout_s: float = 10.0) -> Metrics:
    """Prometheus text exposition at ``url`` as {(name, labels): value}."""
    text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
    values: Metrics = {}
    for m in re.finditer(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.M):
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        values[(m.group(1), labels)] = values.get((m.group(1), labels), 0.0) + float(m.group(3))
    return values


def metric_sum(values: Metrics, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, have), v in values.items() if n == name and want <= have)


class TritonServerError(RuntimeError):
    """The server could not be found, started or stopped."""


# Triton's APIs that no client of the served model needs: closed unless the request carries
# ADMIN_HEADER with the server's admin key (Triton's restricted-API feature). Health, metadata,
# model config (read-only; perf_analyzer reads it) and inference stay open.
ADMIN_APIS = ("model-repository", "shared-memory", "logging", "trace", "statistics")
ADMIN_HEADER = "driffusion-admin-key"  # HTTP header; gRPC: triton-grpc-protocol-<this>
ADMIN_KEY_ENV = "DRIFFUSION_ADMIN_KEY"


@dataclass(frozen=True)
class Stub:
    """One python-backend worker process (a model instance) of a running server."""

    pid: int
    model: str  # the model's folder name
    instance: str  # Triton's instance name, e.g. denoiser_0_1
    region: str  # its shared-memory region under /dev/shm
    state: str  # /proc state letter: R, S, D, T (stopped), Z ...

    @property
    def serving(self) -> bool:
        """Alive and not stopped: a stopped (T) worker takes requests and never answers."""
        return self.state not in ("Z", "X", "T", "t")


@dataclass(frozen=True)
class TritonDistribution:
    """Files of the tritonserver shipped in the nvidia-pytriton wheel (installed, or a folder laid
    out as the wheel installs it: :meth:`from_folder`)."""

    binary: Path  # tritonserver executable
    libs_dir: Path  # nvidia_pytriton.libs: libcudart & co., needed even on CPU
    backend_lib: Path  # python backend: libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for the running Python version
    version: str  # nvidia-pytriton version

    @classmethod
    def from_folder(cls, root: str | os.PathLike, version: str | None = None) -> TritonDistribution:
        """The server under ``root``, a folder with the wheel's layout: a ``site-packages`` that
        holds the installed wheel, or the parts of it unpacked elsewhere
        (``benchmarks/gpu/pack_server.sh``)::

            root/pytriton/tritonserver/bin/tritonserver
            root/pytriton/tritonserver/backends/python/{libtriton_python.so, ..._utils.py}
            root/pytriton/tritonserver/python_backend_stubs/<3.x>/triton_python_backend_stub
            root/nvidia_pytriton.libs/                    (libcudart, libtritonserver, ...)
            root/nvidia_pytriton-<version>.dist-info/     (optional: the version)

        ``version``: default from the ``dist-info`` folder's name, else ``"unknown"``. Raises
        ``TritonServerError`` naming what is missing, including a stub for this Python.
        """
        root = Path(root).resolve()
        if version is None:
            infos = sorted(root.glob("nvidia_pytriton-*.dist-info"))
            version = (
                infos[-1].name.removeprefix("nvidia_pytriton-").removesuffix(".dist-info")
                if infos
                else None
            )
        server_dir = root / "pytriton" / "tritonserver"
        backend = server_dir / "backends" / "python"
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            binary=server_dir / "bin" / "tritonserver",
            libs_dir=root / "nvidia_pytriton.libs",
            backend_lib=backend / "libtriton_python.so",
            backend_utils=backend / "triton_python_backend_utils.py",
            stub=server_dir / "python_backend_stubs" / python_version / STUB,
            version=version or "unknown",
        )
        missing = [dist.binary, dist.libs_dir, dist.backend_lib, dist.backend_utils]
        missing = [str(p) for p in missing if not p.exists()]
        if missing:
            raise TritonServerError(f"{root}: no complete tritonserver, missing {missing}")
        if not dist.stub.exists():
            raise TritonServerError(
                f"{root}: nvidia-pytriton {dist.version} has no python-backend stub for Python "
                f"{python_version} (looked for {dist.stub})"
            )
        return dist


def locate_tritonserver() -> TritonDistribution:
    """Find tritonserver and the python backend inside the installed ``pytriton`` package."""
    try:
        import pytriton
    except ImportError as exc:
        raise TritonServerError(f"nvidia-pytriton is not installed; {_PIP_HINT}") from exc
    site = Path(pytriton.__file__).resolve().parent.parent
    try:
        return TritonDistribution.from_folder(
            site, version=importlib.metadata.version("nvidia-pytriton")
        )
    except TritonServerError as exc:
        raise TritonServerError(f"nvidia-pytriton is incomplete: {exc}; {_PIP_HINT}") from exc


def prepare_backend_directory(dist: TritonDistribution, cache_dir: Path | None = None) -> Path:
    """Return a ``--backend-directory`` holding ``python/`` with the .so, the utils and the stub.

    The stub must sit next to ``libtriton_python.so``; the backend chmods it, so the files are
    copied rather than linked. Built once per wheel and Python version, atomically (a rename), so
    concurrent callers are safe.
    """
    stub = dist.stub.stat()
    key = hashlib.sha1(f"{dist.stub}:{stub.st_size}:{stub.st_mtime_ns}".encode()).hexdigest()[:10]
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = (cache_dir or paths.cache_dir()) / f"triton-backends-{dist.version}-py{py}-{key}"
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        (staging / "python").mkdir()
        for src in (dist.backend_lib, dist.backend_utils, dist.stub):
            shutil.copy2(src, staging / "python" / src.name)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "python" / "triton_python_backend_stub").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that are free right now (racy by nature; for tests)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def server_environment(
    dist: TritonDistribution,
    base: dict[str, str] | None = None,
    python: str | os.PathLike | None = None,
) -> dict:
    """Environment for tritonserver and its python stubs (see the module docstring).

    ``python``: the interpreter whose environment the stubs run in (its ``bin`` first on PATH, its
    libpython's folder on LD_LIBRARY_PATH); default the running one.
    """
    env = dict(os.environ if base is None else base)
    if python is None:
        venv_bin, libdir = Path(sys.executable).parent, sysconfig.get_config_var("LIBDIR") or ""
    else:  # not resolved: a virtual environment's bin/python links to its base interpreter
        venv_bin, libdir = Path(python).absolute().parent, python_info(python)[1]
    lib_dirs = [str(dist.libs_dir), libdir]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in [*lib_dirs, env.get("LD_LIBRARY_PATH", "")] if p
    )
    env["PATH"] = os.pathsep.join(p for p in [str(venv_bin), env.get("PATH", "")] if p)
    return env


def python_info(python: str | os.PathLike) -> tuple[str, str]:
    """(``"3.x"``, the folder of its libpython) of another interpreter, asked by running it."""
    code = (
        "import sys, sysconfig; print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
        "print(sysconfig.get_config_var('LIBDIR') or '')"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise TritonServerError(f"python {python}: cannot be run ({exc})") from exc
    version, libdir = (done.stdout.splitlines() + ["", ""])[:2]
    return version, libdir


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it dies (even by SIGKILL),
    so a killed benchmark or test run leaves no server holding ports and /dev/shm (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# Started beside tritonserver in a session of its own, so that it outlives whoever started the
# server: once tritonserver has exited (its starter killed outright, say), its python-backend
# workers get a few seconds to exit by themselves, then the rest of its process group is killed
# and its shared memory removed. A worker whose server dies while it waits on the server (in its
# initialize or finalize) never exits on its own: its parent-watch thread needs the GIL, which
# the waiting main thread holds (Triton 2.51's stub).
_REAPER = (
    'while kill -0 "$1" 2>/dev/null; do sleep 1; done; sleep 3; '
    'kill -KILL "-$1" 2>/dev/null; rm -f /dev/shm/"$2"*; exit 0'
)


def _start_reaper(pid: int, shm_prefix: str) -> subprocess.Popen:
    """The reaper of tritonserver ``pid``'s process group (``_REAPER``)."""
    return subprocess.Popen(
        ["sh", "-c", _REAPER, "driffusion-reaper", str(pid), shm_prefix],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def repository_processes(repository: Path, model: str | None = None) -> list[int]:
    """Pids of the live processes serving ``repository``, whoever started them (Linux /proc):
    its python-backend workers of ``model``, or with ``model=None`` its tritonservers."""
    repository = Path(repository)
    server = f"--model-repository={repository}".encode()
    worker = f"{repository}/{model}/1/model.py".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:  # it exited while we looked
            continue
        if state in "ZX" or len(argv) < 2:
            continue
        if argv[1] == worker if model else argv[0].endswith(b"tritonserver") and server in argv:
            found.append(int(proc.name))
    return found


def model_names(repository: Path) -> list[str]:
    """The models of a repository: its folders that hold a ``config.pbtxt``."""
    return sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))


def live_group_members(pgid: int, include_stopped: bool = True) -> list[int]:
    """Pids of the non-zombie processes in process group ``pgid`` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process exited while we looked
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X") and (include_stopped or state not in "Tt"):
            members.append(int(stat.parent.name))
    return members


class TritonServer:
    """A tritonserver process on a model repository; a context manager.

    Args:
        model_repository: folder with one sub-folder per model (``config.pbtxt``, ``1/...``).
        http_port, grpc_port, metrics_port: ports; use ``find_free_ports(3)`` in tests.
        address: bind address for HTTP, gRPC and metrics.
        models: models to load (explicit model control); ``None`` loads every model.
        log_verbose: tritonserver ``--log-verbose`` level (0 = off).
        log_path: server log (stdout and stderr); default a fresh temporary folder.
        shm_default_byte_size: python backend shared-memory region per instance.
        exit_timeout_s: how long tritonserver waits for in-flight requests on SIGTERM.
        start_timeout_s: ``start()`` gives up after this long.
        stop_grace_s: after SIGTERM, ``stop()`` waits this long before SIGKILL.
        extra_args: appended to the tritonserver command line.
        cache_dir: where the backend directory is assembled (``paths.cache_dir()``).
        admin_key: the secret that opens the admin APIs (``ADMIN_APIS``) to requests carrying
            ``ADMIN_HEADER``; default: a random one, known only to this object (``admin_headers``).
        thread_pool_size: the python backend's pool for BLS calls (its default is 32).
        metrics_address: bind address of the metrics endpoint (default: ``address``).
        binary: a tritonserver binary of its own installation (NVIDIA's container:
            ``/opt/tritonserver/bin/tritonserver``), run with its own ``backends`` folder and the
            environment as it is; default: the nvidia-pytriton wheel's.
        distribution: the wheel's server from another folder (``TritonDistribution.from_folder``:
            the parts of the wheel unpacked where it is not installed), run with the same backend
            folder and environment as the installed wheel; default: the installed wheel's.
        python: the interpreter whose environment the python-backend models run in (a virtual
            environment's ``bin/python``, of this interpreter's Python version); default this
            interpreter. With the wheel's server only.
        config_parameters: {model: {name: value}}: these models are loaded with these extra
            ``parameters`` in their config, through Triton's config override on load (the
            repository's files are not touched: it may be read-only). They are loaded once the
            others are ready, on every start; ``reload`` keeps the parameters (it reloads the
            loaded config).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        models: Sequence[str] | None = None,
        log_verbose: int = 0,
        log_path: str | os.PathLike | None = None,
        shm_default_byte_size: int = 16 * 1024 * 1024,
        exit_timeout_s: int = 3,
        start_timeout_s: float = 120.0,
        stop_grace_s: float = 30.0,
        extra_args: Sequence[str] = (),
        cache_dir: str | os.PathLike | None = None,
        binary: str | os.PathLike | None = None,
        admin_key: str | None = None,
        thread_pool_size: int | None = None,
        metrics_address: str | None = None,
        distribution: TritonDistribution | None = None,
        python: str | os.PathLike | None = None,
        config_parameters: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise ValueError(f"model_repository: {self.model_repository} is not a folder")
        if isinstance(models, str):
            raise ValueError("models: pass a list of model names, not a string")
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.models = None if models is None else list(models)
        self.config_parameters = {
            model: {str(k): str(v) for k, v in params.items()}
            for model, params in (config_parameters or {}).items()
        }
        for model in self.config_parameters:
            if self.models is not None and model not in self.models:
                raise ValueError(f"config_parameters: {model} is not among the models to load")
            if not (self.model_repository / model / "config.pbtxt").is_file():
                raise ValueError(f"config_parameters: no model {model} in {self.model_repository}")
        self.log_verbose = log_verbose
        self._log_path = Path(log_path) if log_path is not None else None
        self.shm_default_byte_size = shm_default_byte_size
        self.exit_timeout_s = exit_timeout_s
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.extra_args = list(extra_args)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.binary = Path(binary) if binary is not None else None
        if admin_key is not None and not re.fullmatch(r"[\x21-\x7e]{16,}", admin_key):
            raise ValueError("admin_key must be at least 16 printable ASCII characters, no spaces")
        self._admin_key = admin_key or secrets.token_urlsafe(24)
        self.thread_pool_size = thread_pool_size
        self.metrics_address = metrics_address or address
        if self.binary is not None and not self.binary.is_file():
            raise ValueError(f"binary: {self.binary} is not a file")
        if self.binary is not None and distribution is not None:
            raise ValueError("give binary (an installation of its own) or distribution, not both")
        self.distribution = distribution
        self.python = Path(python).absolute() if python is not None else None
        if self.python is not None and (self.binary is not None or not self.python.is_file()):
            raise ValueError(f"python: {python} is not a file, or given with binary")
        # Unique per server: killed servers leave /dev/shm/<prefix>* behind and we remove them.
        self._shm_prefix = f"driffusion_{os.getpid()}_{secrets.token_hex(4)}_"
        self._process: subprocess.Popen | None = None
        self._reaper: subprocess.Popen | None = None  # outlives us: see _REAPER

    @classmethod
    def on_free_ports(cls, model_repository: str | Path, **kwargs) -> TritonServer:
        """A server on three free local ports (HTTP, gRPC, metrics), as tests and benchmarks
        want; ``kwargs`` as for the constructor."""
        http, grpc, metrics = find_free_ports(3)
        return cls(model_repository, http_port=http, grpc_port=grpc, metrics_port=metrics, **kwargs)

    # -- addresses -------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.address, self.address)

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc``."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` for ``tritonclient.http``."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus endpoint, ``http://host:port/metrics``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(
            self.metrics_address, self.metrics_address
        )
        return f"http://{host}:{self.metrics_port}/metrics"

    def metrics(self) -> Metrics:
        """The Prometheus endpoint's samples now (Triton's and driffusion's own)."""
        return read_metrics(self.metrics_url)

    @property
    def log_path(self) -> Path | None:
        """Server log file (set once started when not given)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """Pid of tritonserver (also its process group id), ``None`` when not running."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The server's exit code once it has exited by itself; ``None`` while it runs."""
        return self._process.poll() if self._process is not None else None

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the admin APIs (gRPC metadata: ``grpc_admin_headers``)."""
        return {ADMIN_HEADER: self._admin_key}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """gRPC metadata that opens the admin APIs (tritonclient's ``headers=``)."""
        return {f"triton-grpc-protocol-{ADMIN_HEADER}": self._admin_key}

    @property
    def shm_prefix(self) -> str:
        """Python backend shared-memory prefix: regions are ``/dev/shm/<prefix>*``."""
        return self._shm_prefix

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self, backend_directory: Path, binary: Path) -> list[str]:
        """The tritonserver command line."""
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--metrics-address={self.metrics_address}",
            f"--metrics-port={self.metrics_port}",
            f"--http-restricted-api={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self._admin_key}",
            f"--grpc-restricted-protocol={','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self._admin_key}",
            "--disable-auto-complete-config",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_byte_size}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.thread_pool_size is not None:
            cmd.append(f"--backend-config=python,thread-pool-size={self.thread_pool_size}")
        # Explicit model control (with the repository API closed to all but the admin key), so a
        # model whose worker died can be reloaded in place (``reload``).
        models = ["*"] if self.models is None else self.models
        if self.config_parameters:  # loaded with their parameters once the server is up
            names = self.models if self.models is not None else model_names(self.model_repository)
            models = [m for m in names if m not in self.config_parameters]
        cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        return cmd + self.extra_args

    def start(self) -> TritonServer:
        """Launch tritonserver and block until it is ready; raise ``TritonServerError`` if not."""
        if self._process is not None:
            raise TritonServerError(f"server already running (pid {self._process.pid})")
        if self.binary is None:
            dist = self.distribution or locate_tritonserver()
            if self.python is not None:
                version = python_info(self.python)[0]
                if version != f"{sys.version_info.major}.{sys.version_info.minor}":
                    raise TritonServerError(
                        f"python {self.python} is Python {version}; the stub is for this "
                        f"interpreter's {sys.version_info.major}.{sys.version_info.minor}"
                    )
            binary, env = dist.binary, server_environment(dist, python=self.python)
            backend_dir = prepare_backend_directory(dist, self.cache_dir)
        else:  # an installation of its own: <prefix>/bin/tritonserver, <prefix>/backends
            binary, env = self.binary, dict(os.environ)
            backend_dir = self.binary.resolve().parent.parent / "backends"
        if self._log_path is None:
            self._log_path = Path(tempfile.mkdtemp(prefix="driffusion-triton-")) / "server.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command(backend_dir, binary),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() reaches the stubs too
                preexec_fn=_terminate_with_parent,
            )
        self._reaper = _start_reaper(self._process.pid, self._shm_prefix)
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
            for model, parameters in self.config_parameters.items():
                self.load(model, parameters)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        """Until the server is ready and its metrics endpoint answers (it starts separately)."""
        ready = f"http://{self._client_host}:{self.http_port}/v2/health/ready"
        urls = [ready, self.metrics_url]
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            rc = self._process.poll()
            if rc is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {rc} before becoming ready\n{self.log_tail()}"
                )
            try:
                while urls:
                    with urllib.request.urlopen(urls[0], timeout=0.5) as response:
                        if response.status != 200:
                            break
                    urls.pop(0)
                if not urls:
                    return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or models still loading (400)
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {self.start_timeout_s:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stubs(self) -> list[Stub]:
        """The python-backend worker processes of this server now (Linux /proc)."""
        if self._process is None:
            return []
        out = []
        for pid in live_group_members(self._process.pid, include_stopped=True):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:  # it exited while we looked
                continue
            if len(argv) < 9 or not argv[0].endswith(b"triton_python_backend_stub"):
                continue
            model = Path(argv[1].decode()).parent.parent.name  # <repo>/<model>/<version>/model.py
            out.append(Stub(pid, model, argv[8].decode(), argv[2].decode(), state))
        return out

    def reload(self, model: str, timeout_s: float = 300.0) -> float:
        """Replace every instance of ``model`` with fresh workers, the old ones serving until the
        new ones are ready; returns the seconds it took. A plain load of an unchanged model keeps
        its instances, so the load carries the model's config with a new ``reload_nonce``
        parameter (no file is touched: the repository may be read-only)."""
        import json

        start = time.monotonic()
        base = f"http://{self._client_host}:{self.http_port}/v2"
        config = json.loads(self._http("GET", f"{base}/models/{model}/config", None, timeout_s))
        config.setdefault("parameters", {})["reload_nonce"] = {"string_value": secrets.token_hex(8)}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        self._http("POST", f"{base}/repository/models/{model}/load", body, timeout_s)
        return time.monotonic() - start

    def load(
        self, model: str, parameters: Mapping[str, str], timeout_s: float | None = None
    ) -> None:
        """Load ``model`` from the repository with ``parameters`` added to its config.pbtxt's
        (Triton's config override: the files stay as they are); blocks until it is loaded."""
        import json

        from google.protobuf import json_format

        from .config import parse_config

        config = parse_config((self.model_repository / model / "config.pbtxt").read_text())
        for key, value in parameters.items():
            config.parameters[key].string_value = value
        text = json_format.MessageToJson(config, preserving_proto_field_name=True)
        body = json.dumps({"parameters": {"config": text}}).encode()
        url = f"http://{self._client_host}:{self.http_port}/v2/repository/models/{model}/load"
        try:
            self._http("POST", url, body, timeout_s or self.start_timeout_s)
        except TritonServerError as exc:
            raise TritonServerError(f"loading {model} failed: {exc}\n{self.log_tail()}") from exc

    def _http(self, method: str, url: str, body: bytes | None, timeout_s: float) -> bytes:
        headers = {**self.admin_headers, "Content-Type": "application/json"}
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise TritonServerError(f"{method} {url}: HTTP {exc.code}: {detail}") from exc

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s`` (default ``stop_grace_s``),
        remove shared memory. A server that has already exited gets no grace: the workers it left
        (they outlive it) are killed at once.

        Idempotent; also runs at interpreter exit.
        """
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        pgid = process.pid
        if grace_s is None:
            grace_s = 0.0 if process.poll() is not None else self.stop_grace_s
        try:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
            deadline = time.monotonic() + grace_s
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
            # Stubs may outlive the server; give them the rest of the grace period.
            while live_group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if live_group_members(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                process.wait()
                kill_deadline = time.monotonic() + 5.0
                while live_group_members(pgid) and time.monotonic() < kill_deadline:
                    time.sleep(0.05)
        finally:
            for region in _SHM_DIR.glob(f"{self._shm_prefix}*"):
                with contextlib.suppress(FileNotFoundError):
                    region.unlink()
            reaper, self._reaper = self._reaper, None
            if reaper is not None:  # the group is gone; its work is done
                reaper.kill()
                reaper.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log, headed by its path."""
        if self._log_path is None or not self._log_path.exists():
            return "(no server log)"
        with open(self._log_path, errors="replace") as f:
            tail = "".join(deque(f, maxlen=lines))
        return f"--- last {lines} lines of {self._log_path} ---\n{tail}"

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self._process is not None else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, grpc={self.grpc_url}, {state})"
