"""Prompt-match accuracy and Frechet distance of a saved digits pipeline, judged by its classifier.

Loads the folder exactly as a user would (`DiffusionPipeline.from_pretrained`, no custom code),
samples a balanced set of digits with DDIM and scores them against the held-out real digits:

    nice -n 19 python -m training.eval_digits --model embedded/digits --n 200 --guidance 1.5 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline

from training.digits_classifier import accuracy, features, frechet_distance, load_classifier
from training.digits_data import PROMPT_TEMPLATES, load_digits_split, prompt_for

# Phrasings never seen in training (words outside the tokenizer's merges included).
UNSEEN_TEMPLATES = (
    "draw the number {n}",
    "a scribbled {w}",
    "the figure {n}",
    "show me a {n}",
    "THE NUMBER {n}",
    "a {w}, handwritten",
    "{n} drawn by a child",
    "an old photo of a {w} digit",
)


@torch.no_grad()
def sample_digits(pipe, labels, template, steps, guidance, size, seed, batch=100) -> torch.Tensor:
    """(N, 3, size, size) in [0, 1] for the prompts `template` filled with `labels`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(labels), batch):
        prompts = [prompt_for(int(y), template) for y in labels[i : i + batch]]
        images = pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=gen,
            output_type="np",
        ).images  # (B, H, W, 3) in [0, 1]
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2))
    return torch.cat(out)


def evaluate(
    model: str | Path,
    n: int = 200,
    steps: int = 20,
    guidances: tuple[float, ...] = (1.5, 3.0),
    all_templates: bool = True,
    seed: int = 0,
) -> dict:
    """Accuracy (and FD against the held-out digits) per guidance scale, canonical prompt; with
    `all_templates`, also the accuracy for every training phrasing and for unseen phrasings, at the
    first guidance scale."""
    model = Path(model)
    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(model / "classifier")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    real = load_digits_split(size)
    real_feats = features(classifier, torch.from_numpy(real.test_images))
    labels = np.arange(n) % 10
    report: dict = {"n": n, "steps": steps, "size": size, "canonical_prompt": PROMPT_TEMPLATES[0]}
    for g in guidances:
        start = time.time()
        images = sample_digits(pipe, labels, PROMPT_TEMPLATES[0], steps, g, size, seed)
        acc = accuracy(classifier, images, labels)
        fd = frechet_distance(features(classifier, images), real_feats)
        report[f"guidance_{g}"] = {"accuracy": acc, "frechet": fd, "seconds": time.time() - start}
        print(
            f"[eval] guidance {g}: accuracy {acc:.3f}, FD {fd:.2f} "
            f"({time.time() - start:.0f} s, {n} samples, {steps} DDIM steps)",
            flush=True,
        )
    if all_templates:
        g = guidances[0]
        k = max(10, n // len(PROMPT_TEMPLATES) // 10 * 10)
        for name, templates in (("templates", PROMPT_TEMPLATES), ("unseen", UNSEEN_TEMPLATES)):
            per = {
                t: accuracy(
                    classifier,
                    sample_digits(pipe, labels[:k], t, steps, g, size, seed + j),
                    labels[:k],
                )
                for j, t in enumerate(templates)
            }
            mean, worst = float(np.mean(list(per.values()))), min(per, key=per.get)
            report[name] = {
                "guidance": g,
                "n_per_template": k,
                "mean_accuracy": mean,
                "per_template": per,
            }
            print(
                f"[eval] guidance {g}, {len(templates)} {name} phrasings x {k}: mean accuracy "
                f"{mean:.3f}, worst {per[worst]:.2f} ({worst!r})",
                flush=True,
            )
    report["real_frechet_train_vs_held_out"] = frechet_distance(
        features(classifier, torch.from_numpy(real.train_images)), real_feats
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded/digits")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 3.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-templates", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    evaluate(args.model, args.n, args.steps, tuple(args.guidance), not args.no_templates, args.seed)


if __name__ == "__main__":
    main()
