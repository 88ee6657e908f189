"""A family spec read off a loaded diffusers pipeline (export time only).

The public checkpoints' specs live in :mod:`driffusion.families`; a pipeline whose widths differ
(a fine-tune, a tiny test model, the embedded digits model) gets its spec here, from its own
component configs.
"""

from __future__ import annotations

from typing import Any

from driffusion.families import BUILDERS, FamilySpec, get_family
from driffusion.tensors import DENOISER, VAE_DECODER


def family_for_pipeline(name: str, pipe: Any, **overrides: Any) -> FamilySpec:
    """The spec of family ``name`` with every size read from a loaded diffusers ``pipe``.

    Text widths, vocab, latent channels, VAE factor, default size, size multiple and the
    scheduler come from the pipeline's configs; the size range is the family's, or scaled with
    the default size where that lies outside it; everything else (precision, guidance, steps)
    comes from ``FAMILIES[name]``. ``overrides`` go to the family builder (``max_size=128``).
    """
    base = get_family(name)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scheduler = pipe.scheduler
    denoiser_spec = base.components[DENOISER]
    kw: dict[str, Any] = dict(
        vocab_size=pipe.text_encoder.config.vocab_size,
        seq=pipe.tokenizer.model_max_length,
        vae_scale_factor=vae_scale,
        scheduler_config={k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        guidance_scale=base.guidance_scale,
        num_inference_steps=base.num_inference_steps,
        precision=denoiser_spec.precision,
    )
    denoiser = getattr(pipe, denoiser_spec.pipeline_attr).config
    kw["latent_channels"] = denoiser.in_channels
    default = denoiser.sample_size * vae_scale
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
        ratio = default / base.default_size[0]
        kw["min_size"] = max(multiple, _round_to(base.min_size * ratio, multiple))
        kw["max_size"] = max(default, _round_to(base.max_size * ratio, multiple))
    enc1 = pipe.text_encoder.config
    if base.conditioning == "sd":
        kw["text_hidden"] = enc1.hidden_size
    else:
        enc2 = pipe.text_encoder_2.config
        kw["text_hidden"] = (enc1.hidden_size, enc2.hidden_size)
    if base.conditioning == "sdxl":
        kw["pooled_dim"] = enc2.projection_dim
        kw["vae_precision"] = base.components[VAE_DECODER].precision
    elif base.conditioning == "sd3":
        kw["pooled_dims"] = (enc1.projection_dim, enc2.projection_dim)
        kw["joint_attention_dim"] = denoiser.joint_attention_dim
        kw["t5_sequence_length"] = base.t5_sequence_length
        # The transformer's position embeddings cap the latent side.
        if denoiser.pos_embed_max_size is not None:
            cap = denoiser.pos_embed_max_size * denoiser.patch_size * vae_scale
            kw["max_size"] = min(kw["max_size"], cap)
    kw.update(overrides)
    return BUILDERS[base.conditioning](name, **kw)


def _round_to(value: float, multiple: int) -> int:
    return int(round(value / multiple)) * multiple
