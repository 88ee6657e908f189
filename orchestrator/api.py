"""The request API of the served ``driffusion`` model (KServe v2 over gRPC and HTTP).

The single source of the model's input and output names, Triton dtypes, defaults and limits: the
``config.pbtxt`` writer, the BLS orchestrator and the client all read them from here. Needs only
numpy, so the client does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

MODES = ("sequential", "aggressive", "conservative")  # as driffusion.engine.MODES
FANOUTS = ("instances", "batch")
K_SCHEDULES = ("fixed", "tapered", "ramp")
RAMP_EXTRA = 2  # ramp: k-1 for the first 20% of steps, then k + RAMP_EXTRA
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Field:
    """One input or output of the ``driffusion`` model."""

    name: str
    dtype: str  # Triton dtype: BYTES, INT64, INT32, FP32, UINT8
    dims: tuple[int, ...]
    doc: str
    optional: bool = True


# Inputs, every one a single element; defaults that depend on the model are marked "model".
PROMPT = Field("prompt", "BYTES", (1,), "text prompt (required)", optional=False)
NEGATIVE_PROMPT = Field("negative_prompt", "BYTES", (1,), 'negative prompt; default ""')
SEED = Field("seed", "INT64", (1,), "noise seed in [0, 2^63-1]; default 0")
STEPS = Field("steps", "INT32", (1,), "sampler steps S in [1, max_steps]; default: model's")
GUIDANCE = Field("guidance_scale", "FP32", (1,), "CFG scale >= 0 (<= 1: no CFG); default: model's")
MODE = Field("mode", "BYTES", (1,), "sequential | aggressive | conservative; default aggressive")
K = Field("k", "INT32", (1,), "drafts per round, 1..min(steps, max_k); default 4 (capped at steps)")
K_SCHEDULE = Field(
    "k_schedule",
    "BYTES",
    (1,),
    "fixed | tapered (k, then k-1 for the last 40% of steps) | ramp (k-1 for the first 20% of "
    "steps, then k+2; needs k+2 <= max_k); default fixed",
)
HEIGHT = Field("height", "INT32", (1,), "image height in pixels; default: model's")
WIDTH = Field("width", "INT32", (1,), "image width in pixels; default: model's")
FANOUT = Field(
    "fanout",
    "BYTES",
    (1,),
    "instances (a round's drafts spread over the denoiser instances, "
    "one request each) | batch (one request); default instances",
)
NUM_IMAGES = Field(
    "num_images",
    "INT32",
    (1,),
    "images from the prompt, 1..max_images; image i is drawn with seed + i; default 1",
)
SCHEDULER = Field(
    "scheduler",
    "BYTES",
    (1,),
    "sampler: ddim | ddpm | euler | euler_ancestral | dpmpp_2m | dpmpp_2m_karras | unipc | pndm "
    "(epsilon and v models) or flow_euler (flow models); default: the pipeline's own",
)
INIT_IMAGE = Field(
    "image",
    "UINT8",
    (-1, -1, 3),
    "img2img: the starting image (height, width, RGB), within the model's sizes; default none",
)
STRENGTH = Field(
    "strength",
    "FP32",
    (1,),
    "img2img: how much of the schedule is run from the noised image, (0, 1]; default 0.8",
)
PREVIEW = Field(
    "preview",
    "BOOL",
    (1,),
    "driffusion_stream: send a cheap preview of the current prediction with each round; "
    "default false",
)
INPUTS = (
    PROMPT,
    NEGATIVE_PROMPT,
    SEED,
    STEPS,
    GUIDANCE,
    MODE,
    K,
    K_SCHEDULE,
    HEIGHT,
    WIDTH,
    FANOUT,
    NUM_IMAGES,
    SCHEDULER,
    INIT_IMAGE,
    STRENGTH,
    PREVIEW,
)

IMAGE = Field("image", "UINT8", (-1, -1, -1, 3), "the images, (num_images, height, width, RGB)")
ROUNDS = Field("rounds", "INT32", (1,), "serial denoiser rounds (latency is proportional)")
EVALUATIONS = Field("evaluations", "INT32", (1,), "states evaluated (about steps in every mode)")
TEXT_MS = Field("text_ms", "FP32", (1,), "text encoding time, ms")
DENOISE_MS = Field("denoise_ms", "FP32", (1,), "denoising time (all rounds), ms")
DECODE_MS = Field("decode_ms", "FP32", (1,), "VAE decoding time, ms")
HOST_MS = Field(
    "host_ms",
    "FP32",
    (1,),
    "the orchestrator's own time within denoise_ms (drafting, refinement, guidance, tensor "
    "conversion), ms; the rest is waiting for the denoiser",
)
OUTPUTS = (IMAGE, ROUNDS, EVALUATIONS, TEXT_MS, DENOISE_MS, DECODE_MS, HOST_MS)

# driffusion_stream only: one response per round carries these (and, when asked, PREVIEW_IMAGE);
# the last response carries OUTPUTS.
ROUND = Field("round", "INT32", (1,), "the round just finished, 1-based")
STEPS_DONE = Field("steps_done", "INT32", (1,), "sampling steps refined so far")
ELAPSED_MS = Field("elapsed_ms", "FP32", (1,), "time since the request arrived, ms")
PREVIEW_IMAGE = Field(
    "preview_image",
    "UINT8",
    (-1, -1, -1, 3),
    "a cheap preview of the current prediction (num_images, latent height, latent width, RGB)",
)
PROGRESS = (ROUND, ROUNDS, STEPS_DONE, ELAPSED_MS, PREVIEW_IMAGE)
STREAM_OUTPUTS = (*OUTPUTS, ROUND, STEPS_DONE, ELAPSED_MS, PREVIEW_IMAGE)

NUMPY_DTYPES = {
    "BYTES": np.object_,
    "INT64": np.int64,
    "INT32": np.int32,
    "FP32": np.float32,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that no request can exhaust the server."""

    max_steps: int = 1000
    max_k: int = 8
    min_size: int = 32
    max_size: int = 1024
    size_multiple: int = 8
    max_prompt_chars: int = 2000  # the tokenizer then caps prompts at its context length
    max_guidance: float = 50.0
    max_images: int = 4  # num_images per request
    samplers: tuple[str, ...] = ()  # the scheduler names a request may ask for


@dataclass(frozen=True)
class Defaults:
    """The model-dependent defaults of a served pipeline."""

    steps: int = 50
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512
    mode: str = "aggressive"
    k: int = 4
    k_schedule: str = "fixed"
    fanout: str = "instances"
    scheduler: str = ""  # the pipeline's own sampler's name ("" where it has none of ours)
    strength: float = 0.8


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 50
    guidance_scale: float = 7.5
    mode: str = "aggressive"
    k: int = 4
    k_schedule: str = "fixed"
    height: int = 512
    width: int = 512
    fanout: str = "instances"
    num_images: int = 1
    scheduler: str = ""  # "": the pipeline's own
    image: np.ndarray | None = None  # img2img: (height, width, 3) uint8
    strength: float = 1.0  # img2img: the part of the schedule that is run
    preview: bool = False

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: image i is drawn as a one-image request of seed + i."""
        return [self.seed + i for i in range(self.num_images)]


def parse_request(
    values: Mapping[str, np.ndarray | None], limits: Limits, defaults: Defaults
) -> GenerateRequest:
    """Validate raw input arrays (``None`` for an absent optional input) into a request.

    Raises ``ValueError`` whose message names the field and the allowed range.
    """
    unknown = sorted(set(values) - {f.name for f in INPUTS})
    if unknown:
        names = ", ".join(echo(n) for n in unknown[:3])
        raise ValueError(f"unknown input(s) {names}; inputs are {[f.name for f in INPUTS]}")
    get = {f.name: _scalar(f, values.get(f.name)) for f in INPUTS if f is not INIT_IMAGE}
    if get["prompt"] is None:
        raise ValueError("prompt is required: a BYTES tensor of shape [1] holding UTF-8 text")
    prompt = _text(PROMPT, get["prompt"], limits, allow_empty=False)
    negative = (
        _text(NEGATIVE_PROMPT, get["negative_prompt"], limits)
        if get["negative_prompt"] is not None
        else ""
    )
    steps = _int(STEPS, get["steps"], defaults.steps, 1, limits.max_steps)
    mode = _choice(MODE, get["mode"], defaults.mode, MODES)
    k_max = min(steps, limits.max_k)
    k_default = min(defaults.k, k_max)
    k = _int(K, get["k"], k_default, 1, k_max, why=f"min(steps={steps}, max_k={limits.max_k})")
    image = _image(values.get(INIT_IMAGE.name), limits)
    if image is not None:  # the image's size, unless the request names another
        for f, size in ((HEIGHT, image.shape[0]), (WIDTH, image.shape[1])):
            if get[f.name] is not None and int(get[f.name]) != size:
                raise ValueError(
                    f"{f.name} must be the image's ({size}) with an image, got {get[f.name]}"
                )
        defaults = replace(defaults, height=image.shape[0], width=image.shape[1])
    height = _size(HEIGHT, get["height"], defaults.height, limits)
    width = _size(WIDTH, get["width"], defaults.width, limits)
    strength = 1.0
    if get["strength"] is not None or image is not None:
        if image is None:
            raise ValueError("strength needs an image: it is the part of the schedule run from it")
        strength = defaults.strength if get["strength"] is None else float(get["strength"])
        if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if int(steps * strength) < 1:
            raise ValueError(
                f"strength must be at least 1/steps = {1 / steps:.4g} with steps={steps}: "
                f"strength x steps is the number of steps run, got {strength}"
            )
    guidance = get["guidance_scale"]
    guidance = defaults.guidance_scale if guidance is None else float(guidance)
    if not (math.isfinite(guidance) and 0.0 <= guidance <= limits.max_guidance):
        raise ValueError(f"guidance_scale must be in [0, {limits.max_guidance}], got {guidance}")
    num_images = _int(NUM_IMAGES, get["num_images"], 1, 1, limits.max_images)
    why = f"2^63 - num_images={num_images}" if num_images > 1 else ""
    seed = _int(SEED, get["seed"], 0, 0, INT64_MAX - num_images + 1, why=why)
    scheduler = _choice(SCHEDULER, get["scheduler"], defaults.scheduler, limits.samplers)
    preview = bool(get["preview"]) if get["preview"] is not None else False
    k_schedule = _choice(K_SCHEDULE, get["k_schedule"], defaults.k_schedule, K_SCHEDULES)
    if k_schedule == "ramp" and k + RAMP_EXTRA > limits.max_k:
        raise ValueError(
            f"k must be in [1, {limits.max_k - RAMP_EXTRA}] with k_schedule=ramp "
            f"(its late blocks are k+{RAMP_EXTRA} <= max_k={limits.max_k}), got {k}"
        )
    return GenerateRequest(
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        mode=mode,
        k=k,
        k_schedule=k_schedule,
        height=height,
        width=width,
        fanout=_choice(FANOUT, get["fanout"], defaults.fanout, FANOUTS),
        num_images=num_images,
        scheduler=scheduler,
        image=image,
        strength=strength,
        preview=preview,
    )


def _image(array: np.ndarray | None, limits: Limits) -> np.ndarray | None:
    """An img2img start image: (height, width, 3) uint8 within the served sizes."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image must be UINT8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be (height, width, 3) RGB, got shape {list(array.shape)}")
    for name, size in (("height", array.shape[0]), ("width", array.shape[1])):
        if not limits.min_size <= size <= limits.max_size or size % limits.size_multiple:
            raise ValueError(
                f"image {name} must be a multiple of {limits.size_multiple} in "
                f"[{limits.min_size}, {limits.max_size}], got {size}"
            )
    return np.ascontiguousarray(array)


def _scalar(field: Field, array: np.ndarray | None):
    if array is None:
        return None
    array = np.asarray(array)
    if array.size != 1:
        raise ValueError(
            f"{field.name} must hold exactly one element (shape [1]), got shape {list(array.shape)}"
        )
    value = array.reshape(-1)[0]
    expected = NUMPY_DTYPES[field.dtype]
    if field.dtype == "BYTES":
        if not isinstance(value, (bytes, str)):
            raise ValueError(f"{field.name} must be BYTES (UTF-8 text), got {array.dtype}")
    elif array.dtype != expected:
        raise ValueError(f"{field.name} must be {field.dtype}, got {array.dtype}")
    return value


def _text(field: Field, value, limits: Limits, allow_empty: bool = True) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{field.name} must be UTF-8 text") from None
    if not allow_empty and not value.strip():
        raise ValueError(f"{field.name} must not be empty")
    if len(value) > limits.max_prompt_chars:
        raise ValueError(
            f"{field.name} is {len(value)} characters; at most {limits.max_prompt_chars} allowed"
        )
    return value


def _int(field: Field, value, default: int, low: int, high: int, why: str = "") -> int:
    value = default if value is None else int(value)
    if not low <= value <= high:
        bound = f"{high}" + (f" = {why}" if why else "")
        raise ValueError(f"{field.name} must be in [{low}, {bound}], got {value}")
    return value


def _choice(field: Field, value, default: str, allowed: tuple[str, ...]) -> str:
    if value is None:
        return default
    if not allowed:
        raise ValueError(f"{field.name} cannot be chosen on this server")
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if text not in allowed:
        raise ValueError(f"{field.name} must be one of {', '.join(allowed)}, got {echo(text)}")
    return text


ECHO_CHARS = 40


def echo(text: str) -> str:
    """``repr(text)``, cut to ``ECHO_CHARS`` characters: an error never repeats a large value back
    (a 100 KB value in a message made gRPC answer RESOURCE_EXHAUSTED instead of the error)."""
    if len(text) <= ECHO_CHARS:
        return repr(text)
    return f"{text[:ECHO_CHARS]!r}... ({len(text)} characters)"


def _size(field: Field, value, default: int, limits: Limits) -> int:
    value = _int(field, value, default, limits.min_size, limits.max_size)
    if value % limits.size_multiple:
        raise ValueError(
            f"{field.name} must be a multiple of {limits.size_multiple} in "
            f"[{limits.min_size}, {limits.max_size}], got {value}"
        )
    return value
