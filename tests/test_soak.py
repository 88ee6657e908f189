"""A soak: 1,000 requests from 4 concurrent gRPC clients against a real server. Every request is
answered exactly once and without error; server memory and /dev/shm do not grow."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from driffusion.client import DriffusionClient
from driffusion.model_repository.server import live_group_members

REQUESTS, CLIENTS = 1000, 4


def group_rss_mib(pgid: int) -> float:
    total = 0
    for pid in live_group_members(pgid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def shm_bytes(prefix: str) -> int:
    return sum(p.stat().st_size for p in Path("/dev/shm").glob(f"{prefix}*"))


def served(server) -> int:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    stats = client.get_inference_statistics("driffusion", headers=server.grpc_admin_headers)
    return stats.model_stats[0].inference_stats.success.count


@pytest.fixture(scope="module")
def server(tiny_repository, start_triton_server):
    return start_triton_server(tiny_repository)


def burst(url: str, count: int, first_seed: int) -> list:
    def worker(seeds):
        with DriffusionClient(url) as c:
            return [c.generate("soak", steps=1, seed=s, mode="sequential").rounds for s in seeds]

    seeds = list(range(first_seed, first_seed + count))
    with ThreadPoolExecutor(CLIENTS) as pool:
        parts = pool.map(worker, [seeds[i::CLIENTS] for i in range(CLIENTS)])
    return [r for part in parts for r in part]


def test_a_thousand_requests_are_each_answered_once_without_growth(server):
    with DriffusionClient(server.grpc_url) as c:
        c.wait_ready(timeout_s=60)
    assert len(burst(server.grpc_url, 100, 0)) == 100  # warm-up: every instance loaded
    rss, shm, before = (
        group_rss_mib(server.pid),
        shm_bytes(server.shm_prefix),
        served(server),
    )
    answers = burst(server.grpc_url, REQUESTS, 100)
    assert answers == [1] * REQUESTS  # one answer per request, none an error
    assert served(server) - before == REQUESTS  # and the server counted each once
    assert shm_bytes(server.shm_prefix) <= shm  # shared-memory regions did not grow
    assert group_rss_mib(server.pid) < rss * 1.10 + 50  # no leak beyond allocator noise
