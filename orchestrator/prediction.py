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
flow matching: the sampler uses the predicted velocity (flow_prediction) as it is.
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
