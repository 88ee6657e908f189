"""The contract of every exported component: tensor names, dtypes, shapes and batch ranges.

ONNX export, the TensorRT engine build, ``config.pbtxt``, the orchestrator and the client read
tensor names from here; no tensor name is typed anywhere else.

Components (``ModelSpec.role``) and their tensors:

    text_encoder(_2)  input_ids int64 (batch, seq)
                      -> hidden_states (batch, seq, D)  the states the pipeline feeds the denoiser
                         [pooled (batch, P)]            projected EOS state, where used
    denoiser          sample (batch, C, latent_height, latent_width), timestep (batch,),
                      encoder_hidden_states (batch, S, D)
                      [+ text_embeds (batch, P), time_ids (batch, 6)]   SDXL
                      [+ pooled_projections (batch, P1 + P2)]           SD3
                      -> model_output (batch, C, latent_height, latent_width)  raw eps / v / flow
    vae_decoder       latent (batch, C, latent_height, latent_width)  as sampled (scaled)
                      -> image (batch, 3, height, width)  RGB in [0, 1] (clamped), NCHW
    vae_encoder       pixels (batch, 3, height, width)  RGB in [0, 1], NCHW (img2img)
                      -> latent_mean, latent_std (batch, C, latent_height, latent_width): the
                         latent distribution, already scaled as the sampler's latents are

``timestep`` is float for every family: DDIM's integer timesteps are exact in float32, Euler's are
fractional, and SD3's are sigma * 1000. String dims are dynamic axes; ints are fixed.

Needs only numpy, so the client and the Triton python stubs can import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# Component roles; each is one ONNX file / one Triton model.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
DENOISER = "denoiser"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
ROLES = (TEXT_ENCODER, TEXT_ENCODER_2, DENOISER, VAE_DECODER, VAE_ENCODER)
TEXT_ROLES = (TEXT_ENCODER, TEXT_ENCODER_2)

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
PIXELS = "pixels"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"

# Dynamic dims. latent_height = height // vae_scale_factor (same for width).
BATCH = "batch"
HEIGHT = "height"
WIDTH = "width"
LATENT_HEIGHT = "latent_height"
LATENT_WIDTH = "latent_width"

# How a component's batch range follows the number of drafts k.
BATCH_CFG_DRAFTS = "cfg_drafts"  # 1 .. 2*k*n: a round of k drafts of n images, with CFG pairs
BATCH_CFG = "cfg"  # 1 .. 2: prompt and negative prompt
BATCH_SINGLE = "single"  # 1 .. n: one latent or image per image of the request

Shape = tuple[int | str, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: numpy dtype string and shape (str = dynamic dim, int = fixed)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64"
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
    # families.at_precision() gives the served view, whose tensors' dtypes follow it.
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

    def max_batch(self, max_k: int, max_images: int = 1) -> int:
        """Largest batch this component sees with up to ``max_k`` drafts per round and
        ``max_images`` images per request."""
        check_int("max_k", max_k, 1)
        check_int("max_images", max_images, 1)
        sizes = {BATCH_CFG_DRAFTS: 2 * max_k * max_images, BATCH_CFG: 2, BATCH_SINGLE: max_images}
        return sizes[self.batch]

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
        max_images: int = 1,
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT (min, opt, max) shape per input; sizes are (height, width) in pixels.

        Batch runs from 1 to ``max_batch(max_k, max_images)``; opt is a full round of CFG drafts
        of one image (``max_batch(max_k)``) unless ``opt_batch`` is given.
        """
        top = self.max_batch(max_k, max_images)
        if opt_batch is None:
            opt_batch = self.max_batch(max_k)
        check_int("opt_batch", opt_batch, 1, top)
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


def tensor_from_dict(d: Mapping) -> TensorSpec:
    rng = d.get("sample_range")
    return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), tuple(rng) if rng else None)


def model_from_dict(d: Mapping) -> ModelSpec:
    """Inverse of ``dataclasses.asdict`` for a ModelSpec (lists back to tuples)."""
    fields = {k: v for k, v in d.items() if k not in ("inputs", "outputs")}
    ins = tuple(tensor_from_dict(t) for t in d["inputs"])
    return ModelSpec(inputs=ins, outputs=tuple(tensor_from_dict(t) for t in d["outputs"]), **fields)


def check_int(field_name: str, value: int, low: int, high: int | None = None) -> None:
    """ValueError naming ``field_name`` and the allowed range unless ``value`` is an int in it."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{field_name} must be an integer {allowed}, got {value!r}")


def check_shapes(
    declared: Mapping[str, Shape], bounds: Mapping[str, tuple[int, int]], got: Mapping[str, tuple]
) -> None:
    """Raise ValueError unless every tensor of ``got`` ({name: shape}) fits its ``declared`` shape:
    fixed dims equal, each named dim the same size in every tensor and within ``bounds``
    ({dim: (low, high)}). What an internal model checks before it allocates anything."""
    seen: dict[str, int] = {}
    for name, shape in got.items():
        want = declared.get(name)
        if want is None:
            raise ValueError(f"unexpected input {name!r}; inputs are {sorted(declared)}")
        if len(shape) != len(want):
            raise ValueError(f"{name} must have {len(want)} dims {list(want)}, got {list(shape)}")
        for axis, (dim, size) in enumerate(zip(want, shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise ValueError(f"{name} dim {axis} must be {dim}, got {size}")
                continue
            low, high = bounds.get(dim, (1, None))
            if size < low or (high is not None and size > high):
                raise ValueError(
                    f"{name} dim {axis} ({dim}) must be in [{low}, {high}], got {size}"
                )
            if seen.setdefault(dim, size) != size:
                raise ValueError(
                    f"{name} dim {axis} ({dim}) is {size}, another input's is "
                    f"{seen[dim]}: they must agree"
                )
