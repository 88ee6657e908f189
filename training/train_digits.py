"""Train the embedded digits model: a tiny latent diffusion model, saved as StableDiffusionPipeline.

Stages, each on the training split of scikit-learn's digits (16x16, gray replicated to RGB):
  1. the digit classifier that judges the samples (`digits_classifier.py`);
  2. an AutoencoderKL, 16x16x3 <-> 8x8x4 latents; `scaling_factor` = 1 / std of the latents;
  3. a UNet2DConditionModel (v-prediction, DDPM cosine schedule) jointly with a 2-layer CLIP text
     encoder over an offline CLIPTokenizer; 10% empty prompts for classifier-free guidance, EMA;
then the pipeline is saved, reloaded with `DiffusionPipeline.from_pretrained` and evaluated
(`eval_digits.py`). Run from the repository root, under `nice` on a shared machine:

    nice -n 19 python -m training.train_digits --out embedded/digits --minutes 30 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch.nn import functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.digits_classifier import save_classifier, train_classifier
from training.digits_data import load_digits_split, prompt_corpus, random_prompts, to_model_range
from training.digits_tokenizer import build_tokenizer
from training.eval_digits import evaluate


@dataclass
class Config:
    size: int = 16  # image side in px (8x8 digits, NEAREST-upsampled)
    # VAE: one downsampling (2 blocks) -> latent (4, size/2, size/2)
    vae_channels: tuple[int, ...] = (16, 32)
    vae_norm_groups: int = 8
    latent_channels: int = 4
    vae_steps: int = 300
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-3  # per latent element, relative to the pixel MSE
    # UNet over the 8x8 latent: 8 -> 4, cross-attention at 4x4 and in the mid block
    unet_channels: tuple[int, ...] = (32, 64)
    unet_down: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_heads: int = 4
    unet_steps: int = 1500  # upper bound; --minutes may shorten it (the record says how many ran)
    budget_check_step: int = 50  # steps timed before fitting unet_steps into the budget (< warmup)
    unet_batch: int = 128
    images_per_prompt: int = 4  # a batch holds unet_batch / images_per_prompt distinct prompts
    unet_lr: float = 1e-3
    unet_lr_final: float = 1e-4  # cosine decay target
    warmup_steps: int = 100
    ema_decay: float = 0.999
    p_empty_prompt: float = 0.1
    p_filler_word: float = 0.3  # prompts with a made-up word inserted (robustness to new phrasings)
    # text encoder (trained jointly with the UNet)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # noise schedule, shared by training (DDPM) and the saved sampler (DDIM)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    # evaluation after training
    eval_samples: int = 200
    eval_steps: int = 20
    eval_guidance: tuple[float, ...] = (1.5, 3.0)
    seed: int = 0


def build_vae(cfg: Config) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.size,
    )


def build_unet(cfg: Config) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.size // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=cfg.unet_down,
        up_block_types=cfg.unet_up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' name for the number of heads
        use_linear_projection=True,  # as SD2.1
        norm_num_groups=32,
    )


def build_text_encoder(cfg: Config, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            hidden_act="gelu",
            projection_dim=cfg.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def noise_schedule(cfg: Config) -> dict:
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


class Progress:
    """Prints `stage step/total, loss, elapsed, ETA` about every `every_s` seconds."""

    def __init__(self, stage: str, total: int, every_s: float = 30.0):
        self.stage, self.total, self.every_s = stage, total, every_s
        self.start = self.last = time.time()

    def update(self, step: int, total: int, **metrics: float) -> None:
        now = time.time()
        if now - self.last < self.every_s and step + 1 < total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / (step + 1) * (total - step - 1)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(
            f"[{self.stage}] {step + 1}/{total} {shown} "
            f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
            flush=True,
        )


def train_vae(cfg: Config, images: torch.Tensor) -> AutoencoderKL:
    """images: (N, 3, H, W) in [-1, 1]. Loss: pixel MSE + kl_weight * KL per latent element."""
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    progress = Progress("vae", cfg.vae_steps)
    for step in range(cfg.vae_steps):
        x = images[torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = F.mse_loss(vae.decode(z).sample, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = recon + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.update(step, cfg.vae_steps, mse=recon.item(), kl=kl.item())
    return vae.eval().requires_grad_(False)


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay, self.n = params, decay, 0
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        decay = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def train_unet(
    cfg: Config,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    images: torch.Tensor,  # (N, 3, H, W) in [-1, 1]
    labels: torch.Tensor,  # (N,) int64
    deadline: float | None,
) -> tuple[UNet2DConditionModel, CLIPTextModel, int]:
    """Latent diffusion training, v-prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1-a) x0.

    With a `deadline` (time.time() value), the step count is fitted to it once, after
    `budget_check_step` steps: still inside the warm-up, whose LR does not depend on the total, so
    `--unet-steps <steps run> --minutes 0` replays the run exactly. Should the machine slow down
    later, training stops at the deadline (the record then shows fewer steps than planned).
    """
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean, posterior.std  # (N, 4, 8, 8) each; sampled afresh every step
    by_label = [torch.nonzero(labels == y).flatten() for y in range(10)]
    scaling = vae.config.scaling_factor
    unet, text_encoder = build_unet(cfg), build_text_encoder(cfg, tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = EMA(params, cfg.ema_decay)
    train_sched = DDPMScheduler(**noise_schedule(cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = random.Random(cfg.seed)
    total = cfg.unet_steps
    progress = Progress("unet", total)
    step = 0
    while step < total:
        lr = _lr(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        # B / r prompts, each shared by r images of its digit: the text encoder runs on 77 tokens
        # and cost about a third of a step when every image had its own prompt.
        n_prompts = cfg.unet_batch // cfg.images_per_prompt
        prompt_labels = labels[torch.randint(0, len(labels), (n_prompts,), generator=gen)]
        prompts = random_prompts(prompt_labels.tolist(), rng, cfg.p_empty_prompt, cfg.p_filler_word)
        idx = torch.stack(
            [
                by_label[y][
                    torch.randint(0, len(by_label[y]), (cfg.images_per_prompt,), generator=gen)
                ]
                for y in prompt_labels.tolist()
            ]
        ).flatten()  # (B,), r consecutive images per prompt
        noise = torch.randn(mean[idx].shape, generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen)
        xt = train_sched.add_noise(x0, noise, t)
        target = train_sched.get_velocity(x0, noise, t)
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        cond = text_encoder(ids)[0]  # (B / r, 77, hidden): last_hidden_state, as the SD pipeline
        cond = cond.repeat_interleave(cfg.images_per_prompt, dim=0)  # (B, 77, hidden)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        progress.update(step, total, loss=loss.item(), lr=lr)
        step += 1
        if deadline is not None and step == cfg.budget_check_step:
            per_step = (time.time() - progress.start) / step
            fit = step + int((deadline - time.time()) / per_step)
            if fit < total:
                print(
                    f"[unet] {per_step:.2f} s/step: {total} -> {fit} steps to fit the budget",
                    flush=True,
                )
                total = progress.total = max(fit, cfg.warmup_steps)
        if deadline is not None and time.time() > deadline and step < total:
            print(f"[unet] budget spent: stopping at step {step} of {total}", flush=True)
            total = step
    ema.copy_to_params()
    return unet.eval(), text_encoder.eval(), total


def _lr(cfg: Config, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.unet_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.unet_lr_final + (cfg.unet_lr - cfg.unet_lr_final) * cosine


def sampler(cfg: Config) -> DDIMScheduler:
    """DDIM as in SD configs; no x0 clipping: latents are not bounded to [-1, 1]."""
    return DDIMScheduler(
        **noise_schedule(cfg),
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the embedded digits pipeline.")
    parser.add_argument("--out", default="embedded/digits")
    parser.add_argument(
        "--minutes",
        type=float,
        default=30.0,
        help="wall-clock budget for training, evaluation not included; the UNet "
        "runs fewer steps if needed (0: no limit, fully reproducible)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=Config.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=Config.unet_steps)
    parser.add_argument("--eval-samples", type=int, default=Config.eval_samples)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is fastest on a busy machine (2 threads under contention ran 5x "
        "slower per step, waiting on each other), 2 is about 1.7x faster on an idle 2-core one",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config(
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        eval_samples=args.eval_samples,
    )
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    start = time.time()
    budget_end = start + args.minutes * 60

    data = load_digits_split(cfg.size)
    images = to_model_range(data.train_images)  # (N, 3, 16, 16) in [-1, 1]
    labels = torch.from_numpy(data.train_labels)

    classifier, clf_acc = train_classifier(cfg.size, seed=cfg.seed)
    save_classifier(classifier, out / "classifier", clf_acc)
    print(f"[classifier] held-out accuracy {clf_acc:.4f} ({time.time() - start:.0f} s)", flush=True)

    vae = train_vae(cfg, images)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    print(
        f"[vae] latent std {z.std():.4f} -> scaling_factor {vae.config.scaling_factor:.4f}",
        flush=True,
    )

    tokenizer = build_tokenizer(prompt_corpus())
    deadline = None if args.minutes <= 0 else budget_end
    unet, text_encoder, steps = train_unet(cfg, vae, tokenizer, images, labels, deadline)
    train_s = time.time() - start

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    report = evaluate(out, n=cfg.eval_samples, steps=cfg.eval_steps, guidances=cfg.eval_guidance)
    record = {
        "config": asdict(cfg) | {"unet_steps_run": steps},
        "train_seconds": round(train_s),
        "torch_threads": torch.get_num_threads(),
        "classifier_held_out_accuracy": clf_acc,
        "eval": report,
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"done in {(time.time() - start) / 60:.1f} min -> {out}")


if __name__ == "__main__":
    main()
