"""One spec per model family (SD 1.x/2.x, SDXL, SD3): its components and serving defaults.

A :class:`FamilySpec` is what the repository builder, the engine builds and the orchestrator need
to know about a pipeline: the components' tensor contracts (:mod:`driffusion.tensors`), the latent
geometry, the sizes it serves, the tokenizer context, the default sampler and guidance. The public
checkpoints' families are in :data:`FAMILIES`; a pipeline of other widths (a fine-tune, a tiny test
model) gets its own spec from ``driffusion.export.introspect.family_for_pipeline``.

    fam = get_family("sdxl")
    fam.components["denoiser"].input_names          # ('sample', 'timestep', ...)
    fam.trt_profiles(max_k=4)["denoiser"]["sample"]  # ((1,4,64,64), (8,4,128,128), (8,4,192,192))

Needs only numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from .tensors import (
    BATCH,
    BATCH_CFG,
    BATCH_CFG_DRAFTS,
    BATCH_SINGLE,
    DENOISER,
    ENCODER_HIDDEN_STATES,
    HEIGHT,
    HIDDEN_STATES,
    IMAGE,
    INPUT_IDS,
    LATENT,
    LATENT_HEIGHT,
    LATENT_MEAN,
    LATENT_STD,
    LATENT_WIDTH,
    MODEL_OUTPUT,
    PIXELS,
    POOLED,
    POOLED_PROJECTIONS,
    SAMPLE,
    TEXT_EMBEDS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ROLES,
    TIME_IDS,
    TIMESTEP,
    VAE_DECODER,
    VAE_ENCODER,
    WIDTH,
    ModelSpec,
    TensorSpec,
    check_int,
    model_from_dict,
)

CONDITIONINGS = (
    "sd",
    "sdxl",
    "sd3",
)  # how denoiser inputs come from text (driffusion.conditioning)


@dataclass(frozen=True)
class FamilySpec:
    """Everything the server needs to know about one model family."""

    name: str
    components: dict[str, ModelSpec]  # role -> spec, in pipeline order (encoders, denoiser, vae)
    conditioning: str  # one of CONDITIONINGS
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    default_size: tuple[int, int]  # (height, width) in pixels
    min_size: int  # smallest side in pixels served (and covered by the TensorRT profiles)
    max_size: int  # largest side in pixels served (and covered by the TensorRT profiles)
    size_multiple: int  # height and width must be multiples (vae factor x UNet downsampling/patch)
    tokenizer_max_length: int  # CLIP context, prompts padded/truncated to this
    scheduler_class: str  # diffusers scheduler class name of the default sampler
    scheduler_config: dict[str, Any]  # its config (as in the checkpoint's scheduler_config.json)
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
        return tuple(r for r in self.components if r in TEXT_ROLES)

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless (height, width) is a size the exported models accept."""
        for field_name, value in (("height", height), ("width", width)):
            check_int(field_name, value, self.min_size, self.max_size)
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
        max_images: int = 1,
    ) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
        """{role: {input: (min, opt, max) shape}} for up to ``max_k`` drafts per round of up to
        ``max_images`` images.

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
            profiles[role] = spec.trt_profile(
                max_k, (lo, lo), opt, (hi, hi), opt_batch=ob, max_images=max_images
            )
        return profiles

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` rebuilds the spec exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FamilySpec:
        fields = dict(data)
        fields["components"] = {role: model_from_dict(m) for role, m in data["components"].items()}
        fields["default_size"] = tuple(data["default_size"])
        return cls(**fields)


# --- components -------------------------------------------------------------------------------


def _text_encoder(
    role: str, *, seq: int, vocab: int, hidden: int, pooled: int | None, layer: str, precision: str
) -> ModelSpec:
    outputs = [TensorSpec(HIDDEN_STATES, "float32", (BATCH, seq, hidden))]
    if pooled is not None:
        outputs.append(TensorSpec(POOLED, "float32", (BATCH, pooled)))
    return ModelSpec(
        role=role,
        pipeline_attr=role,  # the pipeline attribute is named like the role
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


def _vae_encoder(*, channels: int, vae_scale_factor: int, precision: str) -> ModelSpec:
    latent = (BATCH, channels, LATENT_HEIGHT, LATENT_WIDTH)
    return ModelSpec(
        role=VAE_ENCODER,
        pipeline_attr="vae",
        inputs=(TensorSpec(PIXELS, "float32", (BATCH, 3, HEIGHT, WIDTH), sample_range=(0, 1)),),
        outputs=(
            TensorSpec(LATENT_MEAN, "float32", latent),
            TensorSpec(LATENT_STD, "float32", latent),
        ),
        batch=BATCH_SINGLE,
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


def _family(
    name: str,
    *,
    encoders: list[ModelSpec],
    denoiser: ModelSpec,
    vae_precision: str,
    latent_channels: int,
    vae_scale_factor: int,
    default_size: int,
    size_multiple: int,
    seq: int,
    **rest: Any,
) -> FamilySpec:
    """What the three families share: components in pipeline order and the geometry."""
    vae = dict(channels=latent_channels, vae_scale_factor=vae_scale_factor, precision=vae_precision)
    return FamilySpec(
        name=name,
        components={
            spec.role: spec
            for spec in (*encoders, denoiser, _vae_decoder(**vae), _vae_encoder(**vae))
        },
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale_factor,
        default_size=(default_size, default_size),
        size_multiple=size_multiple,
        tokenizer_max_length=seq,
        **rest,
    )


# --- the families ---------------------------------------------------------------------------


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
    s = vae_scale_factor
    encoder = _text_encoder(
        TEXT_ENCODER,
        seq=seq,
        vocab=vocab_size,
        hidden=text_hidden,
        pooled=None,
        layer="last",
        precision=precision,
    )
    denoiser = _denoiser(
        "unet",
        channels=latent_channels,
        context=(seq, text_hidden),
        extra=(),
        vae_scale_factor=s,
        precision=precision,
    )
    return _family(
        name,
        encoders=[encoder],
        denoiser=denoiser,
        vae_precision=precision,
        conditioning="sd",
        latent_channels=latent_channels,
        vae_scale_factor=s,
        default_size=default_size,
        min_size=min_size,
        max_size=max_size,
        size_multiple=s * 2 ** (unet_levels - 1),
        seq=seq,
        scheduler_class=scheduler_class,
        scheduler_config=dict(SD21_SCHEDULER if scheduler_config is None else scheduler_config),
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

    The SDXL VAE overflows in fp16 (diffusers' ``force_upcast``), so its decoder stays fp32.
    """
    s = vae_scale_factor
    d1, d2 = text_hidden
    common = dict(seq=seq, vocab=vocab_size, layer="penultimate", precision=precision)
    encoders = [
        _text_encoder(TEXT_ENCODER, hidden=d1, pooled=None, **common),
        _text_encoder(TEXT_ENCODER_2, hidden=d2, pooled=pooled_dim, **common),
    ]
    extra = (
        TensorSpec(TEXT_EMBEDS, "float32", (BATCH, pooled_dim)),
        TensorSpec(TIME_IDS, "float32", (BATCH, 6), sample_range=(0, max_size)),
    )
    denoiser = _denoiser(
        "unet",
        channels=latent_channels,
        context=(seq, d1 + d2),
        extra=extra,
        vae_scale_factor=s,
        precision=precision,
    )
    return _family(
        name,
        encoders=encoders,
        denoiser=denoiser,
        vae_precision=vae_precision,
        conditioning="sdxl",
        latent_channels=latent_channels,
        vae_scale_factor=s,
        default_size=default_size,
        min_size=min_size,
        max_size=max_size,
        size_multiple=s * 2 ** (unet_levels - 1),
        seq=seq,
        scheduler_class=scheduler_class,
        scheduler_config=dict(SDXL_SCHEDULER if scheduler_config is None else scheduler_config),
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
    s = vae_scale_factor
    common = dict(seq=seq, vocab=vocab_size, layer="penultimate", precision=precision)
    encoders = [
        _text_encoder(role, hidden=hidden, pooled=pooled, **common)
        for role, hidden, pooled in zip(TEXT_ROLES, text_hidden, pooled_dims, strict=True)
    ]
    denoiser = _denoiser(
        "transformer",
        channels=latent_channels,
        context=(seq + t5_sequence_length, joint_attention_dim),
        extra=(TensorSpec(POOLED_PROJECTIONS, "float32", (BATCH, sum(pooled_dims))),),
        vae_scale_factor=s,
        precision=precision,
    )
    return _family(
        name,
        encoders=encoders,
        denoiser=denoiser,
        vae_precision=precision,
        conditioning="sd3",
        latent_channels=latent_channels,
        vae_scale_factor=s,
        default_size=default_size,
        min_size=min_size,
        max_size=max_size,
        size_multiple=s * patch_size,
        seq=seq,
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        scheduler_config=dict(SD3_SCHEDULER if scheduler_config is None else scheduler_config),
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        t5_sequence_length=t5_sequence_length,
    )


# Scheduler configs of the public checkpoints (scheduler/scheduler_config.json).
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
)
SDXL_SCHEDULER = dict(
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
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

BUILDERS = {"sd": sd_family, "sdxl": sdxl_family, "sd3": sd3_family}  # by conditioning
FAMILIES: dict[str, FamilySpec] = {
    "sd21": sd_family("sd21"),
    "sdxl": sdxl_family("sdxl"),
    "sd3": sd3_family("sd3"),
}
FAMILY_NAMES = tuple(FAMILIES)


# --- precision: the served view of a family ------------------------------------------------

PRECISIONS = ("fp16", "fp32")
# Inputs that stay float32 at the boundary of an fp16 component: fractional timesteps (Euler,
# sigma * 1000 for SD3) and image sizes up to 4096 are not exact in float16, and the model turns
# both into sinusoidal embeddings computed in float32 (as diffusers does in an fp16 pipeline).
FP32_TENSORS = (TIMESTEP, TIME_IDS)
_FLOATS = ("float16", "float32", "float64")


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
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    def tensor(t: TensorSpec, target: str) -> TensorSpec:
        if t.dtype not in _FLOATS:
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

    return replace(family, components={r: component(s) for r, s in family.components.items()})


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``; ValueError naming the allowed ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}") from None
