"""The jump operator J(x_i, e_i; tau_i -> tau_j) in closed form (docs/algorithm.md, "The jump").

``jump(schedule, x, e, i, j, z)`` moves the state ``x = x_i`` straight to step ``j > i`` with the
one model output ``e = e_i``; ``step`` is the sampler's own update, exactly ``jump(i, i+1)``.
Both are pure functions: stochastic samplers take their noise ``z`` explicitly.

Levels come from :class:`~driffusion.schedule.Schedule`: ``a_i = levels[i]`` is the level step i
starts from and ``a_j = targets[j-1]`` the level the sequential step j-1 lands on.
"""

from __future__ import annotations

import math

import torch

from .prediction import Affine, alpha_space, eps_from_x0, sigma_space
from .schedule import Schedule


def step(
    schedule: Schedule, x: torch.Tensor, e: torch.Tensor, i: int, z: torch.Tensor | None = None
) -> torch.Tensor:
    """The original sampler's update ``Step(x_i, e_i; tau_i -> tau_{i+1})``."""
    return jump(schedule, x, e, i, i + 1, z)


def jump(
    schedule: Schedule,
    x: torch.Tensor,
    e: torch.Tensor,
    i: int,
    j: int,
    z: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``J(x_i, e_i; tau_i -> tau_j)`` for ``0 <= i < j <= S``; ``z`` is the noise of a stochastic
    sampler (DDPM, DDIM with eta > 0), ignored by deterministic ones. ``out`` receives the result
    when given (the engine drafts straight into its round buffer)."""
    if not 0 <= i < j <= schedule.num_steps:
        raise ValueError(f"jump needs 0 <= i < j <= {schedule.num_steps}, got i={i}, j={j}")
    result = _OPERATORS[schedule.kind](schedule, x, e, i, j, z, out)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result


def _process_x0(schedule: Schedule, x0: torch.Tensor) -> torch.Tensor:
    """Clipping or dynamic thresholding of x0, exactly as the diffusers ``step()`` does it."""
    if schedule.threshold is not None:
        return _dynamic_threshold(x0, *schedule.threshold)
    return x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)


def _dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (diffusers ``_threshold_sample``): per sample, clamp to the
    ``ratio`` quantile of |x0| (at least 1, at most ``max_value``) and divide by it."""
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


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


def _flow(schedule: Schedule, x, v, i: int, j: int, z, out=None):
    # x_j = x_i + (sigma_j - sigma_i) v_i      (rectified flow, Euler)
    return torch.add(x, v, alpha=schedule.targets[j - 1] - schedule.levels[i], out=out)


_OPERATORS = {"ddim": _ddim, "ddpm": _ddpm, "euler": _euler, "flow": _flow}
