"""Prediction-type conversion: the ONE place that turns a raw model output into x0 / eps.

Every conversion here is linear in the state ``x`` and the model output ``e``, so it is returned as
an :class:`Affine` pair of scalar coefficients; the jump operators fold them into their own
coefficients and touch each tensor once or twice (this keeps host time per round low).

Notation (docs/algorithm.md): ``a`` is alphabar of the state, ``sigma`` the Euler/flow noise level.

alphabar space (DDIM, DDPM):
- epsilon:       x0 = (x - sqrt(1-a) e) / sqrt(a);    eps = e
- v_prediction:  x0 = sqrt(a) x - sqrt(1-a) v;        eps = sqrt(a) v + sqrt(1-a) x
- sample:        x0 = e;                              eps = (x - sqrt(a) e) / sqrt(1-a)
sigma space (Euler; the model saw x / sqrt(sigma^2 + 1)):
- epsilon:       x0 = x - sigma e
- v_prediction:  x0 = x / (sigma^2 + 1) - e sigma / sqrt(sigma^2 + 1)
- sample:        x0 = e
VP states indexed by sigma (DPM-Solver++, UniPC): x = alpha_t x0 + sigma_t eps with
alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t (so sigma = sigma_t / alpha_t), i.e.
alphabar space at a = alpha_t^2; ``vp_alpha_sigma`` gives (alpha_t, sigma_t).
flow matching: the sampler uses the predicted velocity (flow_prediction) as it is.

x0 processing (clipping, dynamic thresholding) also lives here: :func:`process_x0`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALPHA_SPACE_TYPES = ("epsilon", "v_prediction", "sample")
SIGMA_SPACE_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_TYPES = ("flow_prediction",)


@dataclass(frozen=True)
class Affine:
    """``cx * x + ce * e``: a quantity that is linear in the state and the model output."""

    cx: float
    ce: float

    def __call__(
        self, x: torch.Tensor, e: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.cx == 1.0:
            return torch.add(x, e, alpha=self.ce, out=out)
        y = torch.mul(x, self.cx, out=out)
        return y.add_(e, alpha=self.ce) if self.ce != 0.0 else y


def _check(prediction_type: str, allowed: tuple[str, ...], space: str) -> None:
    if prediction_type not in allowed:
        raise ValueError(
            f"prediction_type must be one of {', '.join(allowed)} for a {space} scheduler, "
            f"got {prediction_type!r}"
        )


def alpha_space(prediction_type: str, a: float) -> tuple[Affine, Affine]:
    """(x0_hat, eps_hat) as affine maps of (x, e) for a state at alphabar ``a``."""
    _check(prediction_type, ALPHA_SPACE_TYPES, "DDIM/DDPM")
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        return Affine(1.0 / sa, -sb / sa), Affine(0.0, 1.0)
    if prediction_type == "v_prediction":
        return Affine(sa, -sb), Affine(sb, sa)
    return Affine(0.0, 1.0), Affine(1.0 / sb, -sa / sb)  # sample


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, a: float) -> torch.Tensor:
    """eps = (x - sqrt(a) x0) / sqrt(1 - a): eps recomputed from a (clipped) x0, as DDIM's
    ``use_clipped_model_output`` does."""
    return (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)


def vp_alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the VP state at noise level ``sigma`` = sigma_t / alpha_t (diffusers'
    ``_sigma_to_alpha_sigma_t``)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def vp_sigma_space(prediction_type: str, sigma: float) -> Affine:
    """x0_hat as an affine map of (x, e) for a VP state ``x = alpha_t x0 + sigma_t eps`` at noise
    level ``sigma`` (DPM-Solver++, UniPC; the model sees ``x`` unscaled)."""
    _check(prediction_type, ALPHA_SPACE_TYPES, "DPM-Solver/UniPC")
    alpha, sigma_t = vp_alpha_sigma(sigma)
    if prediction_type == "epsilon":  # x0 = (x - sigma_t e) / alpha_t
        return Affine(1.0 / alpha, -sigma)
    if prediction_type == "v_prediction":  # x0 = alpha_t x - sigma_t v
        return Affine(alpha, -sigma_t)
    return Affine(0.0, 1.0)  # sample


def process_x0(
    x0: torch.Tensor,
    clip_sample_range: float | None = None,
    threshold: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Clipping or dynamic thresholding of x0, exactly as the diffusers ``step()`` does it."""
    if threshold is not None:
        return dynamic_threshold(x0, *threshold)
    if clip_sample_range is not None:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (diffusers ``_threshold_sample``): per sample, clamp to the
    ``ratio`` quantile of |x0| (at least 1, at most ``max_value``) and divide by it."""
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def sigma_space(prediction_type: str, sigma: float) -> Affine:
    """x0_hat as an affine map of (x, e) for a state at noise level ``sigma`` (Euler, EDM style;
    ``x`` is the unscaled state, the model saw ``x / sqrt(sigma^2 + 1)``)."""
    _check(prediction_type, SIGMA_SPACE_TYPES, "Euler")
    if prediction_type == "epsilon":
        return Affine(1.0, -sigma)
    if prediction_type == "v_prediction":
        s2 = sigma * sigma + 1.0
        return Affine(1.0 / s2, -sigma / math.sqrt(s2))
    return Affine(0.0, 1.0)  # sample


def check_flow(prediction_type: str) -> None:
    """Flow matching models predict the velocity ``v = eps - x0``; nothing else is accepted."""
    _check(prediction_type, FLOW_TYPES, "flow-matching")
