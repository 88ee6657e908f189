"""The BLS adapter (``models/driffusion/model.py``) against a stand-in ``pb_utils`` module.

A mock, and the only one in this suite: a response tensor in GPU memory (what a TensorRT or torch
engine on a GPU produces) cannot be made on this machine, and it is exactly what must not reach
``as_numpy()``. The stand-in behaves like Triton 2.51's python backend where it matters: a BLS
response tensor stays where the called model produced it (a "device" here) unless the request
asked for host memory with ``preferred_memory``; ``as_numpy()`` on a device tensor raises.
Everything else about the served path is tested through a real server.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

MODELS = Path(__file__).resolve().parent.parent / "model_repository" / "models"
CPU, GPU = 0, 1


class FakeTensor:
    def __init__(self, name, array, on_device=False):
        self.name, self._array, self._on_device = name, np.asarray(array), on_device

    def is_cpu(self):
        return not self._on_device

    def as_numpy(self):
        if self._on_device:  # python_backend pb_tensor.cc
            raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")
        return self._array

    def to_dlpack(self):
        import torch

        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self._array))


def fake_pb_utils(produced_on_device: bool):
    """A stand-in module; every InferenceRequest it builds is recorded in ``requests``."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_MEMORY_CPU, pb.TRITONSERVER_MEMORY_GPU = CPU, GPU
    pb.requests = []

    class PreferredMemory:
        def __init__(self, memory_type, device_id=0):
            self.memory_type, self.device_id = memory_type, device_id

    class Response:
        def __init__(self, outputs):
            self.outputs = outputs

        def has_error(self):
            return False

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names, preferred_memory=None):
            self.model_name, self.inputs = model_name, inputs
            self.outputs, self.preferred_memory = requested_output_names, preferred_memory
            pb.requests.append(self)

        def exec(self):
            host = self.preferred_memory is not None and self.preferred_memory.memory_type == CPU
            on_device = produced_on_device and not host
            return Response(
                [FakeTensor(n, np.full((1, 2), 3.0, np.float32), on_device) for n in self.outputs]
            )

    pb.PreferredMemory, pb.InferenceRequest = PreferredMemory, InferenceRequest
    pb.Tensor = FakeTensor
    pb.get_output_tensor_by_name = lambda r, n: next(t for t in r.outputs if t.name == n)
    return pb


def load_bls(pb) -> types.ModuleType:
    sys.modules["triton_python_backend_utils"] = pb
    try:
        spec = importlib.util.spec_from_file_location(
            "bls_model", MODELS / "driffusion" / "model.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        del sys.modules["triton_python_backend_utils"]


def call(module, pb):
    from concurrent.futures import ThreadPoolExecutor

    model = module.TritonPythonModel()
    model.pool = ThreadPoolExecutor(2)
    model.logger = None
    return asyncio.run(model._infer("denoiser", {"sample": np.zeros(2, np.float32)}, ("out",)))


def test_every_model_call_asks_for_its_outputs_in_host_memory():
    pb = fake_pb_utils(produced_on_device=True)
    out = call(load_bls(pb), pb)
    np.testing.assert_array_equal(out["out"], np.full((1, 2), 3.0, np.float32))
    (request,) = pb.requests
    assert request.preferred_memory.memory_type == CPU and request.preferred_memory.device_id == 0


def test_without_host_memory_a_gpu_output_would_fail_as_numpy():
    """The stand-in is faithful: the call that forgets ``preferred_memory`` fails."""
    pb = fake_pb_utils(produced_on_device=True)
    request = pb.InferenceRequest("denoiser", [], ["out"])
    with pytest.raises(RuntimeError, match="stored in GPU"):
        request.exec().outputs[0].as_numpy()


def test_a_tensor_left_on_a_device_is_read_through_dlpack():
    pb = fake_pb_utils(produced_on_device=True)
    module = load_bls(pb)
    tensor = FakeTensor("out", np.arange(4, dtype=np.float32), on_device=True)
    np.testing.assert_array_equal(module.to_numpy(tensor), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("path", sorted(MODELS.glob("*/model.py")), ids=lambda p: p.parent.name)
def test_no_model_builds_a_bls_request_without_preferred_memory(path):
    """Static check over every python-backend model: each ``InferenceRequest(...)`` names
    ``preferred_memory``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "InferenceRequest":
            assert "preferred_memory" in {k.arg for k in node.keywords}, f"{path}:{node.lineno}"


def test_a_round_of_eight_calls_has_all_eight_in_flight_at_once():
    """A blocking call holds its thread until the answer comes. The stub's own ``async_exec``
    runs on asyncio's default pool, ``min(32, CPUs + 4)`` threads: 6 on a 2-core machine, so the
    7th and 8th drafts of a round waited for the first to finish. Here each call waits until all
    eight are in flight (a barrier), which only an executor of 8 or more threads passes."""
    from concurrent.futures import ThreadPoolExecutor

    from driffusion import api
    from driffusion.families import get_family
    from driffusion.service import ServiceSettings, executor_threads

    pb = fake_pb_utils(produced_on_device=False)
    barrier = threading.Barrier(8, timeout=10)
    plain_exec = pb.InferenceRequest.exec

    def exec_when_all_arrived(self):
        barrier.wait()
        return plain_exec(self)

    pb.InferenceRequest.exec = exec_when_all_arrived
    module = load_bls(pb)
    settings = ServiceSettings(family=get_family("sd21"), limits=api.Limits(max_k=8))
    model = module.TritonPythonModel()
    model.pool = ThreadPoolExecutor(executor_threads(settings))
    model.logger = None

    async def round_of_eight():
        calls = [model._infer("denoiser", {"x": np.zeros(1)}, ("out",)) for _ in range(8)]
        return await asyncio.gather(*calls)

    assert len(asyncio.run(round_of_eight())) == 8
