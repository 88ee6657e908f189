"""Recovery after a worker process dies, through the real ``driffusion serve``.

    .venv/bin/python benchmarks/bench_recovery.py [--repeats 2] [--write]

Serves the embedded digits model (2 denoiser instances, 2 orchestrator instances, every denoiser
call padded to 20 ms, standing for a GPU) with ``driffusion serve`` in a subprocess. One client
sends 20-step aggressive k=4 requests back to back the whole time. For each kind of worker
(denoiser, text encoder, VAE decoder, orchestrator, and tritonserver itself) one process is
killed with SIGKILL; measured from the kill: when ``/v2/health/ready`` turned false, when it was
true again (the supervisor's replacement serving), the latency of the requests that ran during
the recovery against the median before the kill, and how many failed. Writes the ``recovery``
section of BENCHMARKS.md with ``--write``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from driffusion.client import DriffusionClient, DriffusionError
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.paths import embedded_dir
from driffusion.model_repository.server import find_free_ports, repository_processes
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("denoiser", "text_encoder", "vae_decoder", "driffusion", "tritonserver")
COUNTS = {"denoiser": 2, "text_encoder": 1, "vae_decoder": 1, "driffusion": 2, "tritonserver": 1}
REQUEST = dict(prompt="a handwritten digit seven", steps=20, mode="aggressive", k=4)


def pids(repository: Path, kind: str) -> list[int]:
    """Live processes of a worker kind (python-backend stubs by model) or of tritonserver."""
    return repository_processes(repository, None if kind == "tritonserver" else kind)


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Load:
    """Requests back to back on a thread: (start, seconds, error or None) of each."""

    def __init__(self, url: str):
        self.url, self.log, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with DriffusionClient(self.url) as client:
            seed = 0
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    client.generate(**REQUEST, seed=seed, timeout_s=120)
                    error = None
                except DriffusionError as e:
                    error = str(e)[:120]
                    time.sleep(0.05)  # as a client backs off, not spinning on a restarting server
                self.log.append((start, time.monotonic() - start, error))
                seed += 1


def measure(serve_url: str, grpc_url: str, repository: Path, kind: str, load: Load) -> dict:
    time.sleep(3.0)  # a steady state before the kill
    waited = time.monotonic()
    while len(victims := pids(repository, kind)) != COUNTS[kind]:  # a reload's old workers gone
        if time.monotonic() - waited > 60:
            raise RuntimeError(f"{len(victims)} {kind} processes, expected {COUNTS[kind]}")
        time.sleep(0.2)
    before = [s for t, s, e in load.log[-10:] if e is None]
    killed = time.monotonic()
    os.kill(victims[0], signal.SIGKILL)
    not_ready = None
    while time.monotonic() - killed < 30:
        if not ready(serve_url):
            not_ready = time.monotonic() - killed
            break
        time.sleep(0.02)
    while not ready(serve_url):
        if time.monotonic() - killed > 180:
            raise RuntimeError(f"{kind}: not ready again within 180 s")
        time.sleep(0.05)
    back = time.monotonic() - killed
    time.sleep(2.0)
    during = [(t, s, e) for t, s, e in load.log if t + s >= killed and t <= killed + back]
    return {
        "kind": kind,
        "not_ready_s": not_ready,
        "ready_s": back,
        "median_before_ms": statistics.median(before) * 1e3 if before else float("nan"),
        "during": len(during),
        "failed": sum(e is not None for _, _, e in during),
        "max_during_ms": max((s for _, s, _ in during), default=0.0) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="kills per kind (default 2)")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    settings = RepositorySettings(
        denoiser_instances=2,
        orchestrator_instances=2,
        emulated_latency_ms=20.0,
        default_guidance=1.5,
    )
    repository = build_repository(embedded_dir() / "digits", work / "repo", settings, progress=None)
    http, grpc, metrics = find_free_ports(3)
    env = dict(os.environ, DRIFFUSION_CACHE=str(work / "cache"))
    log = open(work / "serve.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    print(f"driffusion serve's output: {work / 'serve.log'}", flush=True)
    serve = subprocess.Popen(
        [sys.executable, "-m", "driffusion.cli", "serve", "--repository", str(repository)]
        + ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    serve_url, grpc_url = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}"
    rows = []
    try:
        with DriffusionClient(grpc_url) as client:
            client.wait_ready(timeout_s=180)
        load = Load(grpc_url)
        load.thread.start()
        for kind in args.kinds:
            for _ in range(args.repeats):
                row = measure(serve_url, grpc_url, repository, kind, load)
                print(row, flush=True)
                rows.append(row)
        load.stop.set()
        load.thread.join(timeout=120)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=120)
    table = [
        "| killed | readiness false after | ready again after | requests during recovery | "
        "failed | slowest during / median before |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["max_during_ms"] / r["median_before_ms"]
        nr = "-" if r["not_ready_s"] is None else f"{r['not_ready_s']:.2f} s"
        table.append(
            f"| {r['kind']} | {nr} | {r['ready_s']:.1f} s | {r['during']} | {r['failed']} | "
            f"{r['max_during_ms']:.0f} / {r['median_before_ms']:.0f} ms ({ratio:.1f}x) |"
        )
    body = "\n".join(
        [
            "## Recovery after a worker is killed (`benchmarks/bench_recovery.py`)",
            "",
            "The embedded digits model under `driffusion serve` (2 denoiser and 2 orchestrator "
            "instances, denoiser calls padded to 20 ms); one client sends 20-step aggressive k=4 "
            "requests back to back; one process of each kind is killed (SIGKILL) at a time. "
            "*Readiness* is `/v2/health/ready` on the front; *failed*: requests that got an "
            "error (our client sends a request that hit a dead orchestrator worker again, as the "
            "front does for other clients, so those are not counted as failed).",
            "",
            *table,
        ]
    )
    print(body)
    if args.write:
        write_section("recovery", body)


if __name__ == "__main__":
    main()
