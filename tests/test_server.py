"""TritonServer and the onnx_runtime python-backend model, against a real tritonserver."""

from __future__ import annotations

import contextlib
import importlib.resources
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="tritonserver needs the driffusion[server] extra")
grpcclient = pytest.importorskip("tritonclient.grpc")

from driffusion.model_repository.server import (  # noqa: E402
    TritonServerError,
    live_group_members,
)

MODEL_PY = importlib.resources.files("driffusion.model_repository").joinpath(
    "models", "onnx_runtime", "model.py"
)
LATENCY_MS = 100.0

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [{{ name: "{input_name}" data_type: TYPE_FP32 dims: {dims} }}]
output [{{ name: "y" data_type: TYPE_FP32 dims: {dims} }}]
instance_group [{{ count: {count} kind: KIND_CPU }}]
parameters {{ key: "emulated_latency_ms" value {{ string_value: "{latency_ms}" }} }}
"""


class Affine(torch.nn.Module):
    def forward(self, x):
        return 2 * x + 1


def reference(x: np.ndarray) -> np.ndarray:
    return 2 * x + 1


@pytest.fixture(scope="module")
def affine_onnx(tmp_path_factory) -> Path:
    """y = 2x + 1 exported to ONNX with a dynamic batch axis, x: (B, 4) FP32."""
    path = tmp_path_factory.mktemp("onnx") / "affine.onnx"
    with warnings.catch_warnings():  # the legacy exporter warns it is legacy (docs/facts.md)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            Affine(),
            (torch.zeros(1, 4),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def add_model(
    repo: Path,
    name: str,
    onnx_path: Path,
    *,
    dims: str = "[-1, 4]",
    count: int = 2,
    latency_ms: float = 0.0,
    input_name: str = "x",
) -> None:
    """Write ``repo/name`` as an onnx_runtime python model serving ``onnx_path``."""
    (repo / name / "1").mkdir(parents=True)
    shutil.copy(onnx_path, repo / name / "1" / "model.onnx")
    (repo / name / "1" / "model.py").write_text(MODEL_PY.read_text())
    config = CONFIG.format(
        name=name, input_name=input_name, dims=dims, count=count, latency_ms=latency_ms
    )
    (repo / name / "config.pbtxt").write_text(config)


def infer(client, model: str, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("y")


@pytest.fixture(scope="module")
def server(tmp_path_factory, affine_onnx, start_triton_server):
    repo = tmp_path_factory.mktemp("repo")
    add_model(repo, "affine", affine_onnx)
    # dims [-1, -1]: a wrong shape passes Triton's own checks and reaches the model.
    add_model(repo, "affine_any_shape", affine_onnx, dims="[-1, -1]", count=1)
    add_model(repo, "affine_slow", affine_onnx, count=1, latency_ms=LATENCY_MS)
    return start_triton_server(repo)


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        yield client


def test_output_matches_reference(client):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(infer(client, "affine", x), reference(x), rtol=0, atol=1e-6)


def test_emulated_latency_pads_every_call(client):
    x = np.ones((1, 4), dtype=np.float32)
    start = time.perf_counter()
    y = infer(client, "affine_slow", x)
    elapsed = time.perf_counter() - start
    np.testing.assert_allclose(y, reference(x))
    # A check that the padding happens, not a performance target.
    assert elapsed >= LATENCY_MS / 1000


def test_wrong_shape_rejected_by_triton_then_next_request_succeeds(client):
    with pytest.raises(grpcclient.InferenceServerException, match="shape"):
        infer(client, "affine", np.ones((2, 3), dtype=np.float32))
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(infer(client, "affine", x), reference(x))


def test_wrong_shape_fails_one_request_in_the_model_which_keeps_serving(client):
    with pytest.raises(grpcclient.InferenceServerException, match="dimensions") as info:
        infer(client, "affine_any_shape", np.ones((2, 3), dtype=np.float32))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    x = np.ones((2, 4), dtype=np.float32)
    np.testing.assert_allclose(infer(client, "affine_any_shape", x), reference(x))


def test_stop_ends_the_process_group_and_removes_shared_memory(
    tmp_path, affine_onnx, start_triton_server
):
    add_model(tmp_path / "repo", "affine", affine_onnx)
    server = start_triton_server(tmp_path / "repo")
    pgid, shm_glob = server.pid, f"{server.shm_prefix}*"
    assert len(live_group_members(pgid)) == 3  # tritonserver + 2 python stubs
    assert list(Path("/dev/shm").glob(shm_glob))

    server.stop()
    assert live_group_members(pgid) == []
    assert list(Path("/dev/shm").glob(shm_glob)) == []
    assert server.pid is None
    server.stop()  # idempotent


def test_broken_model_makes_start_fail_fast_with_the_log_tail(
    tmp_path, affine_onnx, start_triton_server
):
    add_model(tmp_path / "repo", "broken", affine_onnx, input_name="not_in_graph")
    with pytest.raises(TritonServerError, match="exited with code 1") as info:
        start_triton_server(tmp_path / "repo", start_timeout_s=60)
    assert "config inputs ['not_in_graph'] != model.onnx ['x']" in str(info.value)


def test_a_server_goes_down_with_the_process_that_started_it(tmp_path, affine_onnx):
    """A benchmark or test run killed outright (SIGKILL: no atexit, no context manager) leaves no
    tritonserver behind holding its ports and shared memory, and none of its workers, even when
    tritonserver dies abruptly too (a crash: no graceful unload that would kill its workers) and
    a worker cannot exit by itself: here one is stopped (SIGSTOP), standing for Triton 2.51's
    stub that deadlocks when its server dies while it waits on it. Only the reaper removes it."""
    import os
    import signal
    import subprocess
    import sys

    add_model(tmp_path / "repo", "affine", affine_onnx, count=2)
    script = (
        "import sys, time\n"
        "from driffusion.model_repository.server import TritonServer\n"
        "s = TritonServer.on_free_ports(sys.argv[1]).start()\n"
        "print(s.pid, s.shm_prefix, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "repo")], stdout=subprocess.PIPE, text=True
    )
    stubs = []
    try:
        pid_text, shm_prefix = parent.stdout.readline().split()
        server_pid = int(pid_text)
        stubs += [p for p in live_group_members(server_pid) if p != server_pid]
        assert len(stubs) == 2 and list(Path("/dev/shm").glob(f"{shm_prefix}*"))
        os.kill(stubs[0], signal.SIGSTOP)
        os.kill(server_pid, signal.SIGKILL)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 30
        while live_group_members(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_group_members(server_pid) == []
        deadline = time.monotonic() + 5  # the reaper removes the regions after the kill
        while list(Path("/dev/shm").glob(f"{shm_prefix}*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(Path("/dev/shm").glob(f"{shm_prefix}*")) == []
    finally:
        parent.kill()
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
