"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# --- Triton server fixtures ------------------------------------------------------------------
# A real tritonserver (from the nvidia-pytriton wheel, extra `driffusion[server]`) on free ports.
# Tests that use them are skipped where the wheel is not installed.


@pytest.fixture(scope="module")
def start_triton_server(tmp_path_factory):
    """Factory ``start(model_repository, **TritonServer kwargs) -> TritonServer`` (ready).

    Picks three free ports and a log file under pytest's tmp folder; every server it started is
    stopped when the test module ends.
    """
    pytest.importorskip("pytriton", reason="tritonserver needs the driffusion[server] extra")
    from driffusion.model_repository.server import TritonServer, find_free_ports

    servers = []

    def start(model_repository, **kwargs) -> TritonServer:
        http_port, grpc_port, metrics_port = find_free_ports(3)
        kwargs.setdefault("log_path", tmp_path_factory.mktemp("triton") / "server.log")
        server = TritonServer(
            model_repository,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            **kwargs,
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# --- end of Triton server fixtures -----------------------------------------------------------
