"""The orchestrator's host logic without Triton: model calls go to ONNX Runtime sessions over the
repository's own ONNX files, and the result is compared with the diffusers pipeline itself."""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import torch

from driffusion import api, count_rounds
from driffusion.export.tiny import load_tiny_pipeline
from driffusion.service import Orchestrator


@pytest.fixture(scope="module")
def orchestrator(tiny_repository):
    return Orchestrator.load(tiny_repository / "driffusion" / "1")


@pytest.fixture(scope="module")
def infer(tiny_repository):
    """``infer(model, inputs, outputs)`` over ONNX Runtime, counting calls per model."""
    sessions, calls = {}, []

    async def run(model, inputs, outputs):
        if model not in sessions:
            sessions[model] = ort.InferenceSession(
                str(tiny_repository / model / "1" / "model.onnx")
            )
        calls.append((model, next(iter(inputs.values())).shape[0]))
        return dict(zip(outputs, sessions[model].run(list(outputs), dict(inputs)), strict=True))

    run.calls = calls
    return run


def generate(orchestrator, infer, **fields):
    values = {
        f.name: np.array([v.encode() if isinstance(v, str) else v], dtype=api.NUMPY_DTYPES[f.dtype])
        for f in api.INPUTS
        if (v := fields.get(f.name)) is not None
    }
    return asyncio.run(orchestrator.generate(orchestrator.parse(values), infer))


def test_sequential_matches_the_diffusers_pipeline(orchestrator, infer, tiny_pipeline_dir):
    pipe = load_tiny_pipeline(tiny_pipeline_dir)
    ref = pipe(
        "a red square",
        num_inference_steps=12,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    out = generate(
        orchestrator,
        infer,
        prompt="a red square",
        steps=12,
        guidance_scale=5.0,
        seed=7,
        mode="sequential",
    )
    (image,) = out.image  # (1, H, W, 3): one image
    assert image.shape == ref.shape and image.dtype == np.uint8
    # ONNX Runtime vs torch differ by ~1e-6: at most one uint8 level after rounding.
    assert np.abs(image.astype(int) - ref).max() <= 1


def test_rounds_and_denoiser_batches_follow_the_plan(orchestrator, infer):
    infer.calls.clear()
    out = generate(
        orchestrator,
        infer,
        prompt="x",
        steps=20,
        mode="aggressive",
        k=4,
        fanout="batch",
        guidance_scale=3.0,
    )
    assert (out.rounds, out.evaluations) == count_rounds(20, "aggressive", 4)
    batches = [rows for model, rows in infer.calls if model == "denoiser"]
    assert len(batches) == out.rounds  # one batched request per round
    assert sum(batches) == 2 * out.evaluations  # every state as its CFG pair


def test_fanout_spreads_a_round_over_the_denoiser_instances(orchestrator, infer):
    infer.calls.clear()
    out = generate(
        orchestrator,
        infer,
        prompt="x",
        steps=20,
        mode="aggressive",
        k=8,
        fanout="instances",
        guidance_scale=3.0,
    )
    batches = [rows for model, rows in infer.calls if model == "denoiser"]
    # 4 instances: a round of 8 drafts goes out as 4 requests of 2 states (4 CFG rows) each
    assert max(batches) == 4 and sum(batches) == 2 * out.evaluations


def test_over_long_prompts_are_rejected_with_the_limit(orchestrator):
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens for text_encoder; at most 75"):
        orchestrator.parse({"prompt": np.array([("word " * 100).encode()], dtype=object)})


# --- fp16 engines: the orchestrator sends what the served spec says ------------------------------


@pytest.fixture(scope="module")
def fp16_repository(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline's CPU repository at precision fp16 (fp16 ONNX, float16 I/O)."""
    from driffusion.model_repository.build import RepositorySettings, build_repository

    out = tmp_path_factory.mktemp("fp16") / "repo"
    return build_repository(
        tiny_pipeline_dir, out, RepositorySettings(precision="fp16"), progress=None
    )


def test_every_model_call_carries_the_served_dtypes_and_the_image_matches_fp32(
    fp16_repository, orchestrator, infer
):
    """Triton refuses an input whose dtype differs from config.pbtxt; this ``infer`` does too.
    The host math stays float32: the fp16 image is the fp32 one within a few uint8 levels."""
    fp16 = Orchestrator.load(fp16_repository / "driffusion" / "1")
    sessions, seen = {}, {}

    async def strict(model, inputs, outputs):
        spec = fp16.family.components[model]
        for name, value in inputs.items():
            if value.dtype != np.dtype(spec.tensor(name).dtype):
                raise ValueError(
                    f"{model}/{name}: sent {value.dtype}, served {spec.tensor(name).dtype}"
                )
            seen[(model, name)] = value.dtype.name
        if model not in sessions:
            sessions[model] = ort.InferenceSession(
                str(fp16_repository / model / "1" / "model.onnx")
            )
        out = sessions[model].run(list(outputs), dict(inputs))
        for name, value in zip(outputs, out, strict=True):
            assert value.dtype == np.dtype(spec.tensor(name).dtype), (model, name)
        return dict(zip(outputs, out, strict=True))

    fields = dict(prompt="a photo of a cat", steps=6, k=4, seed=3)
    got = generate(fp16, strict, **fields)
    ref = generate(orchestrator, infer, **fields)
    assert seen[("denoiser", "sample")] == "float16"
    assert seen[("denoiser", "encoder_hidden_states")] == "float16"
    assert seen[("denoiser", "timestep")] == "float32"
    assert seen[("vae_decoder", "latent")] == "float16"
    diff = np.abs(got.image.astype(int) - ref.image.astype(int))
    assert diff.mean() <= 0.5 and diff.max() <= 4, (diff.mean(), diff.max())  # seen: 0.07, 1
