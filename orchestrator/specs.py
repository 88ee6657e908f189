"""One spec per model family: the single source of truth for every exported tensor.

ONNX export, the TensorRT engine build, ``config.pbtxt``, the BLS orchestrator and the client all
read tensor names, dtypes, shapes and batch ranges from here; no tensor name is typed elsewhere.

Components (``ModelSpec.role``) and their tensors, as the fp32 view of a family lists them
(``at_precision(family, "fp16")`` gives the view served by fp16 engines: float16 at the boundary
except ``timestep`` and ``time_ids``):

    text_encoder(_2)  input_ids int64 (batch, seq)
                      -> hidden_states (batch, seq, D)  the states the pipeline feeds the denoiser
                         [pooled (batch, P)]            projected EOS state, where used
    denoiser          sample (batch, C, latent_height, latent_width), timestep float32 (batch,),
                      encoder_hidden_states (batch, S, D)
                      [+ text_embeds (batch, P), time_ids (batch, 6)]   SDXL
                      [+ pooled_projections (batch, P1 + P2)]           SD3
                      -> model_output (batch, C, latent_height, latent_width)  raw eps / v / flow
    vae_decoder       latent (batch, C, latent_height, latent_width)  as sampled (scaled)
                      -> image (batch, 3, height, width)  RGB in [0, 1] (clamped), NCHW

``timestep`` is float32 for every family: DDIM's integer timesteps are exact in float32, Euler's are
fractional, and SD3's are sigma * 1000. String dims are dynamic axes; ints are fixed.

    fam = get_family("sdxl")
    fam.components["denoiser"].input_names          # ('sample', 'timestep', ...)
    fam.trt_profiles(max_k=4)["denoiser"]["sample"]  # ((1,4,64,64), (8,4,128,128), (8,4,192,192))

This module needs only numpy, so the client and the Triton python stubs can import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# --- names (the only place they are spelled) ---------------------------------------------------

# Component roles; each is one ONNX file / one Triton model.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
DENOISER = "denoiser"
VAE_DECODER = "vae_decoder"
ROLES = (TEXT_ENCODER, TEXT_ENCODER_2, DENOISER, VAE_DECODER)

# Tensors.
INPUT_IDS = "input_ids"
HIDDEN_STATES = "hidden_states"
POOLED = "pooled"
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"
POOLED_PROJECTIONS = "pooled_projections"
MODEL_OUTPUT = "model_output"
LATENT = "latent"
IMAGE = "image"

# Dynamic dims. latent_height = height // vae_scale_factor (same for width).
BATCH = "batch"
HEIGHT = "height"
WIDTH = "width"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"

# How a component's batch range follows the number of drafts k.
BATCH_CFG_DRAFTS = "cfg_drafts"  # 1 .. 2*k: a round of k drafts, each with its CFG pair
BATCH_CFG = "cfg"  # 1 .. 2: prompt and negative prompt
BATCH_SINGLE = "single"  # 1: one final latent

Shape = tuple[int | str, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: numpy dtype string and shape (str = dynamic dim, int = fixed)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: Shape  # e.g. (BATCH, 4, LATENT_HEIGHT, LATENT_WIDTH)
    # Range the sample-input builder draws from, uniform in [low, high) (integers for int dtypes);
    # None: standard normal.
    sample_range: tuple[float, float] | None = None

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """{axis: dim name} of the dynamic dims, as torch.onnx.export wants them."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def wildcard_shape(self) -> tuple[int, ...]:
        """Shape with -1 for every dynamic dim (ONNX / Triton ``dims`` convention)."""
        return tuple(-1 if isinstance(d, str) else d for d in self.shape)

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape, dynamic dims looked up in ``dims``."""
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)


@dataclass(frozen=True)
class ModelSpec:
    """One exported component: its tensors, batch range and build precision."""

    role: str  # one of ROLES
    pipeline_attr: str  # the diffusers pipeline attribute holding the module ("unet", "vae", ...)
    inputs: tuple[TensorSpec, ...]  # in the order the ONNX graph takes them
    outputs: tuple[TensorSpec, ...]
    batch: str  # BATCH_CFG_DRAFTS | BATCH_CFG | BATCH_SINGLE
    # Weights of the exported ONNX file and the engine: "fp16" | "fp32". In FAMILIES it is the
    # precision the component takes when fp16 is asked for ("fp32": never fp16, e.g. SDXL's VAE);
    # at_precision() gives the served view, whose tensors' dtypes follow it.
    precision: str
    vae_scale_factor: int = 8  # pixels per latent cell, to size latent dims from image sizes
    # Text encoders only: which hidden states the pipeline uses. "last": the final layer after the
    # final layer norm (SD 1/2); "penultimate": hidden_states[-2], no final norm (SDXL, SD3).
    text_layer: str | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        names = self.input_names + self.output_names
        raise KeyError(f"{self.role} has no tensor {name!r}; it has {names}")

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: dim name}} over inputs and outputs, for torch.onnx.export."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}

    def max_batch(self, max_k: int) -> int:
        """Largest batch this component sees with up to ``max_k`` drafts per round."""
        _check_int("max_k", max_k, 1)
        return {BATCH_CFG_DRAFTS: 2 * max_k, BATCH_CFG: 2, BATCH_SINGLE: 1}[self.batch]

    def dims(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Values of the dynamic dims for a batch of images of ``height`` x ``width`` pixels."""
        s = self.vae_scale_factor
        return {
            BATCH: batch,
            HEIGHT: height,
            WIDTH: width,
            LATENT_HEIGHT: height // s,
            LATENT_WIDTH: width // s,
        }

    def trt_profile(
        self,
        max_k: int,
        min_size: tuple[int, int],
        opt_size: tuple[int, int],
        max_size: tuple[int, int],
        opt_batch: int | None = None,
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT (min, opt, max) shape per input; sizes are (height, width) in pixels.

        Batch runs from 1 to ``max_batch(max_k)``; opt is the max (a full round of CFG drafts)
        unless ``opt_batch`` is given.
        """
        top = self.max_batch(max_k)
        opt_batch = top if opt_batch is None else opt_batch
        _check_int("opt_batch", opt_batch, 1, top)
        points = [
            self.dims(1, *min_size),
            self.dims(opt_batch, *opt_size),
            self.dims(top, *max_size),
        ]
        return {t.name: tuple(t.resolve(d) for d in points) for t in self.inputs}

    def sample_inputs(
        self, batch: int, height: int, width: int, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random inputs in spec order (for export tracing and checks)."""
        rng = np.random.default_rng(seed)
        dims = self.dims(batch, height, width)
        out = {}
        for t in self.inputs:
            shape = t.resolve(dims)
            if t.sample_range is None:
                value = rng.standard_normal(shape)
            elif np.issubdtype(np.dtype(t.dtype), np.integer):
                value = rng.integers(int(t.sample_range[0]), int(t.sample_range[1]), shape)
            else:
                value = rng.uniform(*t.sample_range, shape)
            out[t.name] = value.astype(t.dtype)
        return out


@dataclass(frozen=True)
class FamilySpec:
    """Everything the server needs to know about one model family."""

    name: str
    pipeline_class: str  # diffusers pipeline class name
    components: dict[str, ModelSpec]  # role -> spec, in pipeline order (encoders, denoiser, vae)
    conditioning: str  # how denoiser inputs come from text: "sd" | "sdxl" | "sd3" (denoiser_inputs)
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    default_size: tuple[int, int]  # (height, width) in pixels
    min_size: int  # smallest side in pixels the TensorRT profiles cover
    max_size: int  # largest side in pixels the TensorRT profiles cover
    size_multiple: int  # height and width must be multiples (vae factor x UNet downsampling/patch)
    tokenizer_max_length: int  # CLIP context, prompts padded/truncated to this
    scheduler_class: str  # diffusers scheduler class name of the default sampler
    scheduler_config: dict[str, Any]  # its config (as in the checkpoint's scheduler_config.json)
    prediction_type: str  # what the denoiser predicts: "epsilon" | "v_prediction" | "flow"
    precision: str  # precision of the denoiser (per component: ModelSpec.precision)
    guidance_scale: float  # default classifier-free guidance scale
    num_inference_steps: int  # default number of sampling steps
    # SDXL's force_zeros_for_empty_prompt: without a negative prompt, the unconditional text
    # conditions are zeros rather than the encoding of "".
    zero_empty_negative: bool = False
    # SD3 only: tokens of T5 context; without T5 they are zeros of the joint attention width.
    t5_sequence_length: int = 0

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.components)

    @property
    def text_roles(self) -> tuple[str, ...]:
        return tuple(r for r in self.components if r in (TEXT_ENCODER, TEXT_ENCODER_2))

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless (height, width) is a size the exported models accept."""
        for field_name, value in (("height", height), ("width", width)):
            _check_int(field_name, value, self.min_size, self.max_size)
            if value % self.size_multiple:
                raise ValueError(
                    f"{field_name} must be a multiple of {self.size_multiple} for {self.name}, "
                    f"got {value}"
                )

    def trt_profiles(
        self,
        max_k: int,
        min_size: int | None = None,
        opt_size: tuple[int, int] | None = None,
        max_size: int | None = None,
        opt_batch: int | None = None,
    ) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
        """{role: {input: (min, opt, max) shape}} for up to ``max_k`` drafts per round.

        Square min/max sides default to the family's range, opt to its default size.
        """
        lo = self.min_size if min_size is None else min_size
        hi = self.max_size if max_size is None else max_size
        opt = self.default_size if opt_size is None else opt_size
        for size in ((lo, lo), opt, (hi, hi)):
            self.check_size(*size)
        profiles = {}
        for role, spec in self.components.items():
            ob = opt_batch if spec.batch == BATCH_CFG_DRAFTS else None
            profiles[role] = spec.trt_profile(max_k, (lo, lo), opt, (hi, hi), opt_batch=ob)
        return profiles

    def denoiser_inputs(
        self, text: Mapping[str, Mapping[str, np.ndarray]], height: int, width: int
    ) -> dict[str, np.ndarray]:
        """Denoiser text conditions from the text encoders' outputs, as the diffusers pipeline
        forms them (one row per prompt; no CFG duplication here).

        ``text``: {role: {output name: array}} for the text encoder roles.
        Returns {ENCODER_HIDDEN_STATES: ..., plus TEXT_EMBEDS and TIME_IDS (sdxl) or
        POOLED_PROJECTIONS (sd3)}.
        """
        if self.conditioning == "sd":
            return {ENCODER_HIDDEN_STATES: np.asarray(text[TEXT_ENCODER][HIDDEN_STATES])}
        h1 = np.asarray(text[TEXT_ENCODER][HIDDEN_STATES])
        h2 = np.asarray(text[TEXT_ENCODER_2][HIDDEN_STATES])
        context = np.concatenate([h1, h2], axis=-1)  # (B, seq, D1 + D2)
        batch = context.shape[0]
        if self.conditioning == "sdxl":
            # time ids: original size, crop top-left, target size, each (height, width).
            time_ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            return {
                ENCODER_HIDDEN_STATES: context,
                TEXT_EMBEDS: np.asarray(text[TEXT_ENCODER_2][POOLED]),
                TIME_IDS: np.tile(time_ids, (batch, 1)),
            }
        if self.conditioning == "sd3":
            # CLIP-L ++ CLIP-G zero-padded to the T5 width, then the T5 tokens (zeros without T5).
            width_joint = self.components[DENOISER].tensor(ENCODER_HIDDEN_STATES).shape[-1]
            pad = width_joint - context.shape[-1]
            context = np.pad(context, ((0, 0), (0, 0), (0, pad)))
            t5 = np.zeros((batch, self.t5_sequence_length, width_joint), dtype=context.dtype)
            pooled = [np.asarray(text[r][POOLED]) for r in (TEXT_ENCODER, TEXT_ENCODER_2)]
            return {
                ENCODER_HIDDEN_STATES: np.concatenate([context, t5], axis=1),
                POOLED_PROJECTIONS: np.concatenate(pooled, axis=-1),
            }
        raise ValueError(f"unknown conditioning {self.conditioning!r}")


# --- builders ------------------------------------------------------------------------------


def _text_encoder(
    role: str,
    attr: str,
    *,
    seq: int,
    vocab: int,
    hidden: int,
    pooled: int | None,
    layer: str,
    precision: str,
) -> ModelSpec:
    outputs = [TensorSpec(HIDDEN_STATES, "float32", (BATCH, seq, hidden))]
    if pooled is not None:
        outputs.append(TensorSpec(POOLED, "float32", (BATCH, pooled)))
    return ModelSpec(
        role=role,
        pipeline_attr=attr,
        inputs=(TensorSpec(INPUT_IDS, "int64", (BATCH, seq), sample_range=(0, vocab)),),
        outputs=tuple(outputs),
        batch=BATCH_CFG,
        precision=precision,
        text_layer=layer,
    )


def _denoiser(
    attr: str,
    *,
    channels: int,
    context: tuple[int, int],
    extra: tuple[TensorSpec, ...],
    vae_scale_factor: int,
    precision: str,
) -> ModelSpec:
    latent = (BATCH, channels, LATENT_HEIGHT, LATENT_WIDTH)
    return ModelSpec(
        role=DENOISER,
        pipeline_attr=attr,
        inputs=(
            TensorSpec(SAMPLE, "float32", latent),
            TensorSpec(TIMESTEP, "float32", (BATCH,), sample_range=(0, 1000)),
            TensorSpec(ENCODER_HIDDEN_STATES, "float32", (BATCH, *context)),
            *extra,
        ),
        outputs=(TensorSpec(MODEL_OUTPUT, "float32", latent),),
        batch=BATCH_CFG_DRAFTS,
        precision=precision,
        vae_scale_factor=vae_scale_factor,
    )


def _vae_decoder(*, channels: int, vae_scale_factor: int, precision: str) -> ModelSpec:
    return ModelSpec(
        role=VAE_DECODER,
        pipeline_attr="vae",
        inputs=(TensorSpec(LATENT, "float32", (BATCH, channels, LATENT_HEIGHT, LATENT_WIDTH)),),
        outputs=(TensorSpec(IMAGE, "float32", (BATCH, 3, HEIGHT, WIDTH)),),
        batch=BATCH_SINGLE,
        precision=precision,
        vae_scale_factor=vae_scale_factor,
    )


def sd_family(
    name: str,
    *,
    text_hidden: int = 1024,
    vocab_size: int = 49408,
    seq: int = 77,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
    unet_levels: int = 4,
    default_size: int = 768,
    min_size: int = 256,
    max_size: int = 1024,
    scheduler_class: str = "DDIMScheduler",
    scheduler_config: Mapping[str, Any] | None = None,
    precision: str = "fp16",
    guidance_scale: float = 7.5,
    num_inference_steps: int = 50,
) -> FamilySpec:
    """A StableDiffusionPipeline family (SD 1.x/2.x layout); defaults are SD2.1-768."""
    config = dict(_SD21_SCHEDULER if scheduler_config is None else scheduler_config)
    s = vae_scale_factor
    return FamilySpec(
        name=name,
        pipeline_class="StableDiffusionPipeline",
        components={
            TEXT_ENCODER: _text_encoder(
                TEXT_ENCODER,
                "text_encoder",
                seq=seq,
                vocab=vocab_size,
                hidden=text_hidden,
                pooled=None,
                layer="last",
                precision=precision,
            ),
            DENOISER: _denoiser(
                "unet",
                channels=latent_channels,
                context=(seq, text_hidden),
                extra=(),
                vae_scale_factor=s,
                precision=precision,
            ),
            VAE_DECODER: _vae_decoder(
                channels=latent_channels, vae_scale_factor=s, precision=precision
            ),
        },
        conditioning="sd",
        latent_channels=latent_channels,
        vae_scale_factor=s,
        default_size=(default_size, default_size),
        min_size=min_size,
        max_size=max_size,
        size_multiple=s * 2 ** (unet_levels - 1),
        tokenizer_max_length=seq,
        scheduler_class=scheduler_class,
        scheduler_config=config,
        prediction_type=config.get("prediction_type", "epsilon"),
        precision=precision,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
    )


def sdxl_family(
    name: str,
    *,
    text_hidden: tuple[int, int] = (768, 1280),
    pooled_dim: int = 1280,
    vocab_size: int = 49408,
    seq: int = 77,
    latent_channels: int = 4,
    vae_scale_factor: int = 8,
    unet_levels: int = 3,
    default_size: int = 1024,
    min_size: int = 512,
    max_size: int = 1536,
    scheduler_class: str = "EulerDiscreteScheduler",
    scheduler_config: Mapping[str, Any] | None = None,
    precision: str = "fp16",
    vae_precision: str = "fp32",
    guidance_scale: float = 5.0,
    num_inference_steps: int = 50,
) -> FamilySpec:
    """A StableDiffusionXLPipeline family; defaults are SDXL-base-1.0.

    The SDXL VAE overflows in fp16 (diffusers' ``force_upcast``), so its decoder builds in fp32.
    """
    config = dict(_SDXL_SCHEDULER if scheduler_config is None else scheduler_config)
    s = vae_scale_factor
    d1, d2 = text_hidden
    encoders = dict(seq=seq, vocab=vocab_size, layer="penultimate", precision=precision)
    extra = (
        TensorSpec(TEXT_EMBEDS, "float32", (BATCH, pooled_dim)),
        TensorSpec(TIME_IDS, "float32", (BATCH, 6), sample_range=(0, max_size)),
    )
    return FamilySpec(
        name=name,
        pipeline_class="StableDiffusionXLPipeline",
        components={
            TEXT_ENCODER: _text_encoder(
                TEXT_ENCODER, "text_encoder", hidden=d1, pooled=None, **encoders
            ),
            TEXT_ENCODER_2: _text_encoder(
                TEXT_ENCODER_2, "text_encoder_2", hidden=d2, pooled=pooled_dim, **encoders
            ),
            DENOISER: _denoiser(
                "unet",
                channels=latent_channels,
                context=(seq, d1 + d2),
                extra=extra,
                vae_scale_factor=s,
                precision=precision,
            ),
            VAE_DECODER: _vae_decoder(
                channels=latent_channels, vae_scale_factor=s, precision=vae_precision
            ),
        },
        conditioning="sdxl",
        latent_channels=latent_channels,
        vae_scale_factor=s,
        default_size=(default_size, default_size),
        min_size=min_size,
        max_size=max_size,
        size_multiple=s * 2 ** (unet_levels - 1),
        tokenizer_max_length=seq,
        scheduler_class=scheduler_class,
        scheduler_config=config,
        prediction_type=config.get("prediction_type", "epsilon"),
        precision=precision,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        zero_empty_negative=True,
    )


def sd3_family(
    name: str,
    *,
    text_hidden: tuple[int, int] = (768, 1280),
    pooled_dims: tuple[int, int] = (768, 1280),
    joint_attention_dim: int = 4096,
    t5_sequence_length: int = 256,
    vocab_size: int = 49408,
    seq: int = 77,
    latent_channels: int = 16,
    vae_scale_factor: int = 8,
    patch_size: int = 2,
    default_size: int = 1024,
    min_size: int = 512,
    max_size: int = 1536,
    scheduler_config: Mapping[str, Any] | None = None,
    precision: str = "fp16",
    guidance_scale: float = 7.0,
    num_inference_steps: int = 28,
) -> FamilySpec:
    """A StableDiffusion3Pipeline family without T5; defaults are SD3-medium."""
    config = dict(_SD3_SCHEDULER if scheduler_config is None else scheduler_config)
    s = vae_scale_factor
    encoders = dict(seq=seq, vocab=vocab_size, layer="penultimate", precision=precision)
    context = (seq + t5_sequence_length, joint_attention_dim)
    extra = (TensorSpec(POOLED_PROJECTIONS, "float32", (BATCH, sum(pooled_dims))),)
    return FamilySpec(
        name=name,
        pipeline_class="StableDiffusion3Pipeline",
        components={
            TEXT_ENCODER: _text_encoder(
                TEXT_ENCODER,
                "text_encoder",
                hidden=text_hidden[0],
                pooled=pooled_dims[0],
                **encoders,
            ),
            TEXT_ENCODER_2: _text_encoder(
                TEXT_ENCODER_2,
                "text_encoder_2",
                hidden=text_hidden[1],
                pooled=pooled_dims[1],
                **encoders,
            ),
            DENOISER: _denoiser(
                "transformer",
                channels=latent_channels,
                context=context,
                extra=extra,
                vae_scale_factor=s,
                precision=precision,
            ),
            VAE_DECODER: _vae_decoder(
                channels=latent_channels, vae_scale_factor=s, precision=precision
            ),
        },
        conditioning="sd3",
        latent_channels=latent_channels,
        vae_scale_factor=s,
        default_size=(default_size, default_size),
        min_size=min_size,
        max_size=max_size,
        size_multiple=s * patch_size,
        tokenizer_max_length=seq,
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_config=config,
        prediction_type="flow",
        precision=precision,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        t5_sequence_length=t5_sequence_length,
    )


# Scheduler configs of the public checkpoints (scheduler/scheduler_config.json).
_SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
)
_SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# The tiny CPU family: the sizes of driffusion.export.tiny's SD2.1-like pipeline (64 px, 8x8
# latents, 32-wide CLIP). For any other StableDiffusionPipeline use family_for_pipeline.
_TINY = dict(
    text_hidden=32,
    vocab_size=657,
    unet_levels=2,
    default_size=64,
    min_size=32,
    max_size=256,
    precision="fp32",
    num_inference_steps=20,
)

FAMILIES: dict[str, FamilySpec] = {
    "sd21": sd_family("sd21"),
    "sdxl": sdxl_family("sdxl"),
    "sd3": sd3_family("sd3"),
    "sd-tiny": sd_family("sd-tiny", **_TINY),
}


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``; ValueError naming the allowed ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {name!r}") from None


def family_for_pipeline(name: str, pipe: Any, **overrides: Any) -> FamilySpec:
    """The spec of family ``name`` with every size read from a loaded diffusers ``pipe``.

    For checkpoints whose widths differ from the public ones (tiny test pipelines, fine-tunes):
    text widths, vocab, latent channels, VAE factor, default size, size multiple and the
    scheduler come from the pipeline's configs; the size range is the family's, or scaled with
    the default size where that lies outside it; everything else (precision, guidance, steps)
    comes from ``FAMILIES[name]``. ``overrides`` go to the family builder (``max_size=128``).
    """
    base = get_family(name)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scheduler = pipe.scheduler
    kw: dict[str, Any] = dict(
        vocab_size=pipe.text_encoder.config.vocab_size,
        seq=pipe.tokenizer.model_max_length,
        vae_scale_factor=vae_scale,
        scheduler_config={k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        guidance_scale=base.guidance_scale,
        num_inference_steps=base.num_inference_steps,
    )
    denoiser = getattr(pipe, base.components[DENOISER].pipeline_attr).config
    kw["latent_channels"] = denoiser.in_channels
    default = denoiser.sample_size * vae_scale
    ratio = default / base.default_size[0]
    if base.conditioning in ("sd", "sdxl"):
        kw["unet_levels"] = len(denoiser.block_out_channels)
        kw["scheduler_class"] = type(scheduler).__name__
        multiple = vae_scale * 2 ** (kw["unet_levels"] - 1)
    else:
        kw["patch_size"] = denoiser.patch_size
        multiple = vae_scale * denoiser.patch_size
    kw["default_size"] = default
    if base.min_size <= default <= base.max_size:  # a checkpoint of the public family's scale
        kw["min_size"], kw["max_size"] = base.min_size, base.max_size
    else:  # e.g. a tiny one: the range scales with the default size
        kw["min_size"] = max(multiple, _round_to(base.min_size * ratio, multiple))
        kw["max_size"] = max(default, _round_to(base.max_size * ratio, multiple))
    enc1 = pipe.text_encoder.config
    if base.conditioning == "sd":
        kw["text_hidden"] = enc1.hidden_size
        kw["precision"] = base.precision
        builder = sd_family
    elif base.conditioning == "sdxl":
        enc2 = pipe.text_encoder_2.config
        kw["text_hidden"] = (enc1.hidden_size, enc2.hidden_size)
        kw["pooled_dim"] = enc2.projection_dim
        kw["precision"] = base.precision
        kw["vae_precision"] = base.components[VAE_DECODER].precision
        builder = sdxl_family
    else:
        enc2 = pipe.text_encoder_2.config
        kw["text_hidden"] = (enc1.hidden_size, enc2.hidden_size)
        kw["pooled_dims"] = (enc1.projection_dim, enc2.projection_dim)
        kw["joint_attention_dim"] = denoiser.joint_attention_dim
        kw["t5_sequence_length"] = base.t5_sequence_length
        kw["precision"] = base.precision
        # The transformer's position embeddings cap the latent side.
        if denoiser.pos_embed_max_size is not None:
            cap = denoiser.pos_embed_max_size * denoiser.patch_size * vae_scale
            kw["max_size"] = min(kw["max_size"], cap)
        builder = sd3_family
    kw.update(overrides)
    return builder(name, **kw)


def _round_to(value: float, multiple: int) -> int:
    return int(round(value / multiple)) * multiple


def _check_int(field_name: str, value: int, low: int, high: int | None = None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{field_name} must be an integer {allowed}, got {value!r}")


__all__ = [
    "BATCH",
    "BATCH_CFG",
    "BATCH_CFG_DRAFTS",
    "BATCH_SINGLE",
    "DENOISER",
    "ENCODER_HIDDEN_STATES",
    "FAMILIES",
    "FP32_TENSORS",
    "HEIGHT",
    "HIDDEN_STATES",
    "IMAGE",
    "INPUT_IDS",
    "LATENT",
    "LATENT_HEIGHT",
    "LATENT_WIDTH",
    "MODEL_OUTPUT",
    "POOLED",
    "POOLED_PROJECTIONS",
    "PRECISIONS",
    "ROLES",
    "SAMPLE",
    "TEXT_EMBEDS",
    "TEXT_ENCODER",
    "TEXT_ENCODER_2",
    "TIMESTEP",
    "TIME_IDS",
    "VAE_DECODER",
    "WIDTH",
    "FamilySpec",
    "ModelSpec",
    "TensorSpec",
    "at_precision",
    "family_for_pipeline",
    "get_family",
    "sd3_family",
    "sd_family",
    "sdxl_family",
]


# --- precision: the served view of a family ------------------------------------------------

PRECISIONS = ("fp16", "fp32")
# Inputs that stay float32 at the boundary of an fp16 component: fractional timesteps (Euler,
# sigma * 1000 for SD3) and image sizes up to 4096 are not exact in float16, and the model turns
# both into sinusoidal embeddings computed in float32 (as diffusers does in an fp16 pipeline).
FP32_TENSORS = (TIMESTEP, TIME_IDS)


def at_precision(family: FamilySpec, precision: str) -> FamilySpec:
    """``family`` as exported and served at ``precision`` ("fp16" | "fp32").

    "fp32": every component fp32, every float tensor float32 (the CPU server's view).
    "fp16": each component whose ``precision`` in ``family`` is "fp16" gets fp16 weights and
    float16 tensors at its boundary, except ``FP32_TENSORS``; components that are fp32 there
    (SDXL's VAE, which overflows in fp16) stay fp32 with float32 tensors. The result is what
    the ONNX export, the engine build, ``config.pbtxt`` and the orchestrator read: the dtype in
    its TensorSpecs is the dtype sent and received. Apply it to a family as FAMILIES or
    ``family_for_pipeline`` give it (an fp32 view has forgotten which components may be fp16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    def tensor(t: TensorSpec, target: str) -> TensorSpec:
        if not np.issubdtype(np.dtype(t.dtype), np.floating):
            return t
        dtype = "float16" if target == "fp16" and t.name not in FP32_TENSORS else "float32"
        return replace(t, dtype=dtype)

    def component(spec: ModelSpec) -> ModelSpec:
        target = "fp16" if precision == "fp16" and spec.precision == "fp16" else "fp32"
        return replace(
            spec,
            precision=target,
            inputs=tuple(tensor(t, target) for t in spec.inputs),
            outputs=tuple(tensor(t, target) for t in spec.outputs),
        )

    components = {role: component(spec) for role, spec in family.components.items()}
    return replace(family, components=components, precision=components[DENOISER].precision)


# --- serialization (the model repository carries the spec it was built from) ----------------


def family_to_dict(family: FamilySpec) -> dict[str, Any]:
    """A JSON-ready dict of ``family``; :func:`family_from_dict` rebuilds it exactly."""
    from dataclasses import asdict

    return asdict(family)


def family_from_dict(data: Mapping[str, Any]) -> FamilySpec:
    """Inverse of :func:`family_to_dict` (lists back to tuples where the dataclasses hold them)."""

    def tensor(d: Mapping[str, Any]) -> TensorSpec:
        rng = d.get("sample_range")
        return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), tuple(rng) if rng else None)

    def model(d: Mapping[str, Any]) -> ModelSpec:
        fields = {k: v for k, v in d.items() if k not in ("inputs", "outputs")}
        ins = tuple(tensor(t) for t in d["inputs"])
        return ModelSpec(inputs=ins, outputs=tuple(tensor(t) for t in d["outputs"]), **fields)

    fields = dict(data)
    fields["components"] = {role: model(m) for role, m in data["components"].items()}
    fields["default_size"] = tuple(data["default_size"])
    return FamilySpec(**fields)
