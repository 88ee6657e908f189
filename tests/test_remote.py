"""Remote denoisers for real: two `driffusion serve` processes on loopback, real gRPC between them.

Server A (``--remote-denoisers``) fans each round out over its own 2 denoiser instances and the 2
of server B (``--role denoiser``), through B's front. One pair serves the whole module, and the
tests run in order through B's life: A starts while B is not there yet, B comes up and takes
drafts, B is killed (SIGKILL of its processes) in the middle of a 50-step request, B comes back
on the same port. Denoiser calls are padded to 40 ms (a GPU stand-in), so a 50-step request lasts
long enough to be interrupted; the tiny model keeps the CPU work small on 2 shared cores.

The transport's error handling is also checked against real sockets without Triton: a closed
port, and a server that accepts the connection and never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
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
from tritonclient.utils import InferenceServerException

from driffusion import count_rounds
from driffusion.client import DriffusionClient
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.remote import RemoteDenoiser, instance_count, served_contract
from driffusion.model_repository.server import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    find_free_ports,
    metric_sum,
    read_metrics,
)
from driffusion.routing import EndpointDown
from driffusion.service import ServiceSettings

pytest.importorskip("pytriton", reason="tritonserver needs the driffusion[server] extra")

ADMIN_KEY = "remote-test-admin-key-0123456789"
ADMIN = {f"triton-grpc-protocol-{ADMIN_HEADER}": ADMIN_KEY}
SHORT = dict(prompt="a red square", steps=8, k=4, seed=3)  # 3 rounds
LONG = dict(prompt="a blue circle", steps=50, k=4, seed=5)  # 14 rounds
WAIT_USED_S = 60.0  # B's start plus A's longest probe backoff (10 s), on a loaded machine


class Serve:
    """``driffusion serve`` in a subprocess of its own session, its output collected."""

    def __init__(self, repository: Path, ports: list[int], *extra: str, log: Path | None = None):
        self.http, self.grpc, self.metrics = ports
        self.lines: list[str] = []
        argv = [sys.executable, "-m", "driffusion.cli", "serve", "--repository", str(repository)]
        argv += ["--http-port", str(self.http), "--grpc-port", str(self.grpc)]
        argv += ["--metrics-port", str(self.metrics), *extra]
        if log is not None:
            argv += ["--log", str(log)]
        env = dict(os.environ, **{ADMIN_KEY_ENV: ADMIN_KEY})
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 180) -> None:
        wait(self.ready, timeout_s, "driffusion serve ready", self)

    def triton_pid(self) -> int | None:
        """tritonserver, the child of this serve process (its own process group)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                name, _, rest = stat.read_text().partition(") ")
                if name.endswith("(tritonserver") and int(rest.split()[1]) == self.process.pid:
                    return int(stat.parent.name)
        return None

    def kill(self) -> None:
        """SIGKILL: serve (with its front) and tritonserver with its workers, as a node that
        goes away; then the shared memory it could not remove."""
        triton = self.triton_pid()
        os.killpg(self.process.pid, signal.SIGKILL)
        if triton is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(triton, signal.SIGKILL)
        self.process.wait()
        for region in Path("/dev/shm").glob(f"driffusion_{self.process.pid}_*"):
            region.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def wait(condition, timeout_s: float, what: str, serve: Serve | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        exited = serve is not None and serve.process.poll() is not None
        if exited or time.monotonic() > deadline:
            tail = "\n".join(serve.lines[-30:]) if serve else ""
            why = f"serve exited with {serve.process.returncode}" if exited else f"{timeout_s} s"
            raise AssertionError(f"{what} not within {why}\n{tail}")
        time.sleep(0.1)


class Pair:
    """Server A (with the remote denoiser) and server B's ports, B started and killed at will."""

    def __init__(self, repository: Path, work: Path):
        self.repository = repository
        self.b_ports = find_free_ports(3)
        self.b: Serve | None = None
        self.a_log = work / "a.log"
        remote = f"127.0.0.1:{self.b_ports[1]}"
        self.a = Serve(repository, find_free_ports(3), "--remote-denoisers", remote, log=self.a_log)
        self.remote = remote

    def start_b(self) -> Serve:
        self.b = Serve(self.repository, self.b_ports, "--role", "denoiser")
        self.b.wait_ready()
        return self.b

    def b_executions(self) -> int:
        """Denoiser requests B's Triton has run (its statistics: admin key needed)."""
        with grpcclient.InferenceServerClient(self.b.grpc_url) as triton:
            stats = triton.get_inference_statistics("denoiser", headers=ADMIN, as_json=True)
        return sum(int(m.get("inference_count", 0)) for m in stats["model_stats"])

    def a_log_text(self) -> str:
        return self.a_log.read_text(errors="replace") if self.a_log.exists() else ""

    def stop(self) -> None:
        for server in (self.a, self.b):
            if server is not None:
                server.stop()


@pytest.fixture(scope="module")
def repository(tiny_pipeline_dir, tmp_path_factory):
    settings = RepositorySettings(
        denoiser_instances=2, orchestrator_instances=1, max_k=4, emulated_latency_ms=40
    )
    out = tmp_path_factory.mktemp("remote") / "repo"
    return build_repository(tiny_pipeline_dir, out, settings, progress=None)


@pytest.fixture(scope="module")
def pair(repository, tmp_path_factory):
    pair = Pair(repository, tmp_path_factory.mktemp("remote-logs"))
    try:
        pair.a.wait_ready()
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def client(pair):
    with DriffusionClient(pair.a.grpc_url) as c:
        c.wait_ready(timeout_s=60)
        yield c


@pytest.fixture(scope="module")
def single_server(client):
    """A's images while B is not there: a single server, on its own 2 instances."""
    return {
        "short": client.generate(**SHORT, timeout_s=120).image,
        "long": client.generate(**LONG, timeout_s=120).image,
    }


def close_to(image: np.ndarray, reference: np.ndarray) -> bool:
    """The ONNX Runtime bound: draft batches differ by endpoint, at most one uint8 level."""
    return image.shape == reference.shape and np.abs(image.astype(int) - reference).max() <= 1


# --- B not there yet ----------------------------------------------------------------------------


def test_a_starts_and_serves_on_its_own_while_its_remote_denoiser_is_down(pair, single_server):
    assert single_server["short"].shape == (64, 64, 3)
    log = pair.a_log_text()
    assert f"remote denoiser {pair.remote} is not available" in log
    wait(lambda: any("is not available" in line for line in pair.a.lines), 10, "the echo", pair.a)
    with grpcclient.InferenceServerClient(pair.a.grpc_url) as triton:
        config = triton.get_model_config("driffusion", as_json=True)["config"]
    assert config["parameters"]["remote_denoisers"]["string_value"] == pair.remote
    assert any(f"remote denoisers: {pair.remote}" in line for line in pair.a.lines)


# --- B up ---------------------------------------------------------------------------------------


def test_role_denoiser_serves_only_the_denoiser_behind_the_front(pair):
    b = pair.start_b()
    assert any("role denoiser: serving only the denoiser" in line for line in b.lines)
    with grpcclient.InferenceServerClient(b.grpc_url) as triton:
        index = triton.get_model_repository_index(headers=ADMIN, as_json=True)["models"]
        assert {m["name"] for m in index if m.get("state") == "READY"} == {"denoiser"}
        assert not triton.is_model_ready("driffusion")
        with pytest.raises(InferenceServerException, match="restricted"):
            triton.get_inference_statistics("denoiser")  # the admin rules of any server
    workers = subprocess.run(
        ["pgrep", "-g", str(b.triton_pid()), "-f", "triton_python_backend_stub"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len(workers) == 2  # the denoiser's instances, nothing else


def test_the_probe_reads_the_instances_and_refuses_another_contract(pair, repository):
    settings = ServiceSettings.load(repository / "driffusion" / "1")
    contract = served_contract(settings)

    async def probe(contract):
        remote = RemoteDenoiser(pair.b.grpc_url, contract)
        try:
            return await remote.probe(5.0)
        finally:
            await remote.close()

    assert asyncio.run(probe(contract)) == 2
    wrong = {**contract, "sample": "TYPE_FP16"}
    with pytest.raises(EndpointDown, match="not this orchestrator's"):
        asyncio.run(probe(wrong))


def test_a_request_through_a_uses_b_and_gives_the_single_server_image(pair, client, single_server):
    before = pair.b_executions()
    deadline = time.monotonic() + WAIT_USED_S
    while True:  # A probes B again on its own backoff, up to 10 s apart
        start = pair.b_executions()
        out = client.generate(**SHORT, timeout_s=120)
        if pair.b_executions() > start:
            break
        assert time.monotonic() < deadline, f"A never sent B a draft\n{pair.a_log_text()[-3000:]}"
        time.sleep(0.5)
    assert pair.b_executions() > before
    assert out.rounds == count_rounds(8, "aggressive", 4)[0]
    assert close_to(out.image, single_server["short"])
    assert f"remote denoiser {pair.remote} is up: 2 instances" in pair.a_log_text()
    metrics = read_metrics(f"http://127.0.0.1:{pair.a.metrics}/metrics")
    calls = "driffusion_denoiser_call_duration_seconds_count"
    assert metric_sum(metrics, calls, endpoint=pair.remote) > 0
    assert metric_sum(metrics, calls, endpoint="local") > 0


# --- B killed mid-request -------------------------------------------------------------------------


def test_killing_b_mid_request_completes_it_on_a_with_a_log_line(pair, client, single_server):
    result: dict = {}  # B is up and in use (the test above): the long request starts on both

    def run():
        try:
            result["out"] = client.generate(**LONG, timeout_s=120)
        except Exception as exc:  # noqa: BLE001 (reported below)
            result["error"] = exc

    start = pair.b_executions()
    thread = threading.Thread(target=run)
    thread.start()
    wait(lambda: pair.b_executions() >= start + 4, 30, "B evaluating the long request's drafts")
    assert thread.is_alive(), "the request ended before B was killed"
    pair.b.kill()
    thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    out = result["out"]
    assert out.rounds == count_rounds(50, "aggressive", 4)[0]
    assert close_to(out.image, single_server["long"])
    failover = re.compile(
        rf"remote denoiser {re.escape(pair.remote)} failed: \S+.*; marked down, its calls go to "
        r"the other endpoints \(fan-out width now 2\)"
    )
    assert failover.search(pair.a_log_text()), pair.a_log_text()[-3000:]
    # ... and in A's own output (container logs), echoed from Triton's log
    wait(lambda: any(failover.search(line) for line in pair.a.lines), 10, "the echo", pair.a)
    assert any(line.startswith("[triton] W routing.py: remote denoiser") for line in pair.a.lines)
    metrics = read_metrics(f"http://127.0.0.1:{pair.a.metrics}/metrics")
    assert metric_sum(metrics, "driffusion_denoiser_call_errors_total", endpoint=pair.remote) >= 1
    assert metric_sum(metrics, "driffusion_denoiser_call_errors_total", endpoint="local") == 0
    assert close_to(client.generate(**SHORT).image, single_server["short"])  # A serves on


# --- B back ---------------------------------------------------------------------------------------


def test_b_back_on_the_same_port_is_used_again(pair, client):
    ups = pair.a_log_text().count(f"remote denoiser {pair.remote} is up")
    pair.start_b()
    assert pair.b_executions() == 0  # a fresh server

    def used() -> bool:
        client.generate(**SHORT, timeout_s=120)
        return pair.b_executions() > 0

    wait(used, WAIT_USED_S, "A sending drafts to B again")
    assert pair.a_log_text().count(f"remote denoiser {pair.remote} is up") == ups + 1


# --- the transport against sockets that misbehave (no Triton) -------------------------------------


def test_a_closed_port_is_endpoint_down_at_once():
    (port,) = find_free_ports(1)
    remote = RemoteDenoiser(f"127.0.0.1:{port}", {})

    async def run():
        start = time.monotonic()
        with pytest.raises(EndpointDown, match="UNAVAILABLE"):
            await remote.infer("denoiser", {"x": np.zeros(1, np.float32)}, ("y",), 5.0)
        with pytest.raises(EndpointDown, match="UNAVAILABLE"):
            await remote.probe(5.0)
        await remote.close()
        return time.monotonic() - start

    assert asyncio.run(run()) < 4.0


def test_a_server_that_never_answers_is_endpoint_down_after_the_timeout():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    remote = RemoteDenoiser(f"127.0.0.1:{listener.getsockname()[1]}", {})

    async def run():
        start = time.monotonic()
        with pytest.raises(EndpointDown, match="DEADLINE_EXCEEDED"):
            await remote.infer("denoiser", {"x": np.zeros(1, np.float32)}, ("y",), 0.5)
        await remote.close()
        return time.monotonic() - start

    try:
        assert 0.4 < asyncio.run(run()) < 3.0
    finally:
        listener.close()
        for conn, _ in accepted:
            conn.close()


def test_instances_are_counted_per_listed_gpu():
    assert instance_count({"instance_group": [{"count": 2, "kind": "KIND_CPU"}]}) == 2
    gpus = {"count": 1, "kind": "KIND_GPU", "gpus": [0, 1, 2, 3]}
    assert instance_count({"instance_group": [gpus, {"count": 2, "kind": "KIND_CPU"}]}) == 6


# --- the flags, and how the list reaches the orchestrator (no server) ----------------------------


def test_the_serve_flags_parse_and_a_bad_combination_fails_before_any_build(capsys, monkeypatch):
    from driffusion.cli import build_parser, main
    from driffusion.model_repository import serve

    args = build_parser().parse_args(["serve", "--remote-denoisers", "a:8001,b.svc:8001/4"])
    assert args.role == "all" and args.remote_denoisers == ("a:8001", "b.svc:8001/4")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--remote-denoisers", "a:8001/0"])
    assert "N must be an integer >= 1" in capsys.readouterr().err
    monkeypatch.setattr(serve, "prepare_repository", lambda *a, **k: pytest.fail("built"))
    assert main(["serve", "--role", "denoiser", "--remote-denoisers", "a:8001"]) == 2
    assert "remote denoisers are for role all" in capsys.readouterr().err


def test_the_list_reaches_the_orchestrator_as_a_config_override_on_load(repository):
    from driffusion.model_repository.serve import orchestrators
    from driffusion.model_repository.server import TritonServer

    assert orchestrators(repository) == ["driffusion", "driffusion_stream"]
    parameters = {m: {"remote_denoisers": "a:8001"} for m in orchestrators(repository)}
    server = TritonServer(repository, config_parameters=parameters)
    loads = [a for a in server.command(Path("/b"), Path("/t")) if a.startswith("--load-model")]
    assert sorted(loads) == [
        f"--load-model={m}" for m in ("denoiser", "text_encoder", "vae_decoder", "vae_encoder")
    ]
    with pytest.raises(ValueError, match="not among the models"):
        TritonServer(repository, models=["denoiser"], config_parameters={"driffusion": {"x": "1"}})


def test_the_log_echo_shows_python_model_warnings_and_follows_a_truncated_log(tmp_path):
    from driffusion.model_repository.serve import LogEcho

    log, said = tmp_path / "server.log", []
    log.write_text(
        'W1130 13:17:19.028488 8736 pinned_memory_manager.cc:273] "no pinned memory"\n'
        'I1130 13:17:24.478115 8736 routing.py:228] "remote denoiser a:1 is up"\n'
        'W1130 13:18:08.408919 8736 routing.py:246] "remote denoiser a:1 failed: gone"\n'
        'E1130 13:18:09.000000 8736 model.py:151] "driffusion request failed: Traceback\n'
        "  more lines\n"
    )
    echo = LogEcho(log, said.append)
    echo.poll()
    assert said == [
        "[triton] W routing.py: remote denoiser a:1 failed: gone",
        "[triton] E model.py: driffusion request failed: Traceback",
    ]
    log.write_text('E1130 13:19:00.000000 9000 model.py:151] "after a restart"\n')  # truncated
    echo.poll()
    assert said[-1] == "[triton] E model.py: after a restart"
