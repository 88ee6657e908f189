"""``Schedule``: the numbers a sampler run needs, read once from a diffusers scheduler.

A ``Schedule`` is a plain frozen value (no step counter): S model timesteps and, for each step i,
the noise level of the state it starts from (``levels[i]``) and of the state it lands on
(``targets[i]``). For DDIM/DDPM a level is alphabar, for Euler and flow matching it is sigma.

Why two arrays: diffusers' DDIM/DDPM land step i on ``alphabar[t_i - T // S]``, which equals
the next step's ``alphabar[t_{i+1}]`` for the usual "leading" spacing but not for every spacing.
A jump ``i -> j`` lands where the sequential step ``j-1`` lands: ``targets[j-1]``. This keeps
``J(i -> i+1) == Step(i)`` exact for every spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .prediction import ALPHA_SPACE_TYPES, SIGMA_SPACE_TYPES, check_flow

KINDS = ("ddim", "ddpm", "euler", "flow")
_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class Schedule:
    """One sampler run: S steps over timesteps ``tau_0 > ... > tau_{S-1}`` (docs/algorithm.md)."""

    kind: str  # "ddim" | "ddpm" | "euler" | "flow"
    timesteps: torch.Tensor  # (S,) what the model is called with, as the scheduler hands it out
    levels: tuple[float, ...]  # (S,) alphabar or sigma of the state x_i that step i starts from
    targets: tuple[float, ...]  # (S,) alphabar or sigma of the state step i lands on
    prediction_type: str  # epsilon | v_prediction | sample | flow_prediction
    input_scales: tuple[float, ...] | None = None  # (S,) model sees x_i * scale (Euler) or x_i
    eta: float = 0.0  # DDIM stochasticity (0: deterministic DDIM)
    use_clipped_model_output: bool = False  # DDIM: recompute eps from the clipped x0
    clip_sample_range: float | None = None  # clamp x0 to [-r, r] (clip_sample=True)
    threshold: tuple[float, float] | None = None  # dynamic thresholding (ratio, max value)
    variance_type: str = "fixed_small"  # DDPM posterior variance

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        steps = len(self.timesteps)
        if steps < 1:
            raise ValueError("schedule has 0 steps: call scheduler.set_timesteps(n) with n >= 1")
        for name in ("levels", "targets", "input_scales"):
            value = getattr(self, name)
            if value is not None and len(value) != steps:
                raise ValueError(f"{name} has {len(value)} entries, expected {steps} (one a step)")
        if self.eta < 0 or math.isnan(self.eta):
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.kind == "flow":
            check_flow(self.prediction_type)
        else:
            allowed = ALPHA_SPACE_TYPES if self.kind in ("ddim", "ddpm") else SIGMA_SPACE_TYPES
            if self.prediction_type not in allowed:
                raise ValueError(
                    f"prediction_type must be one of {', '.join(allowed)} for {self.kind}, "
                    f"got {self.prediction_type!r}"
                )
        if self.kind == "ddpm" and self.variance_type not in _DDPM_VARIANCES:
            raise ValueError(
                f"variance_type must be one of {', '.join(_DDPM_VARIANCES)} for DDPM, "
                f"got {self.variance_type!r} (learned variances need the model's extra channels)"
            )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether a step takes explicit noise z (DDPM, or DDIM with eta > 0)."""
        return self.kind == "ddpm" or (self.kind == "ddim" and self.eta > 0)

    @classmethod
    def from_diffusers(
        cls,
        scheduler,
        *,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
    ) -> Schedule:
        """Read a diffusers DDIM, DDPM, EulerDiscrete or FlowMatchEulerDiscrete scheduler after
        ``set_timesteps``. ``eta`` and ``use_clipped_model_output`` are DDIM ``step()`` arguments
        in diffusers (pipelines pass ``eta``), so they are given here."""
        name = type(scheduler).__name__
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError(f"{name}: call scheduler.set_timesteps(num_inference_steps) first")
        reader = _READERS.get(name)
        if reader is None:
            raise ValueError(
                f"unsupported scheduler {name}; supported: {', '.join(sorted(_READERS))}"
            )
        return reader(scheduler, eta=eta, use_clipped_model_output=use_clipped_model_output)


def _x0_processing(config) -> dict:
    threshold = None
    if config.get("thresholding", False):
        threshold = (float(config.dynamic_thresholding_ratio), float(config.sample_max_value))
    clip = float(config.clip_sample_range) if config.get("clip_sample", False) else None
    return {"clip_sample_range": clip, "threshold": threshold}


def _alphabar_levels(scheduler, previous, final: float) -> tuple[tuple, tuple]:
    alphas = scheduler.alphas_cumprod.double()
    top = int(scheduler.timesteps.max())
    if top >= len(alphas):  # e.g. DDIM, "leading" spacing, steps_offset=1 at S = 1000
        raise ValueError(
            f"{type(scheduler).__name__} with {scheduler.num_inference_steps} steps asks for "
            f"timestep {top}, past the {len(alphas)} it was trained with: use fewer steps"
        )
    steps = [int(t) for t in scheduler.timesteps.tolist()]
    table = alphas.tolist()  # python floats: indexing a list is far cheaper than a tensor
    prev = [int(previous(t)) for t in steps]
    levels = tuple(table[t] for t in steps)
    targets = tuple(table[q] if q >= 0 else final for q in prev)
    return levels, targets


def _read_ddim(scheduler, *, eta, use_clipped_model_output) -> Schedule:
    c = scheduler.config
    ratio = c.num_train_timesteps // scheduler.num_inference_steps
    levels, targets = _alphabar_levels(
        scheduler, lambda t: t - ratio, float(scheduler.final_alpha_cumprod)
    )
    return Schedule(
        kind="ddim",
        timesteps=scheduler.timesteps.clone(),
        levels=levels,
        targets=targets,
        prediction_type=c.prediction_type,
        eta=float(eta),
        use_clipped_model_output=bool(use_clipped_model_output),
        **_x0_processing(c),
    )


def _read_ddpm(scheduler, *, eta, use_clipped_model_output) -> Schedule:
    c = scheduler.config
    levels, targets = _alphabar_levels(scheduler, scheduler.previous_timestep, 1.0)
    return Schedule(
        kind="ddpm",
        timesteps=scheduler.timesteps.clone(),
        levels=levels,
        targets=targets,
        prediction_type=c.prediction_type,
        variance_type=c.variance_type,
        **_x0_processing(c),
    )


def _read_sigmas(scheduler) -> tuple[tuple, tuple]:
    sigmas = scheduler.sigmas.double().tolist()
    steps = len(scheduler.timesteps)
    return tuple(sigmas[:steps]), tuple(sigmas[1 : steps + 1])


def _read_euler(scheduler, *, eta, use_clipped_model_output) -> Schedule:
    levels, targets = _read_sigmas(scheduler)
    return Schedule(
        kind="euler",
        timesteps=scheduler.timesteps.clone(),
        levels=levels,
        targets=targets,
        prediction_type=scheduler.config.prediction_type,
        # EulerDiscreteScheduler.scale_model_input: x / sqrt(sigma^2 + 1)
        input_scales=tuple(1.0 / math.sqrt(s * s + 1.0) for s in levels),
    )


def _read_flow(scheduler, *, eta, use_clipped_model_output) -> Schedule:
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError(
            "FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) is not supported"
        )
    levels, targets = _read_sigmas(scheduler)
    return Schedule(
        kind="flow",
        timesteps=scheduler.timesteps.clone(),
        levels=levels,
        targets=targets,
        prediction_type="flow_prediction",
    )


_READERS = {
    "DDIMScheduler": _read_ddim,
    "DDPMScheduler": _read_ddpm,
    "EulerDiscreteScheduler": _read_euler,
    "FlowMatchEulerDiscreteScheduler": _read_flow,
}


def max_steps(scheduler, limit: int = 1000) -> int:
    """The largest S <= ``limit`` such that every step count 1..S gives a valid schedule with
    ``scheduler``'s configuration (DDIM with ``steps_offset=1`` and "leading" spacing stops at
    999 of 1000: its 1000-step schedule would ask for timestep 1000). ``scheduler`` is left
    with its timesteps set to the last count tried."""
    for steps in range(1, limit + 1):
        try:
            scheduler.set_timesteps(steps)
            Schedule.from_diffusers(scheduler)
        except ValueError:
            return steps - 1
    return limit
