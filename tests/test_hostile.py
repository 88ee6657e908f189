"""A careless or hostile client against ``driffusion serve`` (the real command, a real Triton, real
clients we did not write: curl, tritonclient HTTP and gRPC). After every probe the server must
still serve the next valid request normally. Probes are small enough for a shared 2-core machine:
out-of-contract shapes are refused before anything large is allocated, so no probe reproduces an
out-of-memory kill.

The workers are killed for real (SIGKILL of a python-backend process); nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from driffusion import count_rounds
from driffusion.client import DriffusionClient, DriffusionError
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    find_free_ports,
    repository_processes,
)

ADMIN_KEY = "hostile-test-admin-key-0123456789"
INSTANCES = {"denoiser": 2, "driffusion": 2, "text_encoder": 1, "vae_decoder": 1}


class Serve:
    """``driffusion serve`` in a subprocess (its own session), its output collected."""

    def __init__(self, repository: Path, env: dict[str, str]):
        self.http, self.grpc, self.metrics = find_free_ports(3)
        self.lines: list[str] = []
        argv = [sys.executable, "-m", "driffusion.cli", "serve", "--repository", str(repository)]
        argv += ["--http-port", str(self.http), "--grpc-port", str(self.grpc)]
        argv += ["--metrics-port", str(self.metrics)]
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.repository = repository

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, condition, timeout_s: float, what: str) -> float:
        start = time.monotonic()
        while not condition():
            exited = self.process.poll() is not None
            if exited or time.monotonic() - start > timeout_s:
                tail = "\n".join(self.lines[-30:])
                why = f"serve exited ({self.process.returncode})" if exited else f"{timeout_s} s"
                raise AssertionError(f"{what} not within {why}; serve said:\n{tail}")
            time.sleep(0.1)
        return time.monotonic() - start

    def current(self, model: str) -> list[int]:
        """The workers of ``model`` once a reload's old ones have gone (one set of instances)."""
        count = INSTANCES[model]
        self.wait(lambda: len(self.stubs(model)) == count, 30, f"{count} {model} worker(s)")
        return self.stubs(model)

    def stubs(self, model: str) -> list[int]:
        """Pids of the live worker processes of ``model``."""
        return repository_processes(self.repository, model)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def repository(tiny_pipeline_dir, tmp_path_factory):
    settings = RepositorySettings(
        denoiser_instances=2, orchestrator_instances=2, max_k=4, max_images=2
    )
    out = tmp_path_factory.mktemp("hostile") / "repo"
    return build_repository(tiny_pipeline_dir, out, settings, progress=None)


@pytest.fixture(scope="module")
def serve(repository):
    env = dict(os.environ, **{ADMIN_KEY_ENV: ADMIN_KEY})
    server = Serve(repository, env)
    try:
        server.wait(server.ready, 120, "driffusion serve ready")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(serve):
    with DriffusionClient(serve.grpc_url) as c:
        c.wait_ready(timeout_s=60)
        yield c


def serves_normally(client) -> None:
    out = client.generate("still fine", steps=4, seed=1, timeout_s=60)
    assert out.image.shape == (64, 64, 3) and out.rounds == count_rounds(4, "aggressive", 4)[0]


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) of a curl call (a client we did not write)."""
    result = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# --- admin APIs -------------------------------------------------------------------------------

ADMIN_CALLS = [  # (method, path, body): what no client of the served model needs
    ("POST", "/v2/logging", '{"log_error": false}'),
    (
        "POST",
        "/v2/systemsharedmemory/region/x/register",
        '{"key": "x", "offset": 0, "byte_size": 8}',
    ),
    ("POST", "/v2/repository/index", "{}"),
    ("POST", "/v2/repository/models/denoiser/unload", "{}"),
    ("GET", "/v2/models/driffusion/stats", None),
    ("GET", "/v2/trace/setting", None),
]


@needs_curl
@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS, ids=[c[1] for c in ADMIN_CALLS])
def test_admin_apis_are_closed_to_clients_without_the_key(serve, client, method, path, body):
    args = ["-X", method, f"{serve.http_url}{path}"] + (["-d", body] if body else [])
    status, text = curl(*args)
    assert status == 403 and ADMIN_HEADER in text
    serves_normally(client)


@needs_curl
def test_the_operator_opens_them_with_the_key_from_the_environment(serve):
    status, text = curl(
        "-X", "POST", "-H", f"{ADMIN_HEADER}: {ADMIN_KEY}", f"{serve.http_url}/v2/repository/index"
    )
    assert status == 200 and "driffusion" in text
    status, _ = curl("-X", "POST", "-H", f"{ADMIN_HEADER}: wrong", f"{serve.http_url}/v2/logging")
    assert status == 403


def test_grpc_admin_calls_need_the_key_too(serve, client):
    triton = grpcclient.InferenceServerClient(serve.grpc_url)
    for call in (
        lambda **kw: triton.update_log_settings({"log_error": False}, **kw),
        lambda **kw: triton.register_system_shared_memory("x", "/x", 8, **kw),
        lambda **kw: triton.get_model_repository_index(**kw),
        lambda **kw: triton.get_inference_statistics("driffusion", **kw),
    ):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    headers = {f"triton-grpc-protocol-{ADMIN_HEADER}": ADMIN_KEY}
    assert triton.get_model_repository_index(headers=headers).models
    serves_normally(client)


# --- internal models: what the driffusion model would never send is refused -------------------


def test_a_latent_larger_than_the_served_sizes_is_refused_before_decoding(serve, client):
    """1x4x256x256 (1 MiB) once grew a VAE worker to 22 GB; the tiny model serves 16..80 px,
    latents of 2..10 cells."""
    triton = httpclient.InferenceServerClient(serve.http_url.removeprefix("http://"))
    latent = httpclient.InferInput("latent", [1, 4, 256, 256], "FP32")
    latent.set_data_from_numpy(np.zeros((1, 4, 256, 256), np.float32))
    with pytest.raises(
        InferenceServerException, match=r"latent dim 2 \(latent_height\) must be in"
    ):
        triton.infer("vae_decoder", [latent])
    serves_normally(client)


def test_a_denoiser_batch_past_the_largest_round_is_refused(serve, client):
    triton = grpcclient.InferenceServerClient(serve.grpc_url)
    rows = 2 * 4 * 2 + 1  # max_k=4 drafts of max_images=2 images, CFG pairs, plus one
    inputs = []
    for name, shape, dtype in (
        ("sample", [rows, 4, 8, 8], np.float32),
        ("timestep", [rows], np.float32),
        ("encoder_hidden_states", [rows, 77, 32], np.float32),
    ):
        tensor = grpcclient.InferInput(name, shape, "FP32")
        tensor.set_data_from_numpy(np.zeros(shape, dtype))
        inputs.append(tensor)
    with pytest.raises(
        InferenceServerException, match=r"sample dim 0 \(batch\) must be in \[1, 16\]"
    ):
        triton.infer("denoiser", inputs)
    serves_normally(client)


# --- request values ------------------------------------------------------------------------------


def test_a_huge_bad_value_gets_a_short_invalid_argument(serve, client):
    with pytest.raises(DriffusionError) as err:
        client.generate("x", mode="m" * 100_000, timeout_s=60)
    assert err.value.is_invalid_argument
    assert "mode must be one of" in str(err.value) and len(str(err.value)) < 300
    serves_normally(client)


def test_the_largest_step_count_works(serve, client):
    settings = json.loads((serve.repository / "driffusion" / "1" / "settings.json").read_text())
    top = settings["limits"]["max_steps"]
    assert top >= 999  # DDIM with steps_offset=1: 1000 would ask for timestep 1000
    out = client.generate("x", steps=top, mode="aggressive", k=4, timeout_s=300)
    assert out.evaluations == top
    with pytest.raises(DriffusionError, match=rf"steps must be in \[1, {top}\]"):
        client.generate("x", steps=top + 1)


# --- bounded memory -------------------------------------------------------------------------------

LIMIT = 8 * 2**20  # driffusion serve's default --max-request-mb


def shm_and_rss(serve) -> tuple[int, int]:
    """(bytes of the python backend's /dev/shm regions, resident KiB of tritonserver)."""
    (triton,) = triton_pids(serve)
    regions = [p for p in Path("/dev/shm").glob("driffusion_*") if _owned(p, serve)]
    status = Path(f"/proc/{triton}/status").read_text()
    rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    return sum(p.stat().st_size for p in regions), rss


def _owned(region: Path, serve) -> bool:
    return any(region.name.encode() in _cmdline(pid) for pid in _all_stub_pids(serve))


def _all_stub_pids(serve) -> list[int]:
    return [
        pid
        for model in ("driffusion", "denoiser", "text_encoder", "vae_decoder")
        for pid in serve.stubs(model)
    ]


def triton_pids(serve) -> list[int]:
    return repository_processes(serve.repository)


@needs_curl
def test_an_oversized_body_is_refused_before_triton_sees_it(serve, client, tmp_path):
    before = shm_and_rss(serve)
    big = tmp_path / "big.json"
    prompt = "p" * (LIMIT + 1)
    big.write_text(
        json.dumps(
            {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [prompt]}]}
        )
    )
    status, text = curl(
        "-X", "POST", "--data-binary", f"@{big}", f"{serve.http_url}/v2/models/driffusion/infer"
    )
    assert status == 413 and "max_request_bytes" in text
    after = shm_and_rss(serve)
    assert after[0] == before[0] and after[1] < before[1] + 16 * 1024  # no lasting growth
    serves_normally(client)


@needs_curl
def test_a_gzip_bomb_is_refused_without_inflating_it(serve, client, tmp_path):
    import gzip

    before = shm_and_rss(serve)
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(gzip.compress(b"[" + b" " * (2 * LIMIT) + b"]"))  # about 25 KB on disk
    status, text = curl(
        "-X",
        "POST",
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        f"@{bomb}",
        f"{serve.http_url}/v2/models/driffusion/infer",
    )
    assert status == 413 and "inflated" in text
    assert shm_and_rss(serve)[0] == before[0]
    serves_normally(client)


def test_an_oversized_grpc_message_is_refused(serve, client):
    triton = grpcclient.InferenceServerClient(serve.grpc_url)
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"p" * (LIMIT + 1)], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        triton.infer("driffusion", [prompt])
    assert "RESOURCE_EXHAUSTED" in str(err.value.status()) or "larger than max" in str(err.value)
    serves_normally(client)


def test_a_json_integer_past_int32_is_refused_not_wrapped(serve, client):
    body = {
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["x"]},
            {"name": "steps", "shape": [1], "datatype": "INT32", "data": [2**32 + 4]},
        ]
    }
    request = urllib.request.Request(
        f"{serve.http_url}/v2/models/driffusion/infer", data=json.dumps(body).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400
    assert "'steps'" in (text := err.value.read().decode()) and "out of range for INT32" in text
    serves_normally(client)


# --- bounded work ------------------------------------------------------------------------------


def executions(serve, model: str = "denoiser") -> int:
    triton = grpcclient.InferenceServerClient(serve.grpc_url)
    headers = {f"triton-grpc-protocol-{ADMIN_HEADER}": ADMIN_KEY}
    stats = triton.get_inference_statistics(model, headers=headers)
    return stats.model_stats[0].execution_count


def settle(serve) -> int:
    """The denoiser's execution count once it stops changing (no round in flight)."""
    last = executions(serve)
    while True:
        time.sleep(0.5)
        now = executions(serve)
        if now == last:
            return now
        last = now


def test_a_grpc_client_deadline_stops_the_work_of_its_request(serve, client):
    before = settle(serve)
    with pytest.raises(DriffusionError, match="Deadline Exceeded"):
        client.generate("slow", steps=999, mode="sequential", timeout_s=1.0)
    stopped = settle(serve)
    assert stopped - before < 999  # the work stopped at a round, not at the end
    serves_normally(client)


def test_an_http_client_that_disconnects_stops_its_request(serve, client):
    """Through the front an HTTP inference of driffusion travels to Triton over gRPC, so the
    client's disconnect cancels it (Triton 2.51's own HTTP endpoint would run it to the end)."""
    import socket

    before = settle(serve)
    body = json.dumps(
        {
            "inputs": [
                {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["slow"]},
                {"name": "steps", "shape": [1], "datatype": "INT32", "data": [999]},
                {"name": "mode", "shape": [1], "datatype": "BYTES", "data": ["sequential"]},
            ]
        }
    ).encode()
    for _ in range(3):  # more than the orchestrator instances: none may stay pinned
        with socket.create_connection(("127.0.0.1", serve.http)) as sock:
            sock.sendall(
                b"POST /v2/models/driffusion/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            time.sleep(0.5)
    stopped = settle(serve)
    assert stopped - before < 3 * 999 // 2  # far from three whole 999-step requests
    serves_normally(client)


def test_the_kserve_timeout_parameter_bounds_an_http_request(serve, client):
    """Triton 2.51 does not cancel an HTTP request whose client went away; the request's own
    ``timeout`` (microseconds, KServe) is honoured by the orchestrator instead."""
    before = settle(serve)
    body = {
        "inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["slow"]},
            {"name": "steps", "shape": [1], "datatype": "INT32", "data": [999]},
            {"name": "mode", "shape": [1], "datatype": "BYTES", "data": ["sequential"]},
        ],
        "parameters": {"timeout": 1_000_000},
    }
    request = urllib.request.Request(
        f"{serve.http_url}/v2/models/driffusion/infer", data=json.dumps(body).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert "deadline exceeded" in err.value.read().decode()
    assert settle(serve) - before < 999
    serves_normally(client)


# --- dead workers ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["denoiser", "vae_decoder", "text_encoder", "driffusion"])
def test_a_killed_worker_is_replaced_and_requests_succeed_again(serve, client, model):
    serves_normally(client)
    victim = serve.current(model)[0]
    os.kill(victim, signal.SIGKILL)
    serve.wait(lambda: not serve.ready(), 10, "readiness false after the kill")
    recovered = serve.wait(serve.ready, 60, "readiness back")
    assert victim not in serve.stubs(model)
    assert any(f"{model}: worker" in line and "is dead" in line for line in serve.lines)
    assert any(f"{model}:" in line and "fresh worker(s) serving" in line for line in serve.lines)
    assert recovered < 60
    start = time.monotonic()
    serves_normally(client)
    assert time.monotonic() - start < 30  # normal service, not a queue of failures


def test_requests_during_a_denoiser_recovery_are_not_lost(serve, client):
    victim = serve.current("denoiser")[0]
    errors, done = [], []

    def load():
        with DriffusionClient(serve.grpc_url) as c:
            for seed in range(12):
                try:
                    done.append(c.generate("busy", steps=8, k=2, seed=seed, timeout_s=60))
                except DriffusionError as e:
                    errors.append(str(e))

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)
    worker.join()
    assert errors == [] and len(done) == 12
    serve.wait(serve.ready, 60, "readiness back")


def test_a_stopped_worker_is_treated_as_dead(serve, client):
    victim = serve.current("denoiser")[0]
    os.kill(victim, signal.SIGSTOP)  # it would take requests and never answer
    serve.wait(lambda: victim not in serve.stubs("denoiser"), 20, "the stopped worker killed")
    assert _state(victim) in "ZX"  # killed, not resumed
    serve.wait(serve.ready, 60, "readiness back")
    replaced = serve.current("denoiser")
    assert victim not in replaced and all(_state(pid) not in "TtZX" for pid in replaced)
    serves_normally(client)


def test_a_killed_tritonserver_is_restarted(serve, client):
    (triton,) = triton_pids(serve)
    os.kill(triton, signal.SIGKILL)
    serve.wait(lambda: not serve.ready(), 15, "readiness false after the kill")
    serve.wait(serve.ready, 120, "readiness back")
    assert any("restarting tritonserver" in line for line in serve.lines)
    with DriffusionClient(serve.grpc_url) as c:
        c.wait_ready(timeout_s=60)
        serves_normally(c)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "X"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_the_log_names_every_recovery(serve):
    text = "\n".join(serve.lines)
    assert re.search(r"\[supervisor\] denoiser: worker denoiser_0_\d \(pid \d+\) is dead", text)
