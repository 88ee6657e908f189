"""Pipeline components wrapped so that their positional inputs and outputs are the spec's tensors.

One wrapper per role, used by every engine: traced into ONNX (``driffusion.export.onnx``, then
TensorRT) and run directly by PyTorch (the ``torch`` engine's runner):

- text encoders return the hidden states the pipeline feeds the denoiser (SD 1/2: the last layer
  after the final layer norm; SDXL and SD3: ``hidden_states[-2]``) and, where the spec lists
  ``pooled``, the projected EOS state (``text_embeds``);
- the denoiser returns the raw model output (eps, v or flow velocity, per the family);
- the VAE decoder undoes the latent scaling (1 / scaling_factor, SD3's shift_factor, SDXL-style
  latents_mean/std when configured) and returns the image as RGB in [0, 1], clamped, as diffusers'
  postprocessing does before quantizing to uint8.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from driffusion import tensors
from driffusion.families import FamilySpec
from driffusion.tensors import ModelSpec


class WrapError(ValueError):
    """The pipeline lacks the component a spec names."""


class TextEncoderWrapper(nn.Module):
    """input_ids -> hidden_states [, pooled], as the family's pipeline reads the CLIP outputs."""

    def __init__(self, encoder: nn.Module, spec: ModelSpec):
        super().__init__()
        if spec.text_layer not in ("last", "penultimate"):
            raise ValueError(f"text_layer must be 'last' or 'penultimate', got {spec.text_layer!r}")
        self.encoder = encoder
        self.penultimate = spec.text_layer == "penultimate"
        self.pooled = tensors.POOLED in spec.output_names

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        if not self.pooled:
            return hidden
        # CLIPTextModelWithProjection: text_embeds; plain CLIPTextModel: pooler_output.
        pooled = getattr(out, "text_embeds", None)
        return hidden, out.pooler_output if pooled is None else pooled


class DenoiserWrapper(nn.Module):
    """UNet2DConditionModel or SD3Transformer2DModel with the spec's inputs -> raw model output."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.names = spec.input_names
        self.is_unet = spec.pipeline_attr == "unet"

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = dict(zip(self.names, inputs, strict=True))
        timestep = x[tensors.TIMESTEP].to(torch.float32)  # (B,) float for every family
        if self.is_unet:
            added = None
            if tensors.TEXT_EMBEDS in x:  # SDXL "text_time" additional conditions
                added = {"text_embeds": x[tensors.TEXT_EMBEDS], "time_ids": x[tensors.TIME_IDS]}
            return self.model(
                x[tensors.SAMPLE],
                timestep,
                encoder_hidden_states=x[tensors.ENCODER_HIDDEN_STATES],
                added_cond_kwargs=added,
                return_dict=False,
            )[0]
        return self.model(
            hidden_states=x[tensors.SAMPLE],
            timestep=timestep,
            encoder_hidden_states=x[tensors.ENCODER_HIDDEN_STATES],
            pooled_projections=x[tensors.POOLED_PROJECTIONS],
            return_dict=False,
        )[0]


class _Vae(nn.Module):
    """The VAE with the pipeline's latent scaling: ``scaling_factor``, SD3's ``shift_factor``,
    SDXL-style ``latents_mean``/``latents_std`` when configured."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        c = cfg.latent_channels
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.has_stats = mean is not None and std is not None
        if self.has_stats:
            self.register_buffer("latents_mean", torch.tensor(mean).view(1, c, 1, 1).float())
            self.register_buffer("latents_std", torch.tensor(std).view(1, c, 1, 1).float())


class VaeEncoderWrapper(_Vae):
    """RGB image in [0, 1], (B, 3, H, W) -> the scaled latent distribution (mean, std), as the
    img2img pipelines scale ``vae.encode(image).latent_dist``: a latent is ``mean + std * z``
    with the request's generator drawing z (diffusers' ``latent_dist.sample(generator)``)."""

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(2 * pixels - 1, return_dict=False)[0]  # image in [-1, 1]
        mean, std = dist.mean, dist.std
        if self.has_stats:  # StableDiffusionXLImg2ImgPipeline with latents_mean/std
            scale = self.scaling_factor / self.latents_std
            return (mean - self.latents_mean) * scale, std * scale
        # SD: z * scaling_factor; SD3: (z - shift_factor) * scaling_factor
        return (mean - self.shift_factor) * self.scaling_factor, std * self.scaling_factor


class VaeDecoderWrapper(_Vae):
    """Sampled latent -> RGB image in [0, 1], (B, 3, H, W)."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.has_stats:  # as StableDiffusionXLPipeline with latents_mean/std in the config
            latent = latent * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latent = latent / self.scaling_factor
        if self.shift_factor:  # SD3: z / scaling_factor + shift_factor
            latent = latent + self.shift_factor
        image = self.vae.decode(latent, return_dict=False)[0]  # [-1, 1]
        return (image / 2 + 0.5).clamp(0, 1)


def wrap_component(pipe: Any, spec: ModelSpec) -> nn.Module:
    """The export wrapper of ``spec.role`` around the pipeline's module (eval mode)."""
    module = getattr(pipe, spec.pipeline_attr, None)
    if module is None:
        raise WrapError(f"{spec.role}: the pipeline has no {spec.pipeline_attr!r} component")
    if spec.role in (tensors.TEXT_ENCODER, tensors.TEXT_ENCODER_2):
        wrapper: nn.Module = TextEncoderWrapper(module, spec)
    elif spec.role == tensors.DENOISER:
        wrapper = DenoiserWrapper(module, spec)
    elif spec.role == tensors.VAE_DECODER:
        wrapper = VaeDecoderWrapper(module)
    elif spec.role == tensors.VAE_ENCODER:
        wrapper = VaeEncoderWrapper(module)
    else:
        raise WrapError(f"unknown role {spec.role!r}; allowed: {tensors.ROLES}")
    return wrapper.eval()


def fit_preview(vae, family: FamilySpec, samples: int = 16, seed: int = 0):
    """A linear latent -> RGB map for cheap previews: least squares from latents to the VAE's
    decoded colours (averaged over each latent cell's pixels), on random latents at the family's
    smallest size. Returns ((C x 3 weights), (3 biases)) as plain floats."""
    import torch.nn.functional as F

    side = family.min_size // family.vae_scale_factor
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(samples, family.latent_channels, side, side, generator=g)
    with torch.no_grad():
        decoder = VaeDecoderWrapper(vae).eval()
        dtype = next(vae.parameters()).dtype
        image = decoder(latents.to(dtype)).float()  # (N, 3, H, W) in [0, 1]
    colours = F.avg_pool2d(image, family.vae_scale_factor)  # (N, 3, side, side)
    x = latents.permute(0, 2, 3, 1).reshape(-1, family.latent_channels)
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution  # (C + 1, 3)
    weights, bias = solution[:-1], solution[-1]
    return tuple(tuple(float(v) for v in row) for row in weights), tuple(float(v) for v in bias)
