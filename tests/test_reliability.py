"""A hung denoiser instance under a bare Triton server (no supervisor, as on an engine that hangs
inside a GPU call): the orchestrator gives up on the call after ``model_timeout_s`` and completes
the request on another instance. The fault is real: the instance's process is frozen (SIGSTOP).
Killed workers, deadlines and recovery under ``driffusion serve`` are in test_hostile.py."""

from __future__ import annotations

import os
import signal
import time

import pytest

from driffusion.client import DriffusionClient
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
