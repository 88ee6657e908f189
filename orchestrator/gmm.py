"""An analytic Gaussian-mixture data distribution whose epsilon is exact: a perfect denoiser.

With data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and the variance-preserving forward process
``x = sqrt(a) x0 + sqrt(1-a) eps``, the marginal at alphabar ``a`` is the mixture of
``N(sqrt(a) mu_k, (a s_k^2 + 1 - a) I)``, so the exact noise prediction is
``eps(x) = -sqrt(1-a) * grad log p_a(x)``. Sampling with it isolates what DRiffusion itself changes:
any deviation from the sequential sampler is the draft-and-refine approximation, not model error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    weights: torch.Tensor  # (K,) mixture weights, summing to 1
    means: torch.Tensor  # (K, D)
    stds: torch.Tensor  # (K,) isotropic standard deviation of each component

    @classmethod
    def default(cls, dim: int = 8, components: int = 6, seed: int = 0) -> GaussianMixture:
        """A fixed mixture in ``dim`` dimensions with data scale about 1, like SD latents."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        stds = 0.3 + 0.3 * torch.rand(components, generator=g, dtype=torch.float64)
        weights = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        return cls(weights / weights.sum(), means, stds)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, D) exact draws from the data distribution."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def eps(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Exact epsilon at states ``x`` (N, D) with alphabar ``a`` (N,)."""
        x64, a64 = x.double(), a.double()[:, None, None]  # (N, 1, 1)
        centres = a64.sqrt() * self.means[None]  # (N, K, D)
        var = a64 * self.stds[None, :, None] ** 2 + (1 - a64)  # (N, K, 1)
        diff = centres - x64[:, None, :]  # (N, K, D)
        logp = -(diff**2).sum(-1) / (2 * var[..., 0]) - 0.5 * self.dim * torch.log(var[..., 0])
        r = torch.softmax(logp + self.weights.log()[None], dim=1)  # (N, K) responsibilities
        score = (r[..., None] * diff / var).sum(1)  # (N, D) = grad log p_a(x)
        return (-(1 - a64[:, 0]).sqrt() * score).to(x.dtype)

    def denoiser(self, alphas_cumprod: torch.Tensor):
        """``denoise(x, t)`` for a DDIM/DDPM scheduler with these ``alphas_cumprod`` (epsilon)."""
        alphas = alphas_cumprod.double()

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.eps(x, alphas[t.long()])

        return denoise

    def denoiser_for(
        self, scheduler, prediction_type: str | None = None, *, by_index: bool = False
    ):
        """``denoise(x, t)`` exact at the noise level of the state each of ``scheduler``'s
        timesteps is evaluated at, in its prediction type (epsilon or v_prediction).

        Alphabar schedulers (DDIM, DDPM, PNDM) evaluate at ``alphas_cumprod[t]``; sigma schedulers
        (Euler, Euler ancestral, DPM-Solver++, UniPC) hand the model a VP state at sigma_i, i.e.
        alphabar ``1 / (1 + sigma_i^2)``, which a Karras timestep (rounded) only approximates.
        Rounded Karras timesteps can repeat at two levels; ``by_index=True`` then takes ``t`` as
        the index of the step (run the engine on a Schedule whose timesteps are
        ``torch.arange(S)``)."""
        prediction_type = prediction_type or scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon or v_prediction: {prediction_type}")
        if type(scheduler).__name__.startswith("FlowMatch"):
            raise ValueError("flow-matching states are not variance preserving: no exact eps here")
        times = [float(t) for t in scheduler.timesteps]
        if hasattr(scheduler, "sigmas"):
            sigmas = scheduler.sigmas.double()
            levels = [float(1.0 / (1.0 + sigmas[i] ** 2)) for i in range(len(times))]
        else:
            alphas = scheduler.alphas_cumprod.double()
            levels = [float(alphas[int(t)]) for t in times]
        table: dict[float, float] = {}
        for n, (t, a) in enumerate(zip(times, levels, strict=True)):
            if table.setdefault(float(n) if by_index else t, a) != a:
                raise ValueError(
                    f"timestep {t} is used at two noise levels: use by_index=True for an exact "
                    "denoiser"
                )

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = torch.tensor([table[float(ti)] for ti in t], dtype=torch.float64)
            eps = self.eps(x, a)
            if prediction_type == "epsilon":
                return eps
            sa, sb = a.sqrt()[:, None], (1 - a).sqrt()[:, None]
            x0 = (x.double() - sb * eps.double()) / sa
            return (sa * eps.double() - sb * x0).to(x.dtype)  # v = sqrt(a) eps - sqrt(1-a) x0

        return denoise


def mean_relative_deviation(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of ||x - ref|| / ||ref||."""
    num = (x - reference).flatten(1).norm(dim=1)
    return float((num / reference.flatten(1).norm(dim=1)).mean())


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0
) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (N, D)."""
    if x.shape != y.shape:
        raise ValueError(f"point clouds must have the same shape, got {x.shape} and {y.shape}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ dirs).sort(dim=0)
    py, _ = (y.double() @ dirs).sort(dim=0)
    return float((px - py).abs().mean())


def sd_ddim_scheduler(steps: int, **overrides):
    """A diffusers DDIM scheduler with Stable Diffusion's settings (scaled_linear betas)."""
    from diffusers import DDIMScheduler

    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler = DDIMScheduler(**{**config, **overrides})
    scheduler.set_timesteps(steps)
    return scheduler


def demo_table(steps: int = 50, samples: int = 4000, seed: int = 0) -> str:
    """Sequential DDIM against DRiffusion (both modes, k = 1, 2, 4, 8) on the exact mixture: rounds,
    ideal speedup and mean relative deviation from the sequential sample of the same noise."""
    from .engine import sample
    from .schedule import Schedule

    mixture, scheduler = GaussianMixture.default(), sd_ddim_scheduler(steps)
    schedule = Schedule.from_diffusers(scheduler)
    denoise = mixture.denoiser(scheduler.alphas_cumprod)
    x = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed)).double()
    ref = sample(denoise, x, schedule, "sequential")
    lines = [
        f"DRiffusion on an exact {mixture.dim}-D Gaussian-mixture denoiser: DDIM, S={steps}, "
        f"{samples} samples",
        f"{'mode':<13} {'k':>2} {'rounds':>6} {'ideal speedup':>13} {'deviation':>10}",
    ]
    for mode in ("sequential", "aggressive", "conservative"):
        for k in (1,) if mode == "sequential" else (1, 2, 4, 8):
            r = ref if mode == "sequential" else sample(denoise, x, schedule, mode, k=k)
            dev = mean_relative_deviation(r.sample, ref.sample)
            lines.append(f"{mode:<13} {k:>2} {r.rounds:>6} {steps / r.rounds:>12.2f}x {dev:>10.3%}")
    return "\n".join(lines)


__all__ = [
    "GaussianMixture",
    "demo_table",
    "mean_relative_deviation",
    "sd_ddim_scheduler",
    "sliced_wasserstein",
]
