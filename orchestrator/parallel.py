"""``parallelize(pipe, ...)``: make a diffusers SD2.1 / SDXL / SD3 pipeline sample with DRiffusion.

The pipeline keeps its own ``__call__`` (prompts, guidance, VAE and all). Two thin stand-ins are put
in place of its denoiser and scheduler:

- the first denoiser call of a run is the pipeline's own (it yields the anchor output E_0); the
  stand-in records its conditioning (text embeddings, SDXL's added conditions, SD3's pooled
  projections);
- at the first ``scheduler.step`` the whole run is sampled by the draft-and-refine engine; each
  round's states are evaluated with classifier-free guidance, split across the replicas of the
  denoiser (one per device, concurrently) or as one batch when a single device is given;
- the pipeline's remaining steps replay the final state without touching the model.

``pipe.driffusion`` holds the settings and ``last_result`` (rounds, evaluations); ``restore()``
puts the original denoiser and scheduler back.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .engine import KSpec, Round, SampleResult, StepNoise, draft_and_refine, drive, validate
from .guidance import combine_cfg, rows, shards, with_cfg
from .schedule import Schedule

_DENOISER_NAMES = ("unet", "transformer")


def parallelize(
    pipe,
    devices: Sequence[str | torch.device] | None = None,
    mode: str = "aggressive",
    k: KSpec = 4,
):
    """Patch ``pipe`` in place so that ``pipe(...)`` samples with DRiffusion; returns ``pipe``.

    ``devices``: one torch device per denoiser replica; a round's states are spread over them and
    evaluated concurrently. ``None`` or a single device evaluates each round as one batch on the
    pipeline's own device.
    """
    validate(mode, k)
    name = next((n for n in _DENOISER_NAMES if getattr(pipe, n, None) is not None), None)
    if name is None:
        raise ValueError("pipeline has neither a unet nor a transformer: nothing to parallelize")
    if isinstance(getattr(pipe, name), DraftingDenoiser):
        pipe.driffusion.restore()
    controller = Controller(pipe, name, devices, mode, k)
    object.__setattr__(pipe, name, DraftingDenoiser(getattr(pipe, name), controller))
    object.__setattr__(pipe, "scheduler", DraftingScheduler(pipe.scheduler, controller))
    object.__setattr__(pipe, "driffusion", controller)
    return pipe


class Controller:
    """Settings and per-run state shared by the two stand-ins."""

    def __init__(self, pipe, denoiser_name: str, devices, mode: str, k: KSpec):
        self.pipe, self.denoiser_name, self.mode, self.k = pipe, denoiser_name, mode, k
        self.original = getattr(pipe, denoiser_name)
        self.original_scheduler = pipe.scheduler
        home = next(self.original.parameters()).device
        self.devices = [torch.device(d) for d in devices] if devices else [home]
        self.replicas = [
            self.original if d == home and i == 0 else copy.deepcopy(self.original).to(d)
            for i, d in enumerate(self.devices)
        ]
        self.pool = ThreadPoolExecutor(len(self.replicas)) if len(self.replicas) > 1 else None
        self.last_result: SampleResult | None = None
        self._reset()

    def _reset(self) -> None:
        self.conditioning: dict[str, Any] | None = None  # kwargs of the pipeline's first call
        self.final: torch.Tensor | None = None
        self.steps_left = 0

    def restore(self) -> None:
        """Put the pipeline's own denoiser and scheduler back."""
        object.__setattr__(self.pipe, self.denoiser_name, self.original)
        object.__setattr__(self.pipe, "scheduler", self.original_scheduler)
        if self.pool is not None:
            self.pool.shutdown()

    # -- the run -----------------------------------------------------------------------------
    def run(self, anchor_output, sample, eta, generator) -> torch.Tensor:
        scheduler = self.original_scheduler
        schedule = Schedule.from_diffusers(scheduler, eta=eta or 0.0)
        noise = StepNoise(sample, generator) if schedule.stochastic else None
        engine = draft_and_refine(sample, schedule, self.mode, self.k, noise)
        # round 0 is the pipeline's own call: its output is the anchor output
        self.last_result = drive(
            engine, lambda r: anchor_output if r.index == 0 else self.evaluate(r)
        )
        return self.last_result.sample

    def evaluate(self, r: Round) -> torch.Tensor:
        """Guided model outputs for all states of a round, spread over the replicas."""
        states = len(r.steps)
        per_state = r.x.shape[0] // states
        parts = shards(states, len(self.replicas))  # fewer states than replicas: some idle

        def run_shard(replica, s: slice) -> torch.Tensor:
            xs, ts = r.x[rows(s, per_state)], r.t[rows(s, per_state)]
            return self._guided(replica, xs, ts, s.stop - s.start)

        if self.pool is None or len(parts) == 1:
            return run_shard(self.replicas[0], parts[0])
        futures = [
            self.pool.submit(run_shard, rep, s)
            for rep, s in zip(self.replicas, parts, strict=False)
        ]
        return torch.cat([f.result().to(r.x.device) for f in futures])

    def _guided(self, replica, x: torch.Tensor, t: torch.Tensor, states: int) -> torch.Tensor:
        """One batched call for the states of ``x`` (B rows each); CFG doubles every state."""
        pipe, device = self.pipe, next(replica.parameters()).device
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        x, t = x.to(device), t.to(device)
        if cfg:  # per state [x, x]: uncond rows first, as the pipeline does
            x, t = with_cfg(x, states), with_cfg(t, states)
        kwargs = _tile(self.conditioning, states, device)
        out = _call(replica, self.denoiser_name, x, t, kwargs)
        if not cfg:
            return out
        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
        return combine_cfg(out, states, pipe.guidance_scale, rescale)


def _call(module, name: str, sample, timestep, kwargs):
    if name == "transformer":
        return module(hidden_states=sample, timestep=timestep, **kwargs)[0]
    return module(sample, timestep, **kwargs)[0]


def _tile(value, states: int, device):
    """Repeat every batched conditioning tensor once per state (dicts are walked)."""
    if isinstance(value, torch.Tensor):
        return value.to(device).repeat(states, *([1] * (value.ndim - 1))) if value.ndim else value
    if isinstance(value, dict):
        return {key: _tile(v, states, device) for key, v in value.items()}
    return value


class DraftingDenoiser(torch.nn.Module):
    """Stands in for ``pipe.unet`` / ``pipe.transformer``; attribute reads go to the real model."""

    def __init__(self, inner: torch.nn.Module, controller: Controller):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "controller", controller)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        c = self.controller
        sample = args[0] if args else kwargs.pop("sample", kwargs.pop("hidden_states", None))
        if c.final is not None:  # the run is done: the pipeline's remaining calls are replays
            return (torch.zeros_like(sample),)
        kwargs = dict(kwargs)
        timestep = args[1] if len(args) > 1 else kwargs.pop("timestep")
        kwargs.pop("hidden_states", None)
        kwargs.pop("sample", None)
        kwargs["return_dict"] = False
        c.conditioning = kwargs
        return (_call(self.inner, c.denoiser_name, sample, timestep, kwargs),)


class DraftingScheduler:
    """Stands in for ``pipe.scheduler``: the first ``step`` runs DRiffusion, later ones replay."""

    def __init__(self, inner, controller: Controller):
        self.__dict__["inner"], self.__dict__["controller"] = inner, controller

        @functools.wraps(inner.set_timesteps)
        def set_timesteps(*args, **kwargs):
            controller._reset()
            return inner.set_timesteps(*args, **kwargs)

        self.__dict__["set_timesteps"] = set_timesteps

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.__dict__["inner"], name, value)

    def step(
        self,
        model_output,
        timestep,
        sample,
        eta: float = 0.0,
        generator=None,
        return_dict: bool = True,
        **kwargs,
    ):
        c = self.controller
        if c.final is None:
            if c.conditioning is None:
                raise RuntimeError("scheduler.step called before the denoiser: unexpected pipeline")
            c.final = c.run(model_output, sample, eta, generator)
            c.steps_left = len(self.inner.timesteps)
        c.steps_left -= 1
        out = c.final.to(sample.dtype)
        if c.steps_left <= 0:
            c._reset()
        if not return_dict:
            return (out,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=out)
