"""Tiny random-weight SD2.1-, SDXL- and SD3-like diffusers pipelines, built from config offline.

They stand in for the real checkpoints in tests and on CPU: same pipeline classes, same component
types, same scheduler configs and the same conditioning wiring (penultimate CLIP states, SDXL's
``text_embeds``/``time_ids``, SD3's pooled projections and zero T5 context), with every model a few
hundred thousand parameters. Nothing is downloaded: the CLIP tokenizers are built from a vocab and
merges generated here.

    build_tiny_pipeline("sdxl", "out/tiny-sdxl")  # -> Path; reload with from_pretrained(dir)

Sizes: 64x64 px images, 8x8 latents (VAE scale factor 8 as in the real models), 77-token prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from driffusion.families import get_family

# CLIP's byte-level alphabet; the real OpenAI/OpenCLIP vocab starts with these 256 symbols, then the
# same symbols with the end-of-word suffix, then the merges, then the two special tokens.
_END_OF_WORD = "</w>"
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
# A few words get whole-word merges, so common prompts tokenize to word-level ids like real CLIP.
_WORDS = (
    "a an the of and in on with photo picture painting drawing portrait cat dog horse astronaut "
    "riding red green blue black white small large digit zero one two three four five six seven "
    "eight nine landscape mountain city sky sea forest"
).split()

TINY_FAMILIES = ("sd21", "sd-tiny", "sdxl", "sd3")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable characters, in CLIP's vocab order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a small CLIP BPE that can encode any text.

    Every byte has a token with and without the end-of-word suffix (so any prompt encodes without
    unknown tokens); the words in ``_WORDS`` get left-to-right merges. Layout as in CLIP's vocab, so
    "!" is id 0 (the OpenCLIP padding token) and ``<|endoftext|>`` the last id.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + _END_OF_WORD for c in alphabet]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + _END_OF_WORD]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                tokens.append(merged)
                seen.add(merged)
            left = merged
    tokens += [_BOS, _EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    # tokenizers 0.23 wants the merges as tuples, not "a b" strings.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _text_encoder(hidden: int, *, projection_dim: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = tiny_clip_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # >= 2, so "penultimate layer" (SDXL, SD3) differs from the last
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",  # SD2.1/SDXL-G/SD3-G use gelu; CLIP-L uses quick_gelu: either works
        bos_token_id=vocab[_BOS],
        eos_token_id=vocab[_EOS],  # pooled output = state at the first <|endoftext|>
        pad_token_id=1,
        projection_dim=projection_dim or hidden,
    )
    torch.manual_seed(seed)
    if projection_dim is None:
        return CLIPTextModel(config).eval()
    return CLIPTextModelWithProjection(config).eval()


def _vae(latent_channels: int, *, sd3: bool, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = (
        # SD3's VAE: 16 channels, no quant convs, a shift factor.
        dict(
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        if sd3
        else dict(scaling_factor=0.18215)
    )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks -> scale factor 8, as real ones
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=64,
        **extra,
    ).eval()


def _sd21_components(seed: int) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    hidden = 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=hidden,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as SD2.x
        upcast_attention=True,  # as SD2.1-768
    ).eval()
    # SD2.1-768's scheduler: DDIM, v-prediction, "leading" spacing.
    scheduler = DDIMScheduler(**get_family("sd21").scheduler_config)
    return dict(
        vae=_vae(4, sd3=False, seed=seed + 1),
        text_encoder=_text_encoder(hidden, projection_dim=None, seed=seed + 2),
        tokenizer=_tokenizer(pad_token="!"),  # OpenCLIP pads with "!" (id 0)
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_components(seed: int) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    # Two encoders of different widths so a swapped concatenation cannot go unnoticed.
    hidden_1, hidden_2, projection_2 = 32, 48, 40
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=hidden_1 + hidden_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 time ids (original size, crop top-left, target size) + pooled text embeds.
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_2,
    ).eval()
    scheduler = EulerDiscreteScheduler(**get_family("sdxl").scheduler_config)
    return dict(
        vae=_vae(4, sd3=False, seed=seed + 1),
        text_encoder=_text_encoder(hidden_1, projection_dim=None, seed=seed + 2),
        text_encoder_2=_text_encoder(hidden_2, projection_dim=projection_2, seed=seed + 3),
        tokenizer=_tokenizer(pad_token=_EOS),  # CLIP-L pads with <|endoftext|>
        tokenizer_2=_tokenizer(pad_token="!"),  # OpenCLIP-G pads with "!"
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _sd3_components(seed: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    hidden_1, projection_1 = 32, 32
    hidden_2, projection_2 = 48, 40
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        # The CLIP states (32 + 48) are zero-padded to the T5 width, as in SD3 (768+1280 -> 4096).
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=projection_1 + projection_2,
        pos_embed_max_size=16,  # latents up to 32x32 (256 px)
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**get_family("sd3").scheduler_config)  # shift 3
    return dict(
        vae=_vae(16, sd3=True, seed=seed + 1),
        text_encoder=_text_encoder(hidden_1, projection_dim=projection_1, seed=seed + 2),
        text_encoder_2=_text_encoder(hidden_2, projection_dim=projection_2, seed=seed + 3),
        text_encoder_3=None,
        tokenizer=_tokenizer(pad_token=_EOS),
        tokenizer_2=_tokenizer(pad_token="!"),
        tokenizer_3=None,
        transformer=transformer,
        scheduler=scheduler,
    )


def build_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random-weight pipeline of ``family`` from config and save it to ``out_dir``.

    ``family``: "sd21" or "sd-tiny" (StableDiffusionPipeline, DDIM, v-prediction), "sdxl"
    (StableDiffusionXLPipeline, EulerDiscrete) or "sd3" (StableDiffusion3Pipeline without T5,
    FlowMatchEulerDiscrete with shift 3). Reload with
    ``DiffusionPipeline.from_pretrained(out_dir, local_files_only=True)``; for SD3 also pass
    ``text_encoder_3=None, tokenizer_3=None``. Same seed, same weights.
    """
    from diffusers import (
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    builders = {  # keys: TINY_FAMILIES
        "sd21": (StableDiffusionPipeline, _sd21_components),
        "sd-tiny": (StableDiffusionPipeline, _sd21_components),
        "sdxl": (StableDiffusionXLPipeline, _sdxl_components),
        "sd3": (StableDiffusion3Pipeline, _sd3_components),
    }
    if family not in builders:
        raise ValueError(f"family must be one of {sorted(builders)}, got {family!r}")
    pipeline_class, components = builders[family]
    pipe = pipeline_class(**components(seed))
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "driffusion_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return out_dir


def load_tiny_pipeline(path: str | Path):
    """Reload a pipeline saved by :func:`build_tiny_pipeline`, offline (SD3 without T5)."""
    from .pipelines import load_pipeline

    return load_pipeline(path, local_files_only=True)
