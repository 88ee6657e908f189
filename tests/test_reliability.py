"""Faults under a real Triton server: a denoiser instance that crashes or hangs, a client that gives
up. The faults are real: the instance's python-backend stub process is killed (SIGKILL) or frozen
(SIGSTOP); nothing is mocked."""

from __future__ import annotations

import os
import signal
import time

import pytest
import tritonclient.grpc as grpcclient

from driffusion.client import DriffusionClient, DriffusionError
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import (
    TritonServer,
    live_group_members,
    metric_sum,
)

LATENCY_S = 0.1  # every denoiser call padded to 100 ms, so requests last long enough to hit
TIMEOUT_S = 2.0  # model call deadline of this repository
RETRIES = "driffusion_model_call_retries_total"


@pytest.fixture(scope="module")
def repository(tiny_pipeline_dir, tmp_path_factory):
    settings = RepositorySettings(
        emulated_latency_ms=LATENCY_S * 1e3, model_timeout_s=TIMEOUT_S, orchestrator_instances=1
    )
    out = tmp_path_factory.mktemp("faults") / "repo"
    return build_repository(tiny_pipeline_dir, out, settings, progress=None)


@pytest.fixture
def server(repository, tmp_path):
    """A fresh server for each fault: a hung or killed stub leaves Triton 2.51's python backend
    fragile (it may abort later on a lock the stub held), so no test inherits another's fault."""
    with TritonServer.on_free_ports(repository, log_path=tmp_path / "server.log") as server:
        yield server


@pytest.fixture
def client(server):
    with DriffusionClient(server.grpc_url) as c:
        c.wait_ready(timeout_s=60)
        c.generate("warm", steps=4)
        yield c


def denoiser_stubs(server) -> list[int]:
    """Pids of the denoiser instances' stub processes (one per instance)."""
    stubs = []
    for pid in live_group_members(server.pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"/denoiser/1/model.py" in f.read():
                stubs.append(pid)
    return stubs


def denoiser_executions(server) -> int:
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("denoiser")
    return stats.model_stats[0].execution_count


def test_a_client_deadline_stops_the_work_of_its_request(server, client):
    before = denoiser_executions(server)
    with pytest.raises(DriffusionError, match="Deadline Exceeded"):
        client.generate("slow", steps=50, mode="sequential", timeout_s=1.0)  # needs >= 5 s
    time.sleep(1.0)  # let the round in flight finish
    after_deadline = denoiser_executions(server)
    time.sleep(1.5)
    assert denoiser_executions(server) == after_deadline  # no more rounds once cancelled
    assert after_deadline - before < 50
    cancelled = metric_sum(server.metrics(), "driffusion_requests_total", outcome="cancelled")
    assert cancelled == 1


def test_a_hung_denoiser_instance_is_given_up_on_and_the_request_completes(server, client):
    stub = denoiser_stubs(server)[0]
    os.kill(stub, signal.SIGSTOP)  # the instance hangs: it takes requests and never answers
    try:
        start = time.perf_counter()
        out = client.generate("hang", steps=8, k=4, fanout="instances")  # one shard lands on it
        elapsed = time.perf_counter() - start
        assert out.image.shape == (64, 64, 3)
        # one call waited out the model deadline, then went to a live instance
        assert TIMEOUT_S <= elapsed
        other = client.generate("other", steps=4, mode="sequential")  # the rest is unaffected
        assert other.rounds == 4
        assert metric_sum(server.metrics(), RETRIES, model="denoiser") >= 1
    finally:
        os.kill(stub, signal.SIGCONT)


def test_a_crashed_denoiser_instance_fails_over_and_the_server_serves_on(server, client):
    """The stub is killed between requests. (Killed in the middle of a request it can take the
    whole server down in Triton 2.51: the backend aborts on a lock the dead stub held in shared
    memory, seen here; ``driffusion serve`` restarts the server when that happens.)"""
    stub = denoiser_stubs(server)[-1]
    os.kill(stub, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stub in denoiser_stubs(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    for seed in range(3):  # every round has a shard for each instance, one of them dead
        out = client.generate("after", steps=8, k=4, seed=seed, fanout="instances")
        assert out.image.shape == (64, 64, 3) and out.rounds == 3
    assert "is not healthy; retrying elsewhere" in server.log_path.read_text()
    assert metric_sum(server.metrics(), RETRIES, model="denoiser") >= 3
