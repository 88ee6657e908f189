"""The host side of a served pipeline: prompt -> text encoders -> DRiffusion rounds -> VAE -> image.

Plain Python, tested without Triton: every model call goes through an injected async function
``infer(model, inputs, outputs) -> {name: array}``. The Triton BLS model (``model.py``) passes one
that fires ``pb_utils.InferenceRequest.async_exec``; tests can pass ONNX Runtime sessions.

Per round the drafts are sent either as one request per denoiser instance ("instances": the
paper's fan-out; with more drafts than instances each request carries several) or as one batched
request ("batch"). Classifier-free guidance doubles every state into an (uncond, cond) pair and is
combined here, on the host.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import api
from .conditioning import denoiser_conditions
from .engine import Round, StepNoise, count_rounds, draft_and_refine, drive, drive_async, tapered
from .families import FamilySpec
from .guidance import combine_cfg, rows, shards, with_cfg
from .routing import DenoiserRouter
from .schedule import Schedule, data_prediction, noising
from .tensors import (
    DENOISER,
    IMAGE,
    INPUT_IDS,
    LATENT,
    LATENT_MEAN,
    LATENT_STD,
    MODEL_OUTPUT,
    PIXELS,
    SAMPLE,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TIMESTEP,
    VAE_DECODER,
    VAE_ENCODER,
)

Infer = Callable[[str, Mapping[str, np.ndarray], tuple[str, ...]], Awaitable[dict[str, np.ndarray]]]
SETTINGS_FILE = "settings.json"
# Waits before the retries of a model call that failed in one instance (about 4 s in all).
RETRY_DELAYS_S = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
TOKENIZER_DIRS = {TEXT_ENCODER: "tokenizer", TEXT_ENCODER_2: "tokenizer_2"}


def k_spec(k: int, schedule: str):
    """The block sizes a request's ``k`` and ``k_schedule`` name (see ``api.K_SCHEDULE``)."""
    if schedule == "tapered":  # best on the exact Gaussian mixture (BENCHMARKS.md, core)
        return tapered(k, max(k - 1, 1))
    if schedule == "ramp":  # best on the trained digits model (BENCHMARKS.md, quality)
        return tapered(max(k - 1, 1), k + api.RAMP_EXTRA, switch=0.2)
    return k


class RequestCancelled(Exception):
    """The client cancelled the request (gRPC cancellation or deadline) between two rounds."""


class DeadlineExceeded(Exception):
    """The request ran past its deadline (the server's ``request_timeout_s`` or the client's
    own timeout); its work stopped at the next round or model call."""


class ModelCallError(RuntimeError):
    """A model the orchestrator called failed; the message names the model. ``retryable``: the
    failure belongs to one instance (it crashed or hung), so another instance may succeed."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ServiceSettings:
    """What the orchestrator of one repository needs, saved as ``settings.json`` beside it."""

    family: FamilySpec
    denoiser_instances: int = 4  # fan-out width: one request per instance per round
    model_timeout_s: float = 120.0  # a model call not answered by then is retried or fails
    request_timeout_s: float = 300.0  # a request still running then fails (DEADLINE_EXCEEDED)
    limits: api.Limits = field(default_factory=api.Limits)
    defaults: api.Defaults = field(default_factory=api.Defaults)
    # latent -> RGB preview: ((C x 3 weights), (3 biases)) fitted to the VAE (fit_preview)
    preview: tuple[tuple[tuple[float, ...], ...], tuple[float, ...]] | None = None

    def save(self, folder: Path) -> None:
        data = {
            "family": self.family.to_dict(),
            "denoiser_instances": self.denoiser_instances,
            "model_timeout_s": self.model_timeout_s,
            "request_timeout_s": self.request_timeout_s,
            "limits": self.limits.__dict__,
            "defaults": self.defaults.__dict__,
            "preview": self.preview,
        }
        (Path(folder) / SETTINGS_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ServiceSettings:
        data = json.loads((Path(folder) / SETTINGS_FILE).read_text())
        return cls(
            family=FamilySpec.from_dict(data["family"]),
            denoiser_instances=int(data["denoiser_instances"]),
            model_timeout_s=float(data["model_timeout_s"]),
            request_timeout_s=float(data["request_timeout_s"]),
            limits=api.Limits(**{**data["limits"], "samplers": tuple(data["limits"]["samplers"])}),
            defaults=api.Defaults(**data["defaults"]),
            preview=data.get("preview"),
        )


def executor_threads(settings: ServiceSettings) -> int:
    """Threads an orchestrator instance needs for its blocking model calls: the widest round
    (max_k drafts, one call each at most), the text encoders, and as many again as headroom for
    calls left hanging by a timed-out instance (a thread cannot be taken back from a blocking
    call)."""
    return 2 * (max(settings.limits.max_k, 1) + 2)


def preview_image(latents: torch.Tensor, preview) -> np.ndarray:
    """(n, C, h, w) latents -> (n, h, w, 3) uint8 through the fitted linear map."""
    weights = torch.tensor(preview[0], dtype=torch.float32)  # (C, 3)
    bias = torch.tensor(preview[1], dtype=torch.float32)
    rgb = torch.einsum("nchw,cd->nhwd", latents.float(), weights) + bias
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@dataclass(frozen=True)
class Progress:
    """What the orchestrator reports after each round (driffusion_stream)."""

    round: int  # 1-based
    rounds: int  # the rounds of the whole request
    steps_done: int
    preview: np.ndarray | None  # (n, h, w, 3) uint8 of the current prediction, when asked


@dataclass
class GenerateOutput:
    image: np.ndarray  # (n, H, W, 3) uint8
    rounds: int
    evaluations: int
    text_ms: float
    denoise_ms: float
    decode_ms: float
    host_ms: float  # within denoise_ms: the orchestrator's own work, not waiting for the denoiser

    def arrays(self) -> dict[str, np.ndarray]:
        """The model's outputs by their api names."""
        values = {
            api.IMAGE.name: self.image,
            api.ROUNDS.name: self.rounds,
            api.EVALUATIONS.name: self.evaluations,
            api.TEXT_MS.name: self.text_ms,
            api.DENOISE_MS.name: self.denoise_ms,
            api.DECODE_MS.name: self.decode_ms,
            api.HOST_MS.name: self.host_ms,
        }
        return {
            f.name: np.asarray(values[f.name], dtype=api.NUMPY_DTYPES[f.dtype]).reshape(
                f.dims if f.dims == (1,) else np.shape(values[f.name])
            )
            for f in api.OUTPUTS
        }


class Orchestrator:
    """One served pipeline's host-side logic (tokenizers, schedulers, DRiffusion, CFG)."""

    def __init__(self, settings: ServiceSettings, pipeline_dir: Path):
        from diffusers import schedulers
        from transformers import CLIPTokenizer

        self.settings, self.family = settings, settings.family
        # called as on_retry(model, reason) before a failed denoiser call is retried (metrics)
        self.on_retry: Callable[[str, str], None] | None = None
        # remote denoisers (driffusion.routing): set by the server when it has some; a round is
        # then split over every endpoint's instances and each call routed by free capacity
        self.denoiser_router: DenoiserRouter | None = None
        # Host work is small elementwise math beside several model processes on the same cores:
        # more than one intra-op thread only adds contention (measured: BENCHMARKS.md, core).
        torch.set_num_threads(1)
        self.tokenizers = {
            role: CLIPTokenizer.from_pretrained(Path(pipeline_dir) / TOKENIZER_DIRS[role])
            for role in self.family.text_roles
        }
        scheduler_cls = getattr(schedulers, self.family.scheduler_class)
        self._config = scheduler_cls.load_config(Path(pipeline_dir) / "scheduler")
        # Built once: the first from_config costs ~1.4 s of lazy imports, a copy ~0.1 ms.
        self._schedulers = {"": scheduler_cls.from_config(self._config)}
        self._warm_up()

    def _warm_up(self) -> None:
        """Run the host path once (scheduler, torch ops, engine) so no request pays first use."""
        scheduler = self.new_scheduler(2)
        x = torch.zeros(1, self.family.latent_channels, 2, 2)
        noise = StepNoise(x, torch.Generator().manual_seed(0))
        engine = draft_and_refine(x, Schedule.from_diffusers(scheduler), "aggressive", 2, noise)
        drive(engine, lambda r: torch.zeros_like(r.x))

    def new_scheduler(self, steps: int, name: str = ""):
        """A fresh scheduler (they are stateful) with ``steps`` timesteps set: sampler ``name``
        (``driffusion.samplers``) built from the pipeline's config, or its own ("")."""
        if name not in self._schedulers:
            from .samplers import make_scheduler

            self._schedulers[name] = make_scheduler(name, self._config)
        scheduler = copy.deepcopy(self._schedulers[name])
        scheduler.set_timesteps(steps)
        return scheduler

    @classmethod
    def load(cls, folder: Path) -> Orchestrator:
        """From a repository version folder: ``settings.json`` and ``pipeline/``."""
        return cls(ServiceSettings.load(folder), Path(folder) / "pipeline")

    # -- validation ----------------------------------------------------------------------------
    def parse(self, values: Mapping[str, np.ndarray | None]) -> api.GenerateRequest:
        """Validate a request's inputs; ``ValueError`` names the field and the allowed range."""
        req = api.parse_request(values, self.settings.limits, self.settings.defaults)
        for role, tok in self.tokenizers.items():
            for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
                n = len(tok(text).input_ids)
                if n > tok.model_max_length:
                    raise ValueError(
                        f"{name} is {n - 2} tokens for {role}; at most "
                        f"{tok.model_max_length - 2} allowed"
                    )
        return req

    # -- the request ---------------------------------------------------------------------------
    async def generate(
        self,
        req: api.GenerateRequest,
        infer: Infer,
        cancelled: Callable[[], bool] = lambda: False,
        *,
        deadline: float | None = None,
        progress: Callable[[Progress], Awaitable[None]] | None = None,
    ) -> GenerateOutput:
        """Run one validated request. ``cancelled()`` is polled before every round; ``deadline``
        (``time.monotonic()`` value, default now + ``request_timeout_s``) bounds the whole
        request: its work stops at the next round or model call (``DeadlineExceeded``).
        ``progress`` is awaited after every round (streamed progress)."""
        start = time.perf_counter()
        if deadline is None:
            deadline = time.monotonic() + self.settings.request_timeout_s
        infer = self._with_deadline(self._in_served_dtypes(infer), deadline)
        denoise = infer  # the denoiser calls: local, or routed over local and remote endpoints
        if self.denoiser_router is not None:
            denoise = self._in_served_dtypes(self.denoiser_router.bind(infer, deadline))
        cfg = req.guidance_scale > 1.0  # as diffusers' do_classifier_free_guidance
        cond = await self._encode_text(req, cfg, infer)
        text_done = time.perf_counter()

        scheduler = self.new_scheduler(req.steps, req.scheduler)
        begin = _img2img_begin(scheduler, req)
        schedule = Schedule.from_diffusers(scheduler, begin=begin)
        # one generator per image, seeded seed + i: image i is the one-image request of that seed
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in req.seeds]
        shape = (
            1,
            self.family.latent_channels,
            req.height // self.family.vae_scale_factor,
            req.width // self.family.vae_scale_factor,
        )
        if req.image is None:  # as diffusers' prepare_latents, times init_noise_sigma
            x = torch.cat([torch.randn(shape, generator=g) for g in generators])
            x = x * float(getattr(scheduler, "init_noise_sigma", 1.0))
        else:  # img2img: the image's latent, noised to the first step run (add_noise)
            init = await self._encode_image(req, generators, infer)
            noise = torch.cat([torch.randn(shape, generator=g) for g in generators])
            c0, cn = noising(scheduler, schedule)[0]
            x = c0 * init + cn * noise
        k = k_spec(req.k, req.k_schedule)
        noise = StepNoise(x, generators) if schedule.stochastic else None
        denoiser = _DenoiserFeed(self.family, cond, cfg, req.num_images)
        waited = [0.0]  # seconds spent awaiting denoiser calls
        total = count_rounds(schedule.num_steps, req.mode, k)[0]

        async def evaluate(r: Round) -> torch.Tensor:
            if cancelled():
                raise RequestCancelled(f"request cancelled before round {r.index}")
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"request deadline exceeded before round {r.index} of a {req.steps}-step "
                    f"{req.mode} request"
                )
            out = await self._evaluate(r, denoiser, req, denoise, waited)
            if progress is not None:
                await progress(self._progress(r, out, schedule, total, req))
            return out

        result = await drive_async(draft_and_refine(x, schedule, req.mode, k, noise), evaluate)
        denoise_done = time.perf_counter()

        decoded = await infer(VAE_DECODER, {LATENT: result.sample.numpy()}, (IMAGE,))
        images = np.asarray(decoded[IMAGE]).transpose(0, 2, 3, 1)  # (n, H, W, 3) in [0, 1]
        images = (images * 255).round().clip(0, 255).astype(np.uint8)  # as diffusers' postprocess
        end = time.perf_counter()
        return GenerateOutput(
            image=images,
            rounds=result.rounds,
            evaluations=result.evaluations,
            text_ms=(text_done - start) * 1e3,
            denoise_ms=(denoise_done - text_done) * 1e3,
            host_ms=(denoise_done - text_done - waited[0]) * 1e3,
            decode_ms=(end - denoise_done) * 1e3,
        )

    def _progress(self, r: Round, out: torch.Tensor, schedule, total: int, req) -> Progress:
        """After round ``r``: how far the request is, and a preview of its furthest state's
        prediction when asked (the latents drawn through the fitted linear map)."""
        preview = None
        if req.preview and self.settings.preview is not None:
            n = req.num_images
            last = len(r.steps) - 1
            x, e = r.x[last * n : (last + 1) * n], out[last * n : (last + 1) * n]
            j = r.steps[last]
            if schedule.input_scales is not None:  # the round holds x as the model sees it
                x = x / schedule.input_scales[j]
            preview = preview_image(data_prediction(schedule, x, e, j), self.settings.preview)
        return Progress(r.index + 1, total, max(r.steps) + 1, preview)

    async def _encode_image(self, req, generators, infer: Infer) -> torch.Tensor:
        """img2img: the image's latent, sampled from the VAE encoder's distribution with each
        image's generator (diffusers' ``latent_dist.sample(generator)``), (n, C, h, w)."""
        pixels = req.image.astype(np.float32).transpose(2, 0, 1)[None] / 255.0  # (1, 3, H, W)
        encoded = await infer(VAE_ENCODER, {PIXELS: pixels}, (LATENT_MEAN, LATENT_STD))
        mean = torch.from_numpy(np.asarray(encoded[LATENT_MEAN], dtype=np.float32))
        std = torch.from_numpy(np.asarray(encoded[LATENT_STD], dtype=np.float32))
        return torch.cat([mean + std * torch.randn(mean.shape, generator=g) for g in generators])

    def _in_served_dtypes(self, infer: Infer) -> Infer:
        """``infer`` that sends every input in the dtype the served spec names for it (float16
        for the tensors of fp16 engines, see ``families.at_precision``) and returns float outputs as
        float32: the host's math (guidance, scheduler, jumps) stays float32 whatever the engines
        run. With the fp32 spec both conversions are no-ops (no copies)."""

        async def call(model, inputs, outputs):
            spec = self.family.components[model]
            sent = {n: np.asarray(v, dtype=spec.tensor(n).dtype) for n, v in inputs.items()}
            got = await infer(model, sent, outputs)
            return {
                n: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else v
                for n, v in got.items()
            }

        return call

    def request_timeout_s(self, client_timeout_s: float | None) -> float:
        """A request's time budget: the server's ``request_timeout_s``, or the client's own
        timeout where that is shorter."""
        server = self.settings.request_timeout_s
        return server if client_timeout_s is None else min(server, client_timeout_s)

    def _with_deadline(self, infer: Infer, deadline: float) -> Infer:
        """``infer`` that gives up on a call after ``model_timeout_s`` (or at the request's
        deadline) and retries a call that failed in one instance (a crashed or hung worker):
        at once (another instance may take it), then after ``RETRY_DELAYS_S`` (the supervisor of
        ``driffusion serve`` replaces a dead worker within about a second). A hung instance's late
        answer is dropped."""

        async def call(model, inputs, outputs):
            attempt = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"request deadline exceeded before a {model} call")
                timeout = min(self.settings.model_timeout_s, left)
                try:
                    return await asyncio.wait_for(infer(model, inputs, outputs), timeout)
                except asyncio.TimeoutError:
                    if timeout < self.settings.model_timeout_s:
                        raise DeadlineExceeded(
                            f"request deadline exceeded waiting for {model}"
                        ) from None
                    error = ModelCallError(
                        f"model {model} did not answer within {timeout:g} s", retryable=True
                    )
                except ModelCallError as exc:
                    error = exc
                if not error.retryable or attempt >= len(RETRY_DELAYS_S):
                    raise error
                delay = min(RETRY_DELAYS_S[attempt], max(deadline - time.monotonic(), 0.0))
                attempt += 1
                if self.on_retry is not None:
                    self.on_retry(model, str(error))
                await asyncio.sleep(delay)

        return call

    async def _encode_text(self, req, cfg: bool, infer: Infer) -> dict[str, np.ndarray]:
        """Denoiser conditions, one row per CFG branch: (uncond, cond) or (cond,)."""
        texts = [req.negative_prompt, req.prompt] if cfg else [req.prompt]
        roles = self.family.text_roles

        async def encode(role: str) -> dict[str, np.ndarray]:
            tok = self.tokenizers[role]
            ids = tok(
                texts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="np",
            ).input_ids.astype(np.int64)
            outputs = self.family.components[role].output_names
            return await infer(role, {INPUT_IDS: ids}, outputs)

        text = dict(zip(roles, await asyncio.gather(*(encode(r) for r in roles)), strict=True))
        empty_negative = 0 if cfg and not req.negative_prompt else None
        return denoiser_conditions(
            self.family, text, req.height, req.width, empty_negative_row=empty_negative
        )

    async def _evaluate(
        self, r: Round, denoiser: _DenoiserFeed, req, infer: Infer, waited: list[float]
    ) -> torch.Tensor:
        """The guided model outputs of one round, its states spread over the denoiser requests."""
        states = len(r.steps)
        width = self.settings.denoiser_instances
        if self.denoiser_router is not None:
            width = self.denoiser_router.width()  # local and remote instances that are up
        parts = 1 if req.fanout == "batch" else width
        x, t = r.x, r.t
        if denoiser.cfg:  # every state as its (uncond, cond) rows
            x, t = with_cfg(x, states), with_cfg(t, states)
        per_state = x.shape[0] // states
        calls = [
            infer(
                DENOISER,
                denoiser.feed(x[rows(s, per_state)], t[rows(s, per_state)]),
                (MODEL_OUTPUT,),
            )
            for s in shards(states, parts)
        ]
        start = time.perf_counter()
        results = await asyncio.gather(*calls)
        waited[0] += time.perf_counter() - start
        out = torch.cat([torch.from_numpy(np.asarray(res[MODEL_OUTPUT])) for res in results])
        out = out.float()
        if denoiser.cfg:
            out = combine_cfg(out, states, req.guidance_scale)
        return out


def _img2img_begin(scheduler, req: api.GenerateRequest) -> int:
    """The first of the scheduler's timesteps an img2img request runs (diffusers'
    ``get_timesteps``: the last ``int(steps * strength)`` steps); 0 without an image."""
    if req.image is None:
        return 0
    run = min(int(req.steps * req.strength), req.steps)
    begin = max(req.steps - run, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return begin


class _DenoiserFeed:
    """One request's denoiser inputs: the round's states and timesteps in the engine's dtypes, and
    the text conditions, cast once and tiled once per shard size (they are the same in every
    round and make up most of a request's bytes). Rows per state, as diffusers batches them:
    with guidance the ``n`` images' unconditional rows, then their conditional rows."""

    def __init__(
        self, family: FamilySpec, cond: Mapping[str, np.ndarray], cfg: bool, images: int = 1
    ):
        spec = family.components[DENOISER]
        self.cfg = cfg
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        # (uncond, cond) or (cond,) rows -> each repeated once per image
        self._cond = {
            name: np.ascontiguousarray(np.repeat(v, images, axis=0), self._dtypes[name])
            for name, v in cond.items()
        }
        self._tiled: dict[int, dict[str, np.ndarray]] = {}

    def feed(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, np.ndarray]:
        """Inputs of one denoiser request for states ``x`` (rows: states x CFG branches)."""
        per_state = next(iter(self._cond.values())).shape[0]
        states = x.shape[0] // per_state
        if states not in self._tiled:
            self._tiled[states] = {
                name: np.concatenate([v] * states) if states > 1 else v
                for name, v in self._cond.items()
            }
        return {
            SAMPLE: x.numpy().astype(self._dtypes[SAMPLE], copy=False),
            TIMESTEP: t.numpy().astype(self._dtypes[TIMESTEP], copy=False),
            **self._tiled[states],
        }
