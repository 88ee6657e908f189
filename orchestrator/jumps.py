"""The jump operator J(x_i, e_i; tau_i -> tau_j) in closed form (docs/algorithm.md, "The jump").

``jump(schedule, x, e, i, j, z)`` moves the state ``x = x_i`` straight to step ``j > i`` with the
one model output ``e = e_i``; ``step`` is the sampler's own update, exactly ``jump(i, i+1)``.
Both are pure functions: stochastic samplers take their noise ``z`` explicitly, multistep samplers
(DPM-Solver++, UniPC, PLMS; :mod:`~driffusion.multistep`) the :class:`History` of step i-1.

Every step is split in two pure functions, which the engine calls separately so that a block's
drafts share one ``observe``: ``observe`` takes in the model output at step i (a no-op for the
one-step samplers here), ``advance`` moves from step i to step j.

Levels come from :class:`~driffusion.schedule.Schedule`: ``a_i = levels[i]`` is the level step i
starts from and ``a_j = targets[j-1]`` the level the sequential step j-1 lands on.
"""

from __future__ import annotations

import math

import torch

from . import multistep
from .multistep import History
from .prediction import Affine, alpha_space, eps_from_x0, process_x0, sigma_space
from .schedule import Schedule


def step(
    schedule: Schedule,
    x: torch.Tensor,
    e: torch.Tensor,
    i: int,
    z: torch.Tensor | None = None,
    history: History | None = None,
) -> torch.Tensor:
    """The original sampler's update ``Step(x_i, e_i; tau_i -> tau_{i+1})``."""
    return jump(schedule, x, e, i, i + 1, z, history=history)


def jump(
    schedule: Schedule,
    x: torch.Tensor,
    e: torch.Tensor,
    i: int,
    j: int,
    z: torch.Tensor | None = None,
    *,
    history: History | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``J(x_i, e_i; tau_i -> tau_j)`` for ``0 <= i < j <= S``; ``z`` is the noise of a stochastic
    sampler (DDPM, DDIM with eta > 0, Euler ancestral), ignored by deterministic ones; ``history``
    is what a multistep sampler carried out of step i-1 (``observe``), ignored by the others.
    ``out`` receives the result when given (the engine drafts straight into its round buffer)."""
    return advance(schedule, observe(schedule, history, x, e, i), i, j, z, out=out)


def jump_noise(schedule: Schedule, noise, i: int, j: int):
    """The noise a jump i -> j takes, from ``noise(m) -> z_m`` (the sequential steps' noise):
    z_{j-1} (DDPM, DDIM with eta > 0: the last step's), all of z_i .. z_{j-1} (Euler ancestral:
    one per step jumped over), ``None`` for deterministic samplers."""
    if not schedule.stochastic:
        return None
    if schedule.kind == "euler_ancestral":
        return tuple(noise(m) for m in range(i, j))
    return noise(j - 1)


def observe(
    schedule: Schedule, history: History | None, x: torch.Tensor, e: torch.Tensor, i: int
) -> History:
    """What the sampler carries out of step i, given the model output ``e`` at the state ``x``
    and the :class:`History` of step i-1 (multistep samplers only; ``None`` at i == 0)."""
    if schedule.kind in multistep.KINDS:
        return multistep.observe(schedule, history, x, e, i)
    return History(x, e)


def advance(
    schedule: Schedule,
    history: History,
    i: int,
    j: int,
    z: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampler's update from step i (its :func:`observe` result) to step j, ``j = i + 1``
    being the sequential step and ``j > i + 1`` the jump."""
    if not 0 <= i < j <= schedule.num_steps:
        raise ValueError(f"jump needs 0 <= i < j <= {schedule.num_steps}, got i={i}, j={j}")
    if schedule.kind in multistep.KINDS:
        result = multistep.update(schedule, history, i, j, out)
    else:
        result = _OPERATORS[schedule.kind](schedule, history.start, history.output, i, j, z, out)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def _process_x0(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    return process_x0(x0, schedule.clip_sample_range, schedule.threshold)


def _needs_x0(schedule: Schedule) -> bool:
    return schedule.clip_sample_range is not None or schedule.threshold is not None


def _require_noise(z: torch.Tensor | None, kind: str) -> torch.Tensor:
    if z is None:
        raise ValueError(f"{kind} jump is stochastic here: pass its noise z")
    return z


def _ddim(schedule: Schedule, x, e, i: int, j: int, z, out=None):
    # x_j = sqrt(a_j) x0 + sqrt(1 - a_j - sigma^2) eps + sigma z, with
    # sigma = eta sqrt((1 - a_j)/(1 - a_i)) sqrt(1 - a_i/a_j)      (DDIM paper, eq. 12 and 16)
    a_i, a_j = schedule.levels[i], schedule.targets[j - 1]
    sigma = schedule.eta * math.sqrt((1 - a_j) / (1 - a_i)) * math.sqrt(1 - a_i / a_j)
    c0, ce = math.sqrt(a_j), math.sqrt(max(1 - a_j - sigma * sigma, 0.0))
    x0_map, eps_map = alpha_space(schedule.prediction_type, a_i)
    if _needs_x0(schedule):
        x0 = _process_x0(schedule, x0_map(x, e))
        eps = eps_from_x0(x, x0, a_i) if schedule.use_clipped_model_output else eps_map(x, e)
        out = torch.add(c0 * x0, eps, alpha=ce, out=out)
    else:  # everything is linear in (x, e): fold into two coefficients
        out = Affine(c0 * x0_map.cx + ce * eps_map.cx, c0 * x0_map.ce + ce * eps_map.ce)(x, e, out)
    if sigma > 0:
        out = out.add_(_require_noise(z, "DDIM (eta > 0)"), alpha=sigma)
    return out


def _ddpm(schedule: Schedule, x, e, i: int, j: int, z, out=None):
    # Gaussian posterior q(x_j | x_i, x0) with a_ij = a_i / a_j (DDPM eq. 6-7, k-step analogue):
    # mean = sqrt(a_j)(1 - a_ij)/(1 - a_i) x0 + sqrt(a_ij)(1 - a_j)/(1 - a_i) x_i
    # var  = (1 - a_j)/(1 - a_i) (1 - a_ij)   (fixed_small; fixed_large uses 1 - a_ij)
    a_i, a_j = schedule.levels[i], schedule.targets[j - 1]
    a_ij = a_i / a_j
    c0 = math.sqrt(a_j) * (1 - a_ij) / (1 - a_i)
    cx = math.sqrt(a_ij) * (1 - a_j) / (1 - a_i)
    x0_map, _ = alpha_space(schedule.prediction_type, a_i)
    if _needs_x0(schedule):
        out = torch.add(c0 * _process_x0(schedule, x0_map(x, e)), x, alpha=cx, out=out)
    else:
        out = Affine(c0 * x0_map.cx + cx, c0 * x0_map.ce)(x, e, out)
    if float(schedule.timesteps[i]) > 0:  # diffusers adds no noise at t == 0
        if schedule.variance_type == "fixed_large":
            var = 1 - a_ij
        else:
            var = max((1 - a_j) / (1 - a_i) * (1 - a_ij), 1e-20)
        out = out.add_(_require_noise(z, "DDPM"), alpha=math.sqrt(var))
    return out


def _euler(schedule: Schedule, x, e, i: int, j: int, z, out=None):
    # d = (x_i - x0)/sigma_i ;  x_j = x_i + (sigma_j - sigma_i) d      (Karras et al. 2022, Alg. 1)
    s_i, s_j = schedule.levels[i], schedule.targets[j - 1]
    x0 = sigma_space(schedule.prediction_type, s_i)
    dt = s_j - s_i
    return Affine(1 + dt * (1 - x0.cx) / s_i, -dt * x0.ce / s_i)(x, e, out)


def _euler_ancestral(schedule: Schedule, x, e, i: int, j: int, z, out=None):
    # One step l from s_l to s_{l+1} (k-diffusion sample_euler_ancestral), d = (x_l - x0)/s_l:
    #   sigma_up = sqrt(s_{l+1}^2 (s_l^2 - s_{l+1}^2) / s_l^2),
    #   sigma_down = sqrt(s_{l+1}^2 - sigma_up^2),
    #   x_{l+1} = x_l + (sigma_down - s_l) d + sigma_up z_l
    #           = x0 + (sigma_down / s_l)(x_l - x0) + sigma_up z_l
    # The jump i -> j runs these steps with x0 frozen at x_i's estimate, each with its own z_l:
    #   x_j = x0 + c (x_i - x0) + sum_l w_l z_l,  c = prod_l sigma_down_l / s_l,
    #   w_l = sigma_up_l prod_{m > l} sigma_down_m / s_m
    # so a draft carries the very noise the refined steps add (z_i .. z_{j-1}).
    zs = (z,) if isinstance(z, torch.Tensor) or z is None else tuple(z)
    if len(zs) != j - i or any(n is None for n in zs):
        raise ValueError(
            f"Euler ancestral jump {i} -> {j} is stochastic: pass the {j - i} step noises "
            f"z_{i} .. z_{j - 1}"
        )
    c, weights = 1.0, []
    for m in range(i, j):
        s_from, s_to = schedule.levels[m], schedule.targets[m]
        sigma_up = math.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
        ratio = math.sqrt(max(s_to * s_to - sigma_up * sigma_up, 0.0)) / s_from  # sigma_down / s
        weights = [w * ratio for w in weights] + [sigma_up]
        c *= ratio
    x0 = sigma_space(schedule.prediction_type, schedule.levels[i])
    out = Affine(c + (1 - c) * x0.cx, (1 - c) * x0.ce)(x, e, out)
    for w, n in zip(weights, zs, strict=True):
        out = out.add_(n, alpha=w)
    return out


def _flow(schedule: Schedule, x, v, i: int, j: int, z, out=None):
    # x_j = x_i + (sigma_j - sigma_i) v_i      (rectified flow, Euler)
    return torch.add(x, v, alpha=schedule.targets[j - 1] - schedule.levels[i], out=out)


_OPERATORS = {
    "ddim": _ddim,
    "ddpm": _ddpm,
    "euler": _euler,
    "euler_ancestral": _euler_ancestral,
    "flow": _flow,
}
