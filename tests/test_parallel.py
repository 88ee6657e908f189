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


# --- img2img and inpainting: the tail of the timesteps, the inpainting blend ------------------

VARIANTS = {  # family -> its img2img and inpainting pipeline classes
    "sd21": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    "sd3": ("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
}


def variant(pipe, class_name: str, **replace):
    """Another pipeline class built from the same components (the same modules, shared)."""
    import diffusers

    cls = getattr(diffusers, class_name)
    components = {k: v for k, v in pipe.components.items() if k in cls._get_signature_keys(cls)[0]}
    for key in ("requires_safety_checker",):
        if key in cls._get_signature_keys(cls)[0] + cls._get_signature_keys(cls)[1]:
            components[key] = False
    out = cls(**{**components, **replace})
    out.set_progress_bar_config(disable=True)
    return out


def picture(seed: int = 0):
    from PIL import Image

    g = np.random.default_rng(seed)
    return Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def hole():
    """A mask that repaints the centre square (white = repaint), the rest is known."""
    from PIL import Image

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def run_variant(pipe, seed=0, **kwargs):
    return pipe(
        "a red cube",
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


def mismatches_with_the_pipeline(pipe, calls: int, **kwargs) -> list[str]:
    """The pipeline's own output against ``parallelize`` at k=1 (the same up to float32 round-off
    of our step against diffusers', 1e-6 level; images in [0, 1]) and k=4 (``calls`` model
    calls walked in the right rounds, drafting moving it a little on random weights), and the
    pipeline intact after ``restore``: what does not hold, as messages."""
    ref = run_variant(pipe, **kwargs)
    parallelize(pipe, mode="aggressive", k=1)
    try:
        out = run_variant(pipe, **kwargs)
        k1 = pipe.driffusion.last_result
        parallelize(pipe, mode="aggressive", k=4)
        drafted = run_variant(pipe, **kwargs)
        k4_rounds = pipe.driffusion.last_result.rounds
    finally:
        pipe.driffusion.restore()
    k1_counts, k4_expected = (k1.rounds, k1.evaluations), count_rounds(calls, "aggressive", 4)[0]
    k1_error, k4_error = np.abs(out - ref).max(), np.abs(drafted - ref).mean()
    checks = {
        f"k=1 rounds, evaluations {k1_counts}, expected {(calls, calls)}": k1_counts
        == (calls, calls),
        f"k=4 rounds {k4_rounds}, expected {k4_expected}": k4_rounds == k4_expected,
        f"k=1 max difference {k1_error:.2e}": k1_error < 1e-4,
        f"k=4 mean difference {k4_error:.3f}": k4_error < 0.05,
        "the restored pipeline differs": np.array_equal(run_variant(pipe, **kwargs), ref),
    }
    return [message for message, holds in checks.items() if not holds]


def test_img2img_walks_the_tail_of_the_timesteps(pipe):
    """strength 0.5 of 8 steps: the pipeline runs timesteps[4:], so does DRiffusion."""
    img2img = variant(pipe, VARIANTS[family_of(pipe)][0])
    assert mismatches_with_the_pipeline(img2img, STEPS // 2, image=picture(), strength=0.5) == []


def test_inpainting_with_a_4_channel_denoiser_blends_the_known_region_every_step(pipe):
    inpaint = variant(pipe, VARIANTS[family_of(pipe)][1])
    kwargs = dict(image=picture(), mask_image=hole(), strength=0.75)
    assert mismatches_with_the_pipeline(inpaint, 6, **kwargs) == []


def test_inpainting_with_a_9_channel_unet_passes_mask_and_masked_image(pipe):
    if family_of(pipe) != "sd21":
        pytest.skip("one 9-channel inpainting UNet (SD2-inpainting's layout) is enough")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9}).eval()
    inpaint = variant(pipe, "StableDiffusionInpaintPipeline", unet=unet)
    assert mismatches_with_the_pipeline(inpaint, STEPS, image=picture(), mask_image=hole()) == []


@pytest.mark.parametrize(
    ("scheduler", "calls"),
    [
        ("DPMSolverMultistepScheduler", 4),
        ("PNDMScheduler", 5),  # timesteps[4:] of [t0, t1, t1, t2, ..., t7]: 5 calls
        ("EulerAncestralDiscreteScheduler", 4),
    ],
)
def test_img2img_with_multistep_and_ancestral_samplers(pipe, scheduler, calls):
    """set_begin_index (DPM-Solver++, Euler ancestral: its noise drawn from the pipeline's
    generator) and PNDM, which has no begin index and repeats a timestep (8 steps, 9 calls)."""
    if family_of(pipe) != "sd21":
        pytest.skip("the scheduler bookkeeping does not depend on the family")
    import diffusers

    config = dict(pipe.scheduler.config, skip_prk_steps=True)
    img2img = variant(pipe, "StableDiffusionImg2ImgPipeline")
    img2img.scheduler = getattr(diffusers, scheduler).from_config(config)
    assert mismatches_with_the_pipeline(img2img, calls, image=picture(), strength=0.5) == []


def test_pipelines_and_schedulers_it_does_not_understand_are_refused(pipe):
    from diffusers import HeunDiscreteScheduler

    class CustomLoop(type(pipe)):
        pass

    custom = CustomLoop(**{k: v for k, v in pipe.components.items()})
    with pytest.raises(ValueError, match="does not know the denoising loop of CustomLoop"):
        parallelize(custom)
    if family_of(pipe) == "sd3":
        return
    heun = variant(pipe, type(pipe).__name__)
    heun.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="unsupported scheduler HeunDiscreteScheduler"):
        parallelize(heun)
    assert "Drafting" not in type(heun.scheduler).__name__


def test_a_run_that_is_no_slice_of_the_timesteps_is_refused(pipe):
    parallelize(pipe, mode="aggressive", k=2)
    try:
        scheduler = pipe.driffusion.original_scheduler
        scheduler.set_timesteps(STEPS)
        pipe._num_timesteps = STEPS + 3  # more steps than the scheduler has timesteps
        with pytest.raises(ValueError, match="no slice of the scheduler's 8 timesteps"):
            pipe.driffusion.walked_slice(scheduler, scheduler.timesteps[0])
    finally:
        pipe.driffusion.restore()


def family_of(pipe) -> str:
    name = type(pipe).__name__
    return "sd3" if "3" in name else "sdxl" if "XL" in name else "sd21"


def test_step_callbacks_see_each_steps_latents(pipe):
    """``callback_on_step_end`` under parallelize gets the refined state of every step (k=1:
    the pipeline's own, step by step), not the final latents over and over."""

    def latents_per_step(**kwargs):
        seen = []

        def record(pipeline, i, t, tensors):
            seen.append(tensors["latents"].clone())
            return tensors

        pipe(
            "a red cube",
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=record,
            **kwargs,
        )
        return seen

    reference = latents_per_step()
    parallelize(pipe, mode="aggressive", k=1)
    try:
        k1 = latents_per_step()
        parallelize(pipe, mode="aggressive", k=4)
        k4 = latents_per_step()
    finally:
        pipe.driffusion.restore()
    assert len(k1) == len(k4) == len(reference) == STEPS
    for ours, theirs in zip(k1, reference, strict=True):
        assert (ours - theirs).abs().max() < 1e-4
    assert all(not torch.equal(a, b) for a, b in zip(k4, k4[1:], strict=False))
