"""``Schedule``: the numbers a sampler run needs, read once from a diffusers scheduler.

A ``Schedule`` is a plain frozen value (no step counter): S model timesteps and, for each step i,
the noise level of the state it starts from (``levels[i]``) and of the state it lands on
(``targets[i]``). For DDIM/DDPM/PLMS a level is alphabar, for Euler (ancestral), flow matching,
DPM-Solver++ and UniPC it is sigma (for the last two, of a VP state: sigma_t / alpha_t).

A step is one model call. PNDM (PLMS) calls the model twice at its second timestep (diffusers
repeats it), so its Schedule has one step more than ``num_inference_steps``: S + 1 calls.

``begin``/``end`` read a slice of the scheduler's timesteps, as img2img and inpainting pipelines
walk only the tail (``strength``). A multistep solver starts afresh at ``begin`` (no history, as
diffusers' ``set_begin_index`` does), while its last-step rules keep the full run's indices.

Why two arrays: diffusers' DDIM/DDPM land step i on ``alphabar[t_i - T // S]``, which equals
the next step's ``alphabar[t_{i+1}]`` for the usual "leading" spacing but not for every spacing.
A jump ``i -> j`` lands where the sequential step ``j-1`` lands: ``targets[j-1]``. This keeps
``J(i -> i+1) == Step(i)`` exact for every spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from .prediction import (
    ALPHA_SPACE_TYPES,
    SIGMA_SPACE_TYPES,
    alpha_space,
    check_flow,
    sigma_space,
    vp_alpha_sigma,
    vp_sigma_space,
)
from .samplers import check_supported

KINDS = ("ddim", "ddpm", "euler", "euler_ancestral", "flow", "dpmpp", "unipc", "plms")
_EPS_OR_V = ("epsilon", "v_prediction")
_PREDICTION_TYPES = {  # beyond flow: which model outputs each kind converts
    "ddim": ALPHA_SPACE_TYPES,
    "ddpm": ALPHA_SPACE_TYPES,
    "euler": SIGMA_SPACE_TYPES,
    "euler_ancestral": _EPS_OR_V,
    "dpmpp": ALPHA_SPACE_TYPES,
    "unipc": ALPHA_SPACE_TYPES,
    "plms": _EPS_OR_V,
}
_SOLVER_TYPES = {"dpmpp": ("midpoint", "heun"), "unipc": ("bh1", "bh2")}
_DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class Schedule:
    """One sampler run: S steps over timesteps ``tau_0 > ... > tau_{S-1}`` (docs/algorithm.md)."""

    kind: str  # one of KINDS
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
    orders: tuple[int, ...] | None = None  # (S,) DPM-Solver++/UniPC: order of the update at step i
    corrector: tuple[bool, ...] | None = None  # (S,) UniPC: step i first corrects x_i (UniC)
    solver_type: str = ""  # DPM-Solver++: midpoint | heun; UniPC: bh1 | bh2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        steps = len(self.timesteps)
        if steps < 1:
            raise ValueError("schedule has 0 steps: call scheduler.set_timesteps(n) with n >= 1")
        for name in ("levels", "targets", "input_scales", "orders", "corrector"):
            value = getattr(self, name)
            if value is not None and len(value) != steps:
                raise ValueError(f"{name} has {len(value)} entries, expected {steps} (one a step)")
        if self.eta < 0 or math.isnan(self.eta):
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.kind == "flow":
            check_flow(self.prediction_type)
        else:
            allowed = _PREDICTION_TYPES[self.kind]
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
        if self.kind in _SOLVER_TYPES:
            if self.orders is None or any(p < 1 or p > i + 1 for i, p in enumerate(self.orders)):
                raise ValueError(f"{self.kind} needs orders, 1 <= orders[i] <= i + 1")
            if self.solver_type not in _SOLVER_TYPES[self.kind]:
                raise ValueError(
                    f"solver_type must be one of {', '.join(_SOLVER_TYPES[self.kind])} for "
                    f"{self.kind}, got {self.solver_type!r}"
                )
        if self.kind == "unipc" and self.corrector is None:
            raise ValueError("unipc needs corrector (one flag a step)")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def stochastic(self) -> bool:
        """Whether a step takes explicit noise z (DDPM, Euler ancestral, or DDIM with eta > 0)."""
        return self.kind in ("ddpm", "euler_ancestral") or (self.kind == "ddim" and self.eta > 0)

    @classmethod
    def from_diffusers(
        cls,
        scheduler,
        *,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        begin: int = 0,
        end: int | None = None,
    ) -> Schedule:
        """Read a diffusers scheduler after ``set_timesteps`` (supported: see
        :func:`~driffusion.samplers.check_supported`). ``eta`` and ``use_clipped_model_output``
        are DDIM ``step()`` arguments in diffusers (pipelines pass ``eta``), so they are given
        here. ``begin``/``end``: the slice of ``scheduler.timesteps`` a pipeline walks (img2img
        walks ``timesteps[begin:]``)."""
        name = type(scheduler).__name__
        check_supported(scheduler)
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError(f"{name}: call scheduler.set_timesteps(num_inference_steps) first")
        total = len(scheduler.timesteps)
        end = total if end is None else end
        if not 0 <= begin < end <= total:
            raise ValueError(f"need 0 <= begin < end <= {total} timesteps, got {begin}, {end}")
        steps = range(begin, end)
        return _READERS[name](
            scheduler, steps, eta=eta, use_clipped_model_output=use_clipped_model_output
        )


def _x0_processing(config) -> dict:
    threshold = None
    if config.get("thresholding", False):
        threshold = (float(config.dynamic_thresholding_ratio), float(config.sample_max_value))
    clip = float(config.clip_sample_range) if config.get("clip_sample", False) else None
    return {"clip_sample_range": clip, "threshold": threshold}


def _alphabar_levels(scheduler, steps, previous, final: float) -> tuple[tuple, tuple]:
    alphas = scheduler.alphas_cumprod.double()
    used = scheduler.timesteps[steps.start : steps.stop]
    top = int(used.max())
    if top >= len(alphas):  # e.g. DDIM, "leading" spacing, steps_offset=1 at S = 1000
        raise ValueError(
            f"{type(scheduler).__name__} with {scheduler.num_inference_steps} steps asks for "
            f"timestep {top}, past the {len(alphas)} it was trained with: use fewer steps"
        )
    ts = [int(t) for t in used.tolist()]
    table = alphas.tolist()  # python floats: indexing a list is far cheaper than a tensor
    prev = [int(previous(t)) for t in ts]
    levels = tuple(table[t] for t in ts)
    targets = tuple(table[q] if q >= 0 else final for q in prev)
    return levels, targets


def _timesteps(scheduler, steps) -> torch.Tensor:
    return scheduler.timesteps[steps.start : steps.stop].clone()


def _read_ddim(scheduler, steps, *, eta, use_clipped_model_output) -> Schedule:
    c = scheduler.config
    ratio = c.num_train_timesteps // scheduler.num_inference_steps
    levels, targets = _alphabar_levels(
        scheduler, steps, lambda t: t - ratio, float(scheduler.final_alpha_cumprod)
    )
    return Schedule(
        kind="ddim",
        timesteps=_timesteps(scheduler, steps),
        levels=levels,
        targets=targets,
        prediction_type=c.prediction_type,
        eta=float(eta),
        use_clipped_model_output=bool(use_clipped_model_output),
        **_x0_processing(c),
    )


def _read_ddpm(scheduler, steps, *, eta, use_clipped_model_output) -> Schedule:
    c = scheduler.config
    levels, targets = _alphabar_levels(scheduler, steps, scheduler.previous_timestep, 1.0)
    return Schedule(
        kind="ddpm",
        timesteps=_timesteps(scheduler, steps),
        levels=levels,
        targets=targets,
        prediction_type=c.prediction_type,
        variance_type=c.variance_type,
        **_x0_processing(c),
    )


def _read_sigmas(scheduler, steps) -> tuple[tuple, tuple]:
    sigmas = scheduler.sigmas.double().tolist()
    return tuple(sigmas[steps.start : steps.stop]), tuple(sigmas[steps.start + 1 : steps.stop + 1])


def _read_euler(scheduler, steps, *, eta, use_clipped_model_output, kind="euler") -> Schedule:
    levels, targets = _read_sigmas(scheduler, steps)
    return Schedule(
        kind=kind,
        timesteps=_timesteps(scheduler, steps),
        levels=levels,
        targets=targets,
        prediction_type=scheduler.config.prediction_type,
        # (Euler|EulerAncestral)DiscreteScheduler.scale_model_input: x / sqrt(sigma^2 + 1)
        input_scales=tuple(1.0 / math.sqrt(s * s + 1.0) for s in levels),
    )


def _read_flow(scheduler, steps, *, eta, use_clipped_model_output) -> Schedule:
    levels, targets = _read_sigmas(scheduler, steps)
    return Schedule(
        kind="flow",
        timesteps=_timesteps(scheduler, steps),
        levels=levels,
        targets=targets,
        prediction_type="flow_prediction",
    )


def _read_dpmpp(scheduler, steps, *, eta, use_clipped_model_output) -> Schedule:
    c = scheduler.config
    total = len(scheduler.timesteps)
    orders = []
    for g in steps:  # g: diffusers' step_index; g - steps.start: its lower_order_nums
        final = g == total - 1 and (
            c.euler_at_final
            or (c.lower_order_final and total < 15)
            or c.final_sigmas_type == "zero"
        )
        first = g == steps.start  # no history yet
        orders.append(1 if c.solver_order == 1 or first or final else 2)
    levels, targets = _read_sigmas(scheduler, steps)
    return Schedule(
        kind="dpmpp",
        timesteps=_timesteps(scheduler, steps),
        levels=levels,
        targets=targets,
        prediction_type=c.prediction_type,
        threshold=_x0_processing(c)["threshold"],
        orders=tuple(orders),
        solver_type=c.solver_type,
    )


def _read_unipc(scheduler, steps, *, eta, use_clipped_model_output) -> Schedule:
    c = scheduler.config
    total = len(scheduler.timesteps)
    orders, corrector = [], []
    for g in steps:
        order = min(c.solver_order, total - g) if c.lower_order_final else c.solver_order
        orders.append(min(order, g - steps.start + 1))  # warm-up: as many outputs as there are
        corrector.append(g > steps.start and (g - 1) not in c.disable_corrector)
    levels, targets = _read_sigmas(scheduler, steps)
    return Schedule(
        kind="unipc",
        timesteps=_timesteps(scheduler, steps),
        levels=levels,
        targets=targets,
        prediction_type=c.prediction_type,
        threshold=_x0_processing(c)["threshold"],
        orders=tuple(orders),
        corrector=tuple(corrector),
        solver_type=c.solver_type,
    )


def _read_plms(scheduler, steps, *, eta, use_clipped_model_output) -> Schedule:
    # diffusers' step_plms, call n of the walked timesteps T (its counter restarts at begin):
    # n = 0: T[0] -> T[0] - r;  n = 1: T[1] + r -> T[1] (from the state of call 0);
    # n >= 2: T[n] -> T[n] - r,  r = num_train_timesteps // num_inference_steps
    c = scheduler.config
    ratio = c.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.double()
    final = float(scheduler.final_alpha_cumprod)

    def alphabar(t: int) -> float:
        return float(alphas[t]) if t >= 0 else final

    levels, targets = [], []
    for n, t in enumerate(scheduler.timesteps[steps.start : steps.stop].tolist()):
        start, land = (t + ratio, t) if n == 1 else (t, t - ratio)
        levels.append(alphabar(start))
        targets.append(alphabar(land))
    return Schedule(
        kind="plms",
        timesteps=_timesteps(scheduler, steps),
        levels=tuple(levels),
        targets=tuple(targets),
        prediction_type=c.prediction_type,
    )


_READERS = {
    "DDIMScheduler": _read_ddim,
    "DDPMScheduler": _read_ddpm,
    "EulerDiscreteScheduler": _read_euler,
    "EulerAncestralDiscreteScheduler": partial(_read_euler, kind="euler_ancestral"),
    "FlowMatchEulerDiscreteScheduler": _read_flow,
    "DPMSolverMultistepScheduler": _read_dpmpp,
    "UniPCMultistepScheduler": _read_unipc,
    "PNDMScheduler": _read_plms,
}


def max_steps(scheduler, limit: int = 1000, *, exhaustive: bool = False) -> int:
    """The largest S <= ``limit`` for which ``scheduler``'s configuration gives a valid schedule
    (DDIM and PNDM with ``steps_offset=1`` and "leading" spacing stop at 999 of 1000: their
    1000-step schedule would ask for timestep 1000).

    Schedules break at the top of the range, where a timestep can pass the trained ones, so by
    default the ten smallest and the ten largest step counts are tried (well under a second
    for every sampler; the tests try every count for the families' samplers with
    ``exhaustive=True``). ``scheduler`` is left with its timesteps set to the last count tried.
    """

    def valid(steps: int) -> bool:
        try:
            scheduler.set_timesteps(steps)
            Schedule.from_diffusers(scheduler)
        except (ValueError, IndexError):
            return False
        return True

    counts = range(1, limit + 1) if exhaustive else [*range(1, 11), *range(limit - 9, limit + 1)]
    best = 0
    for steps in sorted(set(c for c in counts if c >= 1)):
        if not valid(steps):
            break
        best = steps
    return best


def noising(scheduler, schedule: Schedule) -> list[tuple[float, float]]:
    """(c0, cn) with ``add_noise(x0, n, t_i) = c0 x0 + cn n`` for each step i of ``schedule``:
    how img2img and inpainting pipelines put a clean latent at a step's noise level."""
    if schedule.kind in ("ddim", "ddpm", "plms"):  # alphabar of the timestep itself
        alphas = scheduler.alphas_cumprod.double().tolist()
        return [(a**0.5, (1 - a) ** 0.5) for a in (alphas[int(t)] for t in schedule.timesteps)]
    if schedule.kind in ("euler", "euler_ancestral"):  # x0 + sigma n
        return [(1.0, s) for s in schedule.levels]
    if schedule.kind == "flow":  # scale_noise: (1 - sigma) x0 + sigma n
        return [(1.0 - s, s) for s in schedule.levels]
    return [vp_alpha_sigma(s) for s in schedule.levels]  # DPM-Solver++, UniPC: alpha x0 + sigma n


def data_prediction(schedule: Schedule, x: torch.Tensor, e: torch.Tensor, i: int) -> torch.Tensor:
    """x0_hat of the state ``x`` at step i (as the sampler holds it, not scaled for the model)
    from the model output ``e`` there: for previews of the current prediction."""
    level = schedule.levels[i]
    kind, prediction = schedule.kind, schedule.prediction_type
    if kind in ("ddim", "ddpm", "plms"):
        return alpha_space(prediction, level)[0](x, e)
    if kind in ("euler", "euler_ancestral"):
        return sigma_space(prediction, level)(x, e)
    if kind == "flow":  # x = (1 - sigma) x0 + sigma eps, v = eps - x0
        return torch.add(x, e, alpha=-level)
    return vp_sigma_space(prediction, level)(x, e)  # dpmpp, unipc
