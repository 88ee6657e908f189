"""The embedded model is a standard diffusers pipeline that draws the digit its prompt asks for,
with the sequential sampler and with DRiffusion (``parallelize``), judged by the repository's own
digits classifier (held-out accuracy 98.6%)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driffusion import count_rounds, parallelize
from driffusion.export.pipelines import load_pipeline
from driffusion.model_repository.paths import embedded_dir
from driffusion.model_repository.serve import EMBEDDED_GUIDANCE

EMBEDDED = embedded_dir() / "digits"
STEPS = 20

pytestmark = pytest.mark.skipif(
    not (EMBEDDED / "model_index.json").exists(),
    reason="the embedded model is not in this checkout",
)


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(EMBEDDED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits(pipe) -> np.ndarray:
    """The classifier's reading of one image per digit 0..9 (fixed seeds)."""
    from training.digits_classifier import load_classifier, predict
    from training.digits_data import prompt_for

    images = pipe(
        [prompt_for(d) for d in range(10)],
        num_inference_steps=STEPS,
        guidance_scale=EMBEDDED_GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    return predict(
        load_classifier(EMBEDDED / "classifier"), torch.from_numpy(images).permute(0, 3, 1, 2)
    )


def test_sequential_draws_the_prompted_digits(pipe):
    assert (digits(pipe) == np.arange(10)).sum() >= 9


def test_driffusion_aggressive_k4_draws_them_too(pipe):
    parallelize(pipe, mode="aggressive", k=4)
    try:
        assert (digits(pipe) == np.arange(10)).sum() >= 9
        assert pipe.driffusion.last_result.rounds == count_rounds(STEPS, "aggressive", 4)[0]
    finally:
        pipe.driffusion.restore()


def test_served_images_match_the_library(pipe, tmp_path, start_triton_server):
    """A short run of the quality benchmark's sampling through Triton: the same prompt, seed and
    mode give the image the diffusers pipeline (with parallelize for DRiffusion) gives."""
    from driffusion.client import DriffusionClient
    from driffusion.model_repository.build import RepositorySettings, build_repository

    settings = RepositorySettings(
        denoiser_instances=1, orchestrator_instances=1, stream_instances=0
    )
    repo = build_repository(EMBEDDED, tmp_path / "repo", settings, progress=None)
    server = start_triton_server(repo)
    with DriffusionClient(server.grpc_url) as client:
        client.wait_ready(timeout_s=120)
        for mode, k in (("sequential", 1), ("aggressive", 4)):
            served = client.generate(
                "a handwritten digit three", steps=20, seed=3, guidance_scale=3.0, mode=mode, k=k
            ).image
            if mode != "sequential":
                parallelize(pipe, mode=mode, k=k)
            try:
                ref = pipe(
                    "a handwritten digit three",
                    num_inference_steps=STEPS,
                    guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(3),
                    output_type="np",
                ).images[0]
            finally:
                if mode != "sequential":
                    pipe.driffusion.restore()
            ref = (ref * 255).round().astype(np.uint8)
            # ONNX Runtime against torch: at most one uint8 level after rounding
            assert np.abs(served.astype(int) - ref).max() <= 1, mode
