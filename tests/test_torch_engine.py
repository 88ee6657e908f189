"""The ``torch`` engine on the CPU: every component of the tiny SD2.1 pipeline run by PyTorch in
python-backend models of a real Triton server, against the ONNX engine's images (the same
orchestrator over ONNX Runtime sessions of the repository's exports)."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from driffusion import api
from driffusion.client import DriffusionClient
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.config import parse_config
from driffusion.service import Orchestrator

REQUESTS = [  # (mode, k, fanout)
    ("sequential", 1, "instances"),
    ("aggressive", 4, "instances"),
    ("conservative", 3, "batch"),
]


@pytest.fixture(scope="module")
def repository(tiny_pipeline_dir, tmp_path_factory):
    settings = RepositorySettings(engine="torch", denoiser_instances=2, orchestrator_instances=1)
    return build_repository(
        tiny_pipeline_dir, tmp_path_factory.mktemp("torch") / "repo", settings, progress=None
    )


@pytest.fixture(scope="module")
def server(repository, start_triton_server):
    return start_triton_server(repository)


def onnx_image(tiny_repository, **fields) -> np.ndarray:
    """The ONNX engine's image: the orchestrator over ONNX Runtime sessions of its exports."""
    orchestrator = Orchestrator.load(tiny_repository / "driffusion" / "1")
    sessions = {}

    async def infer(model, inputs, outputs):
        if model not in sessions:
            path = tiny_repository / model / "1" / "model.onnx"
            sessions[model] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return dict(zip(outputs, sessions[model].run(list(outputs), dict(inputs)), strict=True))

    values = {
        f.name: np.array([v.encode() if isinstance(v, str) else v], dtype=api.NUMPY_DTYPES[f.dtype])
        for f in api.INPUTS
        if (v := fields.get(f.name)) is not None
    }
    return asyncio.run(orchestrator.generate(orchestrator.parse(values), infer)).image[0]


def test_components_are_python_models_running_torch(repository):
    for role in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder"):
        config = parse_config((repository / role / "config.pbtxt").read_text())
        assert config.backend == "python" and config.parameters["dtype"].string_value == "float32"
        assert (repository / role / "1" / "component" / "component.json").exists()
        assert not list((repository / role / "1").glob("*.onnx"))


@pytest.mark.parametrize(("mode", "k", "fanout"), REQUESTS)
def test_served_images_match_the_onnx_engine(server, tiny_repository, mode, k, fanout):
    fields = dict(prompt="a red cube", steps=12, seed=3, guidance_scale=5.0, mode=mode, k=k)
    with DriffusionClient(server.grpc_url) as client:
        client.wait_ready(timeout_s=60)
        served = client.generate(**fields, fanout=fanout).image
    reference = onnx_image(tiny_repository, **fields)
    # torch and ONNX Runtime kernels differ by ~1e-6: at most one uint8 level after rounding
    assert np.abs(served.astype(int) - reference).max() <= 1


def test_a_shape_outside_the_contract_is_refused_by_the_torch_runner(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    latent = grpcclient.InferInput("latent", [1, 4, 64, 64], "FP32")  # the model serves 2..10
    latent.set_data_from_numpy(np.zeros((1, 4, 64, 64), np.float32))
    with pytest.raises(InferenceServerException, match=r"latent dim 2 \(latent_height\)"):
        client.infer("vae_decoder", [latent])
