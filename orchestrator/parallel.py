"""``parallelize(pipe, ...)``: make a diffusers SD2.1 / SDXL / SD3 pipeline sample with DRiffusion.

The pipeline keeps its own ``__call__`` (prompts, guidance, VAE and all). Two thin stand-ins are put
in place of its denoiser and scheduler:

- the first denoiser call of a run is the pipeline's own (it yields the anchor output E_0); the
  stand-in records its conditioning (text embeddings, SDXL's added conditions, SD3's pooled
  projections, an inpainting UNet's mask and masked-image channels);
- at the first ``scheduler.step`` the whole run is sampled by the draft-and-refine engine; each
  round's states are evaluated with classifier-free guidance, split across the replicas of the
  denoiser (one per device, concurrently) or as one batch when a single device is given;
- the pipeline's remaining steps return the refined trajectory's states without touching the model,
  so ``callback_on_step_end`` sees each step's latents.

Timesteps: a pipeline walks a contiguous slice of ``scheduler.timesteps`` (img2img and inpainting
start at ``strength``'s tail, SDXL's ``denoising_end`` stops early). The slice is read from the
first step's timestep, the pipeline's ``num_timesteps`` and the scheduler's begin index; every
later step's timestep is checked against it. Inpainting with a 4-channel denoiser blends the known
region back after every step: the blend is applied to every state the engine lands on (drafts
included), with the mask, image latents and noise recorded from the pipeline's own preparation.
Only the pipeline classes whose loops this was checked against are accepted (``PIPELINES``).

``pipe.driffusion`` holds the settings and ``last_result`` (rounds, evaluations); ``restore()``
puts the original denoiser and scheduler back.

Adapters (LoRA): the replicas follow the pipeline's own denoiser whether adapters are loaded before
or after ``parallelize``. The stand-in passes diffusers' pipeline-level LoRA calls
(``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``unload_lora_weights``, ...) through to
the real denoiser, and with replicas on other devices each run starts by comparing a version key
of that denoiser (see ``state_key``) with the one its replicas were copied at; when it changed, the
replicas are copied again (``Controller.sync``). One device needs none of this: the batch runs on
the denoiser itself. Cost: the key walks the parameters and modules once
per run (measured on one CPU thread of a 2-core machine: about 2 ms for the tiny UNet's 208
tensors, 10 ms for an SD2.1-sized UNet's 686); a re-sync copies the whole denoiser onto each other
device, as ``parallelize`` itself does (seconds for SD-sized models), so change adapters between
batches of runs rather than before every run, or fuse them. A write the key cannot see (through
``.data``, leaving every sampled value unchanged) needs ``pipe.driffusion.sync(force=True)``.
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
from .samplers import check_supported
from .schedule import Schedule, noising

_DENOISER_NAMES = ("unet", "transformer")
# The pipelines whose denoising loops parallelize is known to reproduce (k=1 equals the pipeline)
PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
)


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

    Raises ``ValueError`` for a pipeline class outside ``PIPELINES`` or a scheduler DRiffusion
    cannot run (:func:`~driffusion.samplers.check_supported`), before patching anything.
    """
    validate(mode, k)
    pipeline_class = type(pipe).__name__
    if pipeline_class not in PIPELINES:
        raise ValueError(
            f"parallelize does not know the denoising loop of {pipeline_class}; "
            f"supported pipelines: {', '.join(PIPELINES)}"
        )
    name = next((n for n in _DENOISER_NAMES if getattr(pipe, n, None) is not None), None)
    if name is None:
        raise ValueError("pipeline has neither a unet nor a transformer: nothing to parallelize")
    if isinstance(getattr(pipe, name), DraftingDenoiser):
        pipe.driffusion.restore()
    check_supported(pipe.scheduler)
    controller = Controller(pipe, name, devices, mode, k)
    object.__setattr__(pipe, name, DraftingDenoiser(getattr(pipe, name), controller))
    object.__setattr__(pipe, "scheduler", DraftingScheduler(pipe.scheduler, controller))
    object.__setattr__(pipe, "driffusion", controller)
    if "Inpaint" in pipeline_class:
        controller.record_inpainting_inputs()
    return pipe


class Controller:
    """Settings and per-run state shared by the two stand-ins."""

    def __init__(self, pipe, denoiser_name: str, devices, mode: str, k: KSpec):
        self.pipe, self.denoiser_name, self.mode, self.k = pipe, denoiser_name, mode, k
        self.original = getattr(pipe, denoiser_name)
        self.original_scheduler = pipe.scheduler
        home = next(self.original.parameters()).device
        self.devices = [torch.device(d) for d in devices] if devices else [home]
        self.follow_home = not devices  # one batch wherever the denoiser is (pipe.to moves it)
        self.replicas: list[Any] = [None] * len(self.devices)
        self.synced_key: tuple | None = None  # state_key(original) when the replicas were made
        self.sync(force=True)
        self.pool = ThreadPoolExecutor(len(self.replicas)) if len(self.replicas) > 1 else None
        self.last_result: SampleResult | None = None
        self._reset()

    def _reset(self) -> None:
        self.conditioning: dict[str, Any] | None = None  # kwargs of the pipeline's first call
        self.first_input: torch.Tensor | None = None  # the denoiser input of that call
        self.first_timestep: float | None = None
        self.extra_channels: torch.Tensor | None = None  # inpainting UNet: mask, masked image
        self.final: torch.Tensor | None = None
        self.trajectory: dict[int, torch.Tensor] = {}  # refined state after each step, 1-based
        self.timesteps: list[float] = []  # the slice the pipeline walks, checked step by step
        self.steps_done = 0

    def sync(self, force: bool = False) -> bool:
        """Copy the pipeline's denoiser onto the other devices again if it changed since the
        replicas were made (its ``state_key``: adapters loaded, fused, unloaded, re-weighted or
        switched; parameters replaced or written) or ``force``; True if it copied. Runs at the
        start of every run; the first device's replica is the denoiser itself when it lives
        there; without other devices there is nothing to compare."""
        home = next(self.original.parameters()).device
        if self.follow_home:
            self.devices = [home]
        if all(i == 0 and device == home for i, device in enumerate(self.devices)):
            self.replicas = [self.original]
            return False
        key = state_key(self.original)
        if not force and key == self.synced_key:
            return False
        for i, device in enumerate(self.devices):
            if i == 0 and device == home:
                self.replicas[i] = self.original
            else:
                self.replicas[i] = None  # the stale copy is freed before the new one is made
                self.replicas[i] = copy.deepcopy(self.original).to(device)
        self.synced_key = key
        return True

    def restore(self) -> None:
        """Put the pipeline's own denoiser and scheduler back."""
        object.__setattr__(self.pipe, self.denoiser_name, self.original)
        object.__setattr__(self.pipe, "scheduler", self.original_scheduler)
        for method in ("prepare_latents", "prepare_mask_latents"):
            self.pipe.__dict__.pop(method, None)
        if self.pool is not None:
            self.pool.shutdown()

    def record_inpainting_inputs(self) -> None:
        """Record what an inpainting pipeline's loop blends with (4-channel denoisers): the mask
        and masked-image latents of ``prepare_mask_latents``, the image latents and noise of
        ``prepare_latents``. The pipeline's own methods run unchanged."""
        self.inpainting: dict[str, torch.Tensor] = {}
        pipe, record = self.pipe, self.inpainting
        prepare_latents, prepare_mask_latents = pipe.prepare_latents, pipe.prepare_mask_latents

        @functools.wraps(prepare_latents)
        def recording_latents(*args, **kwargs):
            out = prepare_latents(*args, **kwargs)
            if isinstance(out, tuple) and len(out) == 3:  # (latents, noise, image_latents)
                record["noise"], record["image_latents"] = out[1], out[2]
            return out

        @functools.wraps(prepare_mask_latents)
        def recording_mask(*args, **kwargs):
            out = prepare_mask_latents(*args, **kwargs)
            record["mask"] = out[0]  # (CFG: 2B rows, uncond first, as the pipeline builds it)
            return out

        object.__setattr__(pipe, "prepare_latents", recording_latents)
        object.__setattr__(pipe, "prepare_mask_latents", recording_mask)

    # -- the run -----------------------------------------------------------------------------
    def walked_slice(self, scheduler, timestep) -> tuple[int, int]:
        """(begin, end) of the slice of ``scheduler.timesteps`` this run walks, or ValueError."""
        timesteps = [float(t) for t in scheduler.timesteps]
        first = float(timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep)
        count = getattr(self.pipe, "_num_timesteps", None)
        if not isinstance(count, int) or count < 1:
            raise ValueError(
                f"{type(self.pipe).__name__} did not say how many steps it runs "
                "(num_timesteps): parallelize cannot tell which timesteps it walks"
            )
        begin_index = getattr(scheduler, "begin_index", None)
        if begin_index is not None:
            begin = int(begin_index)
        elif hasattr(scheduler, "index_for_timestep") and first in timesteps:
            begin = int(scheduler.index_for_timestep(timestep.flatten()[0]))
        elif first in timesteps and timesteps.count(first) == 1:
            begin = timesteps.index(first)
        else:  # a repeated timestep (PNDM): the pipeline walks the tail of the list
            begin = len(timesteps) - count
        end = begin + count
        if not (0 <= begin < end <= len(timesteps) and timesteps[begin] == first):
            raise ValueError(
                f"{type(self.pipe).__name__} stepped first at timestep {first} and runs {count} "
                f"steps, which is no slice of the scheduler's {len(timesteps)} timesteps: "
                "parallelize does not understand this timestep handling"
            )
        if self.first_timestep is not None and self.first_timestep != first:
            raise ValueError(
                f"the denoiser was first called at timestep {self.first_timestep} but the first "
                f"scheduler step is at {first}: parallelize does not understand this pipeline"
            )
        return begin, end

    def run(self, anchor_output, timestep, sample, eta, generator) -> torch.Tensor:
        self.sync()  # adapters or weights changed since the last run: replicas follow
        scheduler = self.original_scheduler
        begin, end = self.walked_slice(scheduler, timestep)
        schedule = Schedule.from_diffusers(scheduler, eta=eta or 0.0, begin=begin, end=end)
        self.timesteps = [float(t) for t in schedule.timesteps]
        channels = sample.shape[1]
        if self.first_input is not None and self.first_input.shape[1] > channels:
            self.extra_channels = self.first_input[:, channels:]  # (B or 2B, extra, h, w)
        post_step = self._inpainting_blend(schedule, sample)
        noise = StepNoise(sample, generator) if schedule.stochastic else None
        self.trajectory = {}
        engine = draft_and_refine(
            sample,
            schedule,
            self.mode,
            self.k,
            noise,
            post_step=post_step,
            on_refined=lambda i, x: self.trajectory.__setitem__(i, x.clone()),
        )
        # round 0 is the pipeline's own call: its output is the anchor output
        self.last_result = drive(
            engine, lambda r: anchor_output if r.index == 0 else self.evaluate(r)
        )
        return self.last_result.sample

    def _inpainting_blend(self, schedule: Schedule, sample: torch.Tensor):
        """The 4-channel inpainting loop's per-step blend as an engine ``post_step``:
        x <- (1 - m) * noised(image_latents, step i) + m * x, the image noised with the
        pipeline's own noise to the level of step i as the scheduler's ``add_noise`` does."""
        record = getattr(self, "inpainting", None)
        if record is None or self.extra_channels is not None:  # not inpainting, or 9 channels
            return None
        if not {"mask", "noise", "image_latents"} <= set(record):
            raise ValueError(
                f"{type(self.pipe).__name__}: the inpainting mask, image latents or noise were not "
                "prepared the way parallelize expects"
            )
        mask = record["mask"]
        if mask.shape[0] != sample.shape[0]:  # CFG doubled it: the uncond half is the mask
            mask = mask.chunk(2)[0]
        image, noise = record["image_latents"], record["noise"]
        coefficients = noising(self.original_scheduler, schedule)

        def blend(x: torch.Tensor, i: int) -> torch.Tensor:
            c0, cn = coefficients[i]
            known = image * c0 + noise * cn
            return (1 - mask) * known + mask * x

        return blend

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
        if self.extra_channels is not None:  # inpainting UNet: [state, mask, masked image]
            extra = self.extra_channels.to(device)
            x = torch.cat([x, extra.repeat(states, *[1] * (extra.ndim - 1))], dim=1)
        kwargs = _tile(self.conditioning, states, device)
        out = _call(replica, self.denoiser_name, x, t, kwargs)
        if not cfg:
            return out
        rescale = float(getattr(pipe, "guidance_rescale", 0.0) or 0.0)
        return combine_cfg(out, states, pipe.guidance_scale, rescale)


def state_key(module: torch.nn.Module) -> tuple:
    """A cheap version key of ``module``'s weights and adapters, equal between two calls unless
    something changed in between: per parameter and buffer its name, identity, in-place version
    counter, storage address and the bits of three sampled elements (first, middle, last but at
    most one: PEFT's unsafe merge, ``fuse_lora``'s default, writes through ``.data``, which no
    version counter sees); per adapter layer (PEFT's ``BaseTunerLayer``) its active, merged and
    disabled adapters and their scales. Cost: a walk over the parameters and modules and one small
    gather per device and dtype."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    identity = []
    samples: dict[tuple, list[torch.Tensor]] = {}
    for name, t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference-mode tensors have no version counter
            version = -1
        identity.append((name, id(t), version, t.data_ptr(), tuple(t.shape), t.dtype, t.device))
        n = t.numel()
        if n:  # elements 0, (n-1)//2 and 2*((n-1)//2) as one strided view
            view = t.detach().reshape(-1).as_strided((3,), ((n - 1) // 2,))
            samples.setdefault((t.device, t.dtype), []).append(view)
    with torch.no_grad():
        sampled = tuple(
            (str(device), str(dtype), torch.cat(views).view(torch.uint8).cpu().numpy().tobytes())
            for (device, dtype), views in samples.items()
        )
    adapters = []
    for name, m in module.named_modules():
        if hasattr(m, "merged_adapters") and hasattr(m, "active_adapters"):  # BaseTunerLayer
            scaling = getattr(m, "scaling", {})
            adapters.append(
                (
                    name,
                    tuple(m.active_adapters),
                    tuple(m.merged_adapters),
                    bool(getattr(m, "disable_adapters", False)),
                    tuple(sorted(scaling.items())) if isinstance(scaling, dict) else (),
                )
            )
    return tuple(identity), sampled, tuple(adapters)


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

    @property
    def __class__(self):  # the class diffusers' checks see
        """The real denoiser's class: diffusers' pipeline-level LoRA methods act only on
        components that are ``issubclass(model.__class__, ModelMixin)``, and reach the real
        denoiser through this stand-in's attribute forwarding. ``type()`` still tells them
        apart."""
        inner = self.__dict__.get("_modules", {}).get("inner")
        return DraftingDenoiser if inner is None else inner.__class__

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
        c.first_input = sample
        c.first_timestep = float(
            timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
        )
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
            c.final = c.run(model_output, timestep, sample, eta, generator)
        t = float(timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep)
        expected = c.timesteps[c.steps_done] if c.steps_done < len(c.timesteps) else None
        if t != expected:
            c._reset()
            raise ValueError(
                f"the pipeline stepped at timestep {t} where {expected} was expected (step "
                f"{c.steps_done}): parallelize does not understand this timestep handling"
            )
        c.steps_done += 1
        # the state after this step, so that callback_on_step_end sees each step's latents
        out = c.trajectory.get(c.steps_done, c.final).to(sample.dtype)
        if c.steps_done == len(c.timesteps):
            c._reset()
        if not return_dict:
            return (out,)
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        return SchedulerOutput(prev_sample=out)
