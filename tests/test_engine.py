"""The draft-and-refine engine against its references: the sequential sampler, diffusers' own
``step()``, the round formulas of docs/algorithm.md and an exact (analytic) denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from driffusion import Schedule, count_rounds, jump, plan, sample, step
from driffusion.gmm import (
    GaussianMixture,
    mean_relative_deviation,
    sd_ddim_scheduler,
    sliced_wasserstein,
)

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)  # (B, C, H, W)


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||: the tolerance measure of these tests."""
    return float((x - ref).norm() / ref.norm())


def toy_model(seed: int = 0):
    """A fixed, deterministic, nonlinear stand-in for a denoiser: outputs depend on x and t."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE[1], SHAPE[1], generator=g) * 0.5

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("oc,bchw->bohw", w, x)
        return torch.tanh(mixed) + 0.01 * t.float().view(-1, 1, 1, 1) / 1000 * x

    return denoise


def schedulers(steps: int):
    """Every supported sampler, in configurations a pipeline would use (name, scheduler, kwargs)."""
    out = [
        (
            "ddim-eps",
            DDIMScheduler(**SD_BETAS, set_alpha_to_one=False, steps_offset=1, clip_sample=False),
            {},
        ),
        (
            "ddim-v-trailing",
            DDIMScheduler(
                **SD_BETAS,
                prediction_type="v_prediction",
                timestep_spacing="trailing",
                clip_sample=False,
            ),
            {},
        ),
        (
            "ddim-sample-clipped",
            DDIMScheduler(
                prediction_type="sample", clip_sample=True, beta_schedule="squaredcos_cap_v2"
            ),
            {"use_clipped_model_output": True},
        ),
        ("ddim-eta", DDIMScheduler(**SD_BETAS, clip_sample=False), {"eta": 0.7}),
        ("ddpm-eps", DDPMScheduler(**SD_BETAS, clip_sample=False), {}),
        ("ddpm-clipped", DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True), {}),
        ("ddpm-threshold", DDPMScheduler(thresholding=True, clip_sample=False), {}),
        ("euler-eps", EulerDiscreteScheduler(**SD_BETAS), {}),
        (
            "euler-v",
            EulerDiscreteScheduler(
                **SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing"
            ),
            {},
        ),
        ("flow-shift3", FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
    ]
    for _, s, _ in out:
        s.set_timesteps(steps)
    return out


SCHEDULERS = [name for name, _, _ in schedulers(1)]


def build(name: str, steps: int):
    ((_, scheduler, kwargs),) = [entry for entry in schedulers(steps) if entry[0] == name]
    return scheduler, Schedule.from_diffusers(scheduler, **kwargs), kwargs


def scale_model_input(scheduler, x, t):
    """Flow matching has no input scaling (and no ``scale_model_input``)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def diffusers_loop(scheduler, kwargs, denoise, x, generator):
    """The reference: a plain loop over the diffusers scheduler's own ``step``."""
    for t in scheduler.timesteps:
        e = denoise(scale_model_input(scheduler, x, t), t.expand(x.shape[0]))
        x = scheduler.step(e, t, x, generator=generator, **kwargs).prev_sample
    return x


def initial_noise(scheduler, seed: int = 1) -> torch.Tensor:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return x * float(getattr(scheduler, "init_noise_sigma", 1.0))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_sequential_matches_a_diffusers_step_loop(name):
    scheduler, schedule, kwargs = build(name, 20)
    x, denoise = initial_noise(scheduler), toy_model()
    ref = diffusers_loop(scheduler, kwargs, denoise, x, torch.Generator().manual_seed(7))
    ours = sample(
        denoise, x, schedule, mode="sequential", generator=torch.Generator().manual_seed(7)
    )
    assert relative(ours.sample, ref) < 1e-5
    assert ours.rounds == ours.evaluations == 20


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_k1_is_bit_identical_to_sequential(name, mode):
    _, schedule, _ = build(name, 13)
    x, denoise = initial_noise(build(name, 13)[0]), toy_model()
    seq = sample(denoise, x, schedule, "sequential", generator=torch.Generator().manual_seed(3))
    par = sample(denoise, x, schedule, mode, k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(par.sample, seq.sample)
    assert par.rounds == seq.rounds == 13


@pytest.mark.parametrize("name", SCHEDULERS)
def test_one_step_jump_is_the_samplers_step(name):
    scheduler, schedule, kwargs = build(name, 10)
    x, denoise = initial_noise(scheduler), toy_model()
    for i, t in enumerate(scheduler.timesteps):
        e = denoise(scale_model_input(scheduler, x, t), t.expand(x.shape[0]))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        ref = scheduler.step(e, t, x, generator=torch.Generator().manual_seed(i), **kwargs)
        ours = jump(schedule, x, e, i, i + 1, z)
        assert relative(ours, ref.prev_sample) < 1e-5, f"step {i}"
        assert torch.equal(ours, step(schedule, x, e, i, z))
        x = ref.prev_sample


@pytest.mark.parametrize("name", ["ddim-eps", "ddim-v-trailing", "euler-eps", "flow-shift3"])
def test_a_long_jump_is_exact_when_the_data_is_a_single_point(name):
    """With data concentrated at one point c, the exact model output keeps x0 == c, so every
    deterministic trajectory is a straight line and one jump 0 -> j equals j sequential steps."""
    scheduler, schedule, _ = build(name, 12)
    c = torch.full(SHAPE, 0.3)
    x0 = initial_noise(scheduler)

    def exact(x, t):  # model output for x0 == c in the schedule's own prediction type
        i = int((scheduler.timesteps == t[0]).nonzero()[0])
        if schedule.kind == "flow":
            return x / schedule.levels[i] - c / schedule.levels[i]  # v = eps - x0
        if schedule.kind == "euler":  # model saw x / sqrt(s^2+1); x = c + s eps
            s = schedule.levels[i]
            eps = (x * math.sqrt(s * s + 1) - c) / s
            return eps if schedule.prediction_type == "epsilon" else None
        a = schedule.levels[i]
        eps = (x - math.sqrt(a) * c) / math.sqrt(1 - a)
        if schedule.prediction_type == "v_prediction":
            return math.sqrt(a) * eps - math.sqrt(1 - a) * c
        return eps

    seq = sample(exact, x0, schedule, "sequential").sample
    e0 = exact(x0 * (schedule.input_scales or [1.0])[0], scheduler.timesteps[:1].expand(2))
    assert relative(jump(schedule, x0, e0, 0, 12), seq) < 1e-5


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_rounds_follow_the_algorithm_formulas(mode):
    for steps in range(1, 61):
        for k in range(1, 9):
            if mode == "aggressive":
                expected = 1 + math.ceil((steps - 1) / k)
            else:
                anchors = math.ceil(steps / (k + 1))
                last_anchor = (anchors - 1) * (k + 1)
                expected = 2 * anchors - (last_anchor == steps - 1)  # last block may not draft
            assert count_rounds(steps, mode, k) == (expected, steps), (steps, k)


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_a_run_makes_one_denoiser_call_per_round_with_all_its_states(mode):
    _, schedule, _ = build("ddim-eps", 50)
    calls = []
    model = toy_model()

    def counting(x, t):
        calls.append(x.shape[0])
        return model(x, t)

    result = sample(counting, initial_noise(build("ddim-eps", 50)[0]), schedule, mode, k=4)
    assert result.rounds == len(calls) == (14 if mode == "aggressive" else 20)
    assert [n // SHAPE[0] for n in calls] == result.round_sizes
    assert result.evaluations == sum(result.round_sizes) == 50


def test_a_k_schedule_sets_each_blocks_size():
    blocks = plan(50, "aggressive", [8, 8, 4, 2])
    assert [b.size for b in blocks[:5]] == [8, 8, 4, 2, 2]  # the last entry repeats
    by_anchor = plan(50, "aggressive", lambda anchor, steps: 6 if anchor < 30 else 2)
    assert all(b.size == (6 if b.anchor < 30 else 2) for b in by_anchor)
    _, schedule, _ = build("ddim-eps", 50)
    x, model = initial_noise(build("ddim-eps", 50)[0]), toy_model()
    result = sample(model, x, schedule, "aggressive", k=[8, 8, 4, 2])
    assert (result.rounds, result.evaluations) == count_rounds(50, "aggressive", [8, 8, 4, 2])
    assert torch.equal(
        sample(model, x, schedule, "aggressive", k=[1]).sample,
        sample(model, x, schedule, "sequential").sample,
    )


@pytest.fixture(scope="module")
def mixture_runs():
    """S=50 DDIM on an exact Gaussian-mixture denoiser: sequential and DRiffusion, same noise."""
    mixture, scheduler = GaussianMixture.default(), sd_ddim_scheduler(50)
    schedule, denoise = (
        Schedule.from_diffusers(scheduler),
        mixture.denoiser(scheduler.alphas_cumprod),
    )
    x = torch.randn(
        4000, mixture.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    runs = {
        mode: sample(denoise, x, schedule, mode, k=4).sample
        for mode in ("sequential", "aggressive", "conservative")
    }
    return runs, mixture.sample_data(4000, torch.Generator().manual_seed(2))


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_with_an_exact_denoiser_drafts_stay_on_the_sequential_trajectory(mixture_runs, mode):
    runs, data = mixture_runs
    assert mean_relative_deviation(runs[mode], runs["sequential"]) < 0.005
    assert sliced_wasserstein(runs[mode], data) < 1.05 * sliced_wasserstein(
        runs["sequential"], data
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fast"}, "mode must be one of sequential, aggressive, conservative"),
        ({"k": 0}, "k must be >= 1"),
        ({"k": -3}, "k must be >= 1"),
        ({"k": []}, "empty list"),
        ({"k": [4, 0]}, r"k\[1\] must be an int >= 1"),
        ({"k": lambda a, s: 0}, "k schedule at anchor 0 must be an int >= 1"),
        ({"k": 2.5}, "k must be an int"),
    ],
)
def test_bad_arguments_raise_a_clear_value_error(kwargs, message):
    _, schedule, _ = build("ddim-eps", 10)
    with pytest.raises(ValueError, match=message):
        sample(toy_model(), torch.zeros(SHAPE), schedule, **{"mode": "aggressive", **kwargs})


def test_zero_steps_and_unset_schedulers_are_rejected():
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        plan(0, "aggressive", 4)
    with pytest.raises(ValueError, match="call scheduler.set_timesteps"):
        Schedule.from_diffusers(DDIMScheduler())
    with pytest.raises(ValueError, match="0 steps"):
        Schedule("ddim", torch.zeros(0), (), (), "epsilon")
    with pytest.raises(ValueError, match="unsupported scheduler PNDMScheduler"):
        from diffusers import PNDMScheduler

        s = PNDMScheduler()
        s.set_timesteps(10)
        Schedule.from_diffusers(s)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            lambda x, t: x[:1],
            r"denoiser returned shape \(1, 4, 8, 8\) for input shape \(2, 4, 8, 8\)",
        ),
        (lambda x, t: x * float("nan"), "denoiser returned NaN or inf in round 0"),
        (lambda x, t: x.numpy(), "denoiser must return a torch.Tensor"),
    ],
)
def test_a_misbehaving_denoiser_is_named(bad, message):
    _, schedule, _ = build("ddim-eps", 10)
    with pytest.raises(ValueError, match=message):
        sample(bad, torch.ones(SHAPE), schedule, "aggressive", k=4)


def test_stochastic_samplers_draw_the_same_noise_in_every_mode():
    """DDPM: step i uses the noise z_i in every mode and k, drawn from one generator in step
    order whatever order the engine asks for it in; k=1 then equals sequential, and the same
    seed reproduces a run while another seed changes it."""
    from driffusion.engine import StepNoise

    _, schedule, _ = build("ddpm-eps", 20)
    x, model = torch.randn(SHAPE), toy_model()
    z = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) for i in range(20)]
    used: dict[str, dict[int, torch.Tensor]] = {}
    for mode, k in (("sequential", 1), ("aggressive", 1), ("aggressive", 4), ("conservative", 3)):
        seen = used.setdefault(f"{mode}-{k}", {})
        sample(model, x, schedule, mode, k=k, noise=lambda i, seen=seen: seen.setdefault(i, z[i]))
    steps = set(used["sequential-1"])
    assert all(set(u) == steps for u in used.values())  # the same steps draw noise in every mode

    late_first = StepNoise(x, torch.Generator().manual_seed(5))
    late_first(7)
    in_order = StepNoise(x, torch.Generator().manual_seed(5))
    assert all(torch.equal(late_first(i), in_order(i)) for i in range(10))  # drawn in step order

    runs = {
        (mode, k, seed): sample(
            model, x, schedule, mode, k=k, generator=torch.Generator().manual_seed(seed)
        ).sample
        for mode, k, seed in (("sequential", 1, 5), ("aggressive", 1, 5), ("aggressive", 4, 5))
        + (("aggressive", 4, 5), ("aggressive", 4, 6))
    }
    assert torch.equal(runs["sequential", 1, 5], runs["aggressive", 1, 5])
    again = sample(
        model, x, schedule, "aggressive", k=4, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(runs["aggressive", 4, 5], again.sample)
    assert not torch.equal(runs["aggressive", 4, 5], runs["aggressive", 4, 6])
