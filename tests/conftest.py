"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory):
    """Build outputs (ONNX exports, repositories, the Triton backend folder) in a folder of this
    test session, not in the user's cache."""
    import os

    from driffusion.model_repository.paths import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


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
    from driffusion.model_repository.server import TritonServer

    servers = []

    def start(model_repository, **kwargs) -> TritonServer:
        kwargs.setdefault("log_path", tmp_path_factory.mktemp("triton") / "server.log")
        server = TritonServer.on_free_ports(model_repository, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


# --- end of Triton server fixtures -----------------------------------------------------------


# --- tiny pipeline and its model repository (built once per test session) ---------------------


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random-weight SD2.1-like diffusers pipeline folder (offline, from config)."""
    from driffusion.export.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd21", tmp_path_factory.mktemp("tiny") / "sd21")


@pytest.fixture(scope="session")
def tiny_repository(tiny_pipeline_dir, tmp_path_factory):
    """The served repository of the tiny pipeline: 4 denoiser instances, max k 8, no padding."""
    from driffusion.model_repository.build import RepositorySettings, build_repository

    out = tmp_path_factory.mktemp("repository") / "repo"
    return build_repository(tiny_pipeline_dir, out, RepositorySettings(), progress=None)


# --- opt-in slow tests : tests marked `slow` run only with `pytest --run-slow` ---------


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- end of opt-in slow tests ------------------------------------------------------------------
