"""Denoiser text conditions from the text encoders' outputs, as each diffusers pipeline forms them.

The one place that knows how SD 1/2, SDXL and SD3 turn prompt encodings into denoiser inputs:

- SD 1/2: the text encoder's hidden states are ``encoder_hidden_states``;
- SDXL: both encoders' penultimate states concatenated, the second encoder's pooled output as
  ``text_embeds``, ``time_ids`` = (original size, crop top-left, target size); without a negative
  prompt the unconditional row is zeros (``force_zeros_for_empty_prompt``);
- SD3 (without T5): CLIP-L ++ CLIP-G zero-padded to the joint attention width, then zero T5 tokens;
  both pooled outputs concatenated as ``pooled_projections``.

Needs only numpy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .families import FamilySpec
from .tensors import (
    DENOISER,
    ENCODER_HIDDEN_STATES,
    HIDDEN_STATES,
    POOLED,
    POOLED_PROJECTIONS,
    TEXT_EMBEDS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ROLES,
    TIME_IDS,
)

TextOutputs = Mapping[str, Mapping[str, np.ndarray]]  # {role: {output name: (B, ...) array}}


def denoiser_conditions(
    family: FamilySpec,
    text: TextOutputs,
    height: int,
    width: int,
    *,
    empty_negative_row: int | None = None,
    dtype: np.dtype | str = np.float32,
) -> dict[str, np.ndarray]:
    """The denoiser's text conditions, one row per encoded prompt (no CFG duplication here).

    ``empty_negative_row``: the row that encodes an empty negative prompt, zeroed where the family
    does that (SDXL); ``None`` when there is none. Returns contiguous arrays of ``dtype``.
    """
    if family.conditioning == "sd":
        cond = {ENCODER_HIDDEN_STATES: np.asarray(text[TEXT_ENCODER][HIDDEN_STATES])}
    elif family.conditioning == "sdxl":
        cond = _sdxl(text, height, width)
    elif family.conditioning == "sd3":
        cond = _sd3(family, text)
    else:
        raise ValueError(f"unknown conditioning {family.conditioning!r}")
    if empty_negative_row is not None and family.zero_empty_negative:
        for name in (ENCODER_HIDDEN_STATES, TEXT_EMBEDS, POOLED_PROJECTIONS):
            if name in cond:  # SDXL's force_zeros_for_empty_prompt
                cond[name] = cond[name].copy()
                cond[name][empty_negative_row] = 0
    return {name: np.ascontiguousarray(v, dtype=dtype) for name, v in cond.items()}


def _context(text: TextOutputs) -> np.ndarray:
    """Both CLIP encoders' states side by side: (B, seq, D1 + D2)."""
    return np.concatenate([np.asarray(text[r][HIDDEN_STATES]) for r in TEXT_ROLES], axis=-1)


def _sdxl(text: TextOutputs, height: int, width: int) -> dict[str, np.ndarray]:
    context = _context(text)
    # time ids: original size, crop top-left, target size, each (height, width).
    time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
    return {
        ENCODER_HIDDEN_STATES: context,
        TEXT_EMBEDS: np.asarray(text[TEXT_ENCODER_2][POOLED]),
        TIME_IDS: np.tile(time_ids, (context.shape[0], 1)),
    }


def _sd3(family: FamilySpec, text: TextOutputs) -> dict[str, np.ndarray]:
    context = _context(text)
    batch = context.shape[0]
    width_joint = family.components[DENOISER].tensor(ENCODER_HIDDEN_STATES).shape[-1]
    context = np.pad(context, ((0, 0), (0, 0), (0, width_joint - context.shape[-1])))
    t5 = np.zeros((batch, family.t5_sequence_length, width_joint), dtype=context.dtype)
    pooled = [np.asarray(text[r][POOLED]) for r in TEXT_ROLES]
    return {
        ENCODER_HIDDEN_STATES: np.concatenate([context, t5], axis=1),
        POOLED_PROJECTIONS: np.concatenate(pooled, axis=-1),
    }
