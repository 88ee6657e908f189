"""``parallelize`` on real diffusers pipelines (tiny random weights, built from config): SD2.1-,
SDXL- and SD3-like. The reference is each pipeline's own ``__call__`` before patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driffusion import count_rounds, parallelize
from driffusion.export.tiny import build_tiny_pipeline, load_tiny_pipeline

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one torch thread (two threads contend on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sd21", "sdxl", "sd3"])
def pipe(request, tmp_path_factory):
    folder = build_tiny_pipeline(request.param, tmp_path_factory.mktemp(request.param))
    pipe = load_tiny_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0):
    return pipe(
        "a red cube",
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def test_k1_reproduces_the_pipelines_own_sampler(pipe):
    ref = run(pipe)
    parallelize(pipe, mode="aggressive", k=1)
    try:
        out = run(pipe)
        assert pipe.driffusion.last_result.rounds == STEPS
    finally:
        pipe.driffusion.restore()
    # our Step and diffusers' step() round differently (1e-6 level); images are in [0, 1]
    assert np.abs(out - ref).max() < 1e-4


def test_replicas_on_two_devices_give_the_one_device_batch_result(pipe):
    ref = run(pipe)
    parallelize(pipe, devices=["cpu", "cpu"], mode="aggressive", k=4)
    fanned = run(pipe)
    result = pipe.driffusion.last_result
    parallelize(pipe, mode="aggressive", k=4)  # re-patching replaces the previous patch
    batched = run(pipe)
    pipe.driffusion.restore()
    assert (result.rounds, result.evaluations) == count_rounds(STEPS, "aggressive", 4)
    np.testing.assert_allclose(fanned, batched, atol=1e-5)
    # drafts move the image a little on random weights; the pipeline is still the same one
    assert np.abs(fanned - ref).mean() < 0.05
    np.testing.assert_array_equal(run(pipe), ref)  # restore() gives the pipeline back intact


def test_conservative_mode_and_a_k_schedule(pipe):
    parallelize(pipe, mode="conservative", k=[3, 2])
    try:
        run(pipe)
        result = pipe.driffusion.last_result
    finally:
        pipe.driffusion.restore()
    assert (result.rounds, result.evaluations) == count_rounds(STEPS, "conservative", [3, 2])


def test_bad_arguments_are_rejected_before_patching(pipe):
    with pytest.raises(ValueError, match="mode must be one of"):
        parallelize(pipe, mode="turbo")
    with pytest.raises(ValueError, match="k must be >= 1"):
        parallelize(pipe, k=0)
    assert "Drafting" not in type(pipe.scheduler).__name__  # nothing was patched
