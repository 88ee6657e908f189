"""Multistep samplers and their jumps: DPM-Solver++ (2M), UniPC (bh1/bh2) and PLMS (PNDM, no PRK).

A multistep step needs more than ``(x_i, e_i)``: the outputs of earlier steps, and for UniPC the
corrected state of step i-1, for PLMS's second call the state of the first. That memory is a
:class:`History`, always passed explicitly (no counters inside):

- ``observe(schedule, h_prev, x_i, e_i, i) -> h_i``: what the sampler knows once the model output
  at step i is in (its data prediction, UniPC's corrected state, PLMS's combined output);
- ``update(schedule, h_i, i, j) -> x_j``: the sampler's own update from step i, taken over the
  span ``tau_i -> tau_j``. With ``j = i + 1`` this is exactly diffusers' ``step()``; with
  ``j > i + 1`` it is the jump J (docs/samplers.md): the same formula with the longer step.

Notation (DPM-Solver++ paper, 2211.01095; UniPC paper, 2302.04867): the state at step i is
``x_i = alpha_i x0 + sigma_i eps`` (VP), ``s_i = sigma_i / alpha_i`` is the schedule's ``levels[i]``
and ``lambda_i = log(alpha_i / sigma_i) = -log s_i``; ``h = lambda_t - lambda_s``; ``D_i`` / ``m_i``
is the data prediction (x0) at step i. PLMS (PNDM paper, 2202.09778) works on alphabar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .prediction import alpha_space, process_x0, vp_alpha_sigma, vp_sigma_space
from .schedule import Schedule

KINDS = ("dpmpp", "unipc", "plms")
KEEP = 16  # outputs a History keeps: a jump of q steps looks back q steps a point, up to this


@dataclass(frozen=True)
class History:
    """What a sampler carries out of step i (after seeing the model output there)."""

    start: torch.Tensor  # the state the update leaving step i starts from (UniPC: corrected x_i)
    output: torch.Tensor  # what that update integrates: D_i (DPM++/UniPC), PLMS's combination
    past: tuple[torch.Tensor, ...] = ()  # outputs kept for later steps, newest first (incl. step i)


def observe(schedule: Schedule, prev: History | None, x: torch.Tensor, e: torch.Tensor, i: int):
    """The :class:`History` after step i from the one after step i-1 (``None`` at i == 0)."""
    if i > 0 and prev is None:
        raise ValueError(f"{schedule.kind} step {i} needs the history of step {i - 1}")
    return _OBSERVERS[schedule.kind](schedule, prev if i > 0 else None, x, e, i)


def update(
    schedule: Schedule,
    h: History,
    i: int,
    j: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The update from step i (history ``h``) landing where sequential step j-1 lands."""
    return _UPDATERS[schedule.kind](schedule, h, i, j, out)


def _combine(terms, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k c_k T_k over (c_k, T_k) pairs, in as few tensor passes as the terms need."""
    (c0, t0), *rest = terms
    y = torch.mul(t0, c0, out=out)
    for c, t in rest:
        if c != 0.0:
            y = y.add_(t, alpha=c)
    return y


def _x0(schedule: Schedule, x: torch.Tensor, e: torch.Tensor, i: int) -> torch.Tensor:
    x0 = vp_sigma_space(schedule.prediction_type, schedule.levels[i])(x, e)
    if schedule.threshold is None:
        return x0
    return process_x0(x0, None, schedule.threshold)


def _lam(s: float) -> float:
    """lambda = log(alpha / sigma) = -log s for a VP state at level s (s > 0)."""
    return -math.log(s)


def _keep(prev: History | None, head: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    return ((head,) + (prev.past if prev is not None else ()))[:n]


def _need(h: History, order: int, schedule: Schedule, i: int) -> None:
    if len(h.past) < order:
        raise ValueError(
            f"{schedule.kind} step {i} is of order {order}: its history must hold {order} outputs, "
            f"got {len(h.past)}"
        )


# --- DPM-Solver++ (multistep, data prediction) ------------------------------------------------


def _stride(h: History, i: int, j: int, points: int) -> int:
    """q: the jump i -> j takes its earlier points q steps apart, on the grid of its own step
    length (q = j - i), as far back as the history reaches; q = 1 for a sequential step."""
    if points == 0:
        return 1
    return max(1, min(j - i, (len(h.past) - 1) // points))


def _dpmpp_observe(schedule, prev, x, e, i):
    d = _x0(schedule, x, e, i)  # D_i = x0_hat(x_i, e_i)      (DPM-Solver++ eq. 8, data prediction)
    return History(x, d, _keep(prev, d, KEEP))


def _dpmpp_update(schedule, h, i, j, out):
    # first order (DDIM):  x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D_s
    # 2M, midpoint:        ... - 1/2 alpha_t (e^{-h} - 1) D1,        D1 = (D_s - D_{s-q}) / r0
    # 2M, heun:            ... + alpha_t ((e^{-h} - 1)/h + 1) D1,    r0 = h_0 / h
    # (DPM-Solver++ Alg. 2, diffusers' multistep_dpm_solver_second_order_update), with
    # h = lambda_t - lambda_s, h_0 = lambda_s - lambda_{s-q}; q = 1 for the step, q = j - i
    # for a jump (2M on the coarse grid of the jump's own length, docs/samplers.md)
    s, t = schedule.levels[i], schedule.targets[j - 1]
    order = schedule.orders[i]
    _need(h, order, schedule, i)
    alpha_t, sigma_t = vp_alpha_sigma(t)
    if t == 0.0:  # lambda_t = inf: e^{-h} = 0 and x_t = D_s
        if order != 1:
            raise ValueError(f"dpmpp: an order-{order} update cannot land on sigma = 0")
        return _combine([(1.0, h.output)], out)
    _, sigma_s = vp_alpha_sigma(s)
    step = _lam(t) - _lam(s)  # h
    phi = math.expm1(-step)  # e^{-h} - 1
    cx, c0 = sigma_t / sigma_s, -alpha_t * phi
    if order == 1:
        return _combine([(cx, h.start), (c0, h.output)], out)
    q = _stride(h, i, j, 1)
    r0 = (_lam(s) - _lam(schedule.levels[i - q])) / step  # h_0 / h
    if schedule.solver_type == "heun":
        c1 = alpha_t * (phi / step + 1.0) / r0
    else:  # midpoint
        c1 = -0.5 * alpha_t * phi / r0
    # x_t = cx x_s + c0 D_s + c1 (D_s - D_{s-q})
    return _combine([(cx, h.start), (c0 + c1, h.past[0]), (-c1, h.past[q])], out)


# --- UniPC (predictor UniP, corrector UniC; B(h) variants bh1 / bh2) --------------------------


def _unipc_rhos(hh: float, rks: list[float], b_h: float, order: int, corrector: bool):
    """UniPC's coefficients rho for the differences D1_k (UniPC Alg. 2 / diffusers)."""
    h_phi_k = math.expm1(hh) / hh - 1.0  # phi_2-like recursion of diffusers' b vector
    factorial, b = 1, []
    for n in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= n + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.stack([np.asarray(rks, dtype=np.float64) ** (n - 1) for n in range(1, order + 1)])
    if corrector:
        return [0.5] if order == 1 else list(np.linalg.solve(R, np.asarray(b)))
    if order == 2:
        return [0.5]
    return list(np.linalg.solve(R[:-1, :-1], np.asarray(b[:-1])))


def _unipc_b(hh: float, solver_type: str) -> float:
    return hh if solver_type == "bh1" else math.expm1(hh)  # B(h)


def _unipc_observe(schedule, prev, x, e, i):
    m = _x0(schedule, x, e, i)  # m_i: the data prediction at the (uncorrected) x_i
    keep = KEEP
    if prev is None or not schedule.corrector[i]:
        return History(x, m, _keep(prev, m, keep))
    # UniC-p (p: the order of the predictor that produced x_i), from step i-1 to step i:
    # x_i^c = (sigma_i/sigma_{i-1}) x_{i-1}^c - alpha_i h phi_1 m_{i-1}
    #         - alpha_i B(h) (sum_k rho_k D1_k + rho_p (m_i - m_{i-1}))      (UniPC eq. 11)
    p = schedule.orders[i - 1]
    _need(prev, p, schedule, i - 1)
    s0, t = schedule.levels[i - 1], schedule.levels[i]
    alpha_t, sigma_t = vp_alpha_sigma(t)
    _, sigma_s0 = vp_alpha_sigma(s0)
    step = _lam(t) - _lam(s0)
    hh = -step  # predict_x0
    b_h = _unipc_b(hh, schedule.solver_type)
    rks = [(_lam(schedule.levels[i - 1 - k]) - _lam(s0)) / step for k in range(1, p)] + [1.0]
    rhos = _unipc_rhos(hh, rks, b_h, p, corrector=True)
    m_prev = prev.past[0]
    terms = [(sigma_t / sigma_s0, prev.start), (-alpha_t * b_h * rhos[-1], m)]
    c_prev = -alpha_t * math.expm1(hh) + alpha_t * b_h * rhos[-1]
    for k in range(1, p):  # D1_k = (m_{i-1-k} - m_{i-1}) / r_k
        c = -alpha_t * b_h * rhos[k - 1] / rks[k - 1]
        terms.append((c, prev.past[k]))
        c_prev -= c
    terms.append((c_prev, m_prev))
    corrected = _combine(terms)
    return History(corrected, m, _keep(prev, m, keep))


def _unipc_update(schedule, h, i, j, out):
    # UniP-p:  x_t = (sigma_t/sigma_i) x_i^c - alpha_t h phi_1 m_i - alpha_t B(h) sum_k rho_k D1_k,
    #          D1_k = (m_{i-qk} - m_i) / r_k,  r_k = (lambda_{i-qk} - lambda_i) / h   (UniPC eq. 8)
    # q = 1 for the step, q = j - i for a jump (the coarse grid of its own length)
    s, t = schedule.levels[i], schedule.targets[j - 1]
    p = schedule.orders[i]
    _need(h, p, schedule, i)
    alpha_t, sigma_t = vp_alpha_sigma(t)
    if t == 0.0:  # lambda_t = inf: h phi_1 = -1, x_t = m_i
        if p != 1:
            raise ValueError(f"unipc: an order-{p} update cannot land on sigma = 0")
        return _combine([(1.0, h.output)], out)
    _, sigma_s = vp_alpha_sigma(s)
    step = _lam(t) - _lam(s)
    hh = -step
    terms = [(sigma_t / sigma_s, h.start)]
    c_m = -alpha_t * math.expm1(hh)
    if p > 1:
        q = _stride(h, i, j, p - 1)
        b_h = _unipc_b(hh, schedule.solver_type)
        rks = [(_lam(schedule.levels[i - q * k]) - _lam(s)) / step for k in range(1, p)] + [1.0]
        rhos = _unipc_rhos(hh, rks, b_h, p, corrector=False)
        for k in range(1, p):
            c = -alpha_t * b_h * rhos[k - 1] / rks[k - 1]
            terms.append((c, h.past[q * k]))
            c_m -= c
    terms.insert(1, (c_m, h.output))
    return _combine(terms, out)


# --- PLMS (PNDM with skip_prk_steps=True) -----------------------------------------------------

# Adams-Bashforth weights on the newest outputs (PNDM eq. 12, diffusers' step_plms)
_ADAMS_BASHFORTH = {
    1: ((1.0, 1.0),),
    2: ((3.0, 2.0), (-1.0, 2.0)),
    3: ((23.0, 12.0), (-16.0, 12.0), (5.0, 12.0)),
    4: ((55.0, 24.0), (-59.0, 24.0), (37.0, 24.0), (-9.0, 24.0)),
}


def _plms_observe(schedule, prev, x, e, i):
    if i == 0:  # first call: a plain step with e_0, remembered as the start of call 1
        return History(x, e, (e,))
    if i == 1:  # the repeated timestep: redo step 0 from x_0 with (e_0 + e_1') / 2
        return History(prev.start, (e + prev.past[0]) / 2, prev.past)
    ets = (e, *prev.past)[:KEEP]  # newest first; the repeated call's output is not kept
    return History(x, _adams_bashforth(ets[:4]), ets)


def _adams_bashforth(ets) -> torch.Tensor:
    weights = _ADAMS_BASHFORTH[len(ets)]
    return sum(w * t for (w, _), t in zip(weights, ets, strict=False)) / weights[0][1]


def _plms_update(schedule, h, i, j, out):
    # PNDM eq. 9 (DDIM, eta = 0) with the combined output as eps, from a_s to a_t:
    # x_t = sqrt(a_t/a_s) x_s - (a_t - a_s) eps / (a_s sqrt(1-a_t) + sqrt(a_s (1-a_s) a_t))
    # A jump (i >= 2) combines outputs q = j - i steps apart (PLMS on its coarse grid).
    a_s, a_t = schedule.levels[i], schedule.targets[j - 1]
    output = h.output
    if i >= 2 and j > i + 1:
        q = _stride(h, i, j, 1)
        points = min(4, 1 + (len(h.past) - 1) // q)
        output = _adams_bashforth(h.past[: q * (points - 1) + 1 : q])
    eps_map = alpha_space(schedule.prediction_type, a_s)[1]  # v -> eps at the update's start
    ce = -(a_t - a_s) / (a_s * math.sqrt(1 - a_t) + math.sqrt(a_s * (1 - a_s) * a_t))
    cx = math.sqrt(a_t / a_s)
    return _combine([(cx + ce * eps_map.cx, h.start), (ce * eps_map.ce, output)], out)


_OBSERVERS = {"dpmpp": _dpmpp_observe, "unipc": _unipc_observe, "plms": _plms_observe}
_UPDATERS = {"dpmpp": _dpmpp_update, "unipc": _unipc_update, "plms": _plms_update}
