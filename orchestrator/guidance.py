"""A round's states on their way to the denoiser and back: sharding and classifier-free guidance.

One routine for every caller (the served orchestrator over Triton, ``parallelize`` over torch
replicas). Row layout, as diffusers pipelines use it: a round of ``m`` states of ``B`` rows each is
``(m*B, ...)``; with guidance every state goes out as its ``2B`` rows, the unconditional rows first,
and comes back combined as ``uncond + scale * (cond - uncond)``.
"""

from __future__ import annotations

import torch


def shards(states: int, parts: int) -> list[slice]:
    """``states`` split into ``min(states, parts)`` contiguous, non-empty groups whose sizes differ
    by at most one (larger groups first, as ``numpy.array_split``)."""
    if states < 1 or parts < 1:
        raise ValueError(f"states and parts must be >= 1, got states={states}, parts={parts}")
    parts = min(states, parts)
    size, extra = divmod(states, parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + size + (p < extra)
        out.append(slice(start, stop))
        start = stop
    return out


def rows(s: slice, per_state: int) -> slice:
    """The rows of states ``s`` when every state has ``per_state`` rows."""
    return slice(s.start * per_state, s.stop * per_state)


def with_cfg(x: torch.Tensor, states: int) -> torch.Tensor:
    """(m*B, ...) -> (m*2B, ...): each state's B rows twice (unconditional rows first)."""
    per = x.reshape(states, 1, x.shape[0] // states, *x.shape[1:])
    return per.expand(states, 2, *per.shape[2:]).reshape(-1, *x.shape[1:])


def combine_cfg(out: torch.Tensor, states: int, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """(m*2B, ...) -> (m*B, ...): ``uncond + scale * (cond - uncond)`` per state.

    ``rescale`` > 0 applies guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", eq. 15-16; diffusers' ``rescale_noise_cfg``) row by row.
    """
    pairs = out.reshape(states, 2, out.shape[0] // (2 * states), *out.shape[1:])
    uncond, cond = pairs[:, 0], pairs[:, 1]
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(2, guided.ndim))  # per row: all but (state, row)
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        guided = rescale * (guided * (std_cond / std_guided)) + (1 - rescale) * guided
    return guided.reshape(-1, *out.shape[1:])
