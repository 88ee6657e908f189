"""Image quality of DRiffusion with the multistep samplers on the embedded digits model.

    cd benchmarks && nice -n 5 ../.venv/bin/python bench_quality_samplers.py [--images 500]

The digits pipeline with its DDIM replaced by DPM-Solver++ 2M and by UniPC (``make_scheduler``
from its own config), S=20, guidance 3.0, the same balanced prompts and noise in every cell as
``bench_quality.py``, judged by the model's own classifier: prompt-match accuracy, Frechet distance
to the held-out real digits in the classifier's feature space, PSNR against the same sampler's
sequential images. Writes the ``quality-samplers`` section of BENCHMARKS.md. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_quality import PSNR_CAP, TEMPLATE, psnr
from diffusers import DiffusionPipeline

from driffusion import count_rounds, parallelize
from driffusion.samplers import make_scheduler
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `training` is a folder of the repository

from training.digits_classifier import (  # noqa: E402
    accuracy,
    features,
    frechet_distance,
    load_classifier,
)
from training.digits_data import load_digits_split  # noqa: E402
from training.eval_digits import sample_digits  # noqa: E402

SAMPLERS = ("dpmpp_2m", "unipc")
CELLS = [("sequential", 1)] + [(m, k) for m in ("aggressive", "conservative") for k in (2, 3, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "embedded" / "digits"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    classifier = load_classifier(Path(args.model) / "classifier")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    real = load_digits_split(size)
    real_feats = features(classifier, torch.from_numpy(real.test_images))
    labels = np.arange(args.images) % 10
    rows = []
    for name in SAMPLERS:
        pipe.scheduler = make_scheduler(name, own.config)
        reference = None
        for mode, k in CELLS:
            if mode == "sequential":
                if hasattr(pipe, "driffusion"):
                    pipe.driffusion.restore()
                    del pipe.driffusion
            else:
                parallelize(pipe, mode=mode, k=k)
            start = time.time()
            images = sample_digits(
                pipe,
                labels,
                TEMPLATE,
                args.steps,
                args.guidance,
                size,
                args.seed,
                batch=args.images,
            )
            seconds = time.time() - start
            feats = features(classifier, images)
            scored = psnr(images, reference) if reference is not None else None
            if mode == "sequential":
                reference = images
            rounds = count_rounds(args.steps, mode, k)[0]
            rows.append(
                (
                    name,
                    mode,
                    k,
                    rounds,
                    accuracy(classifier, images, labels),
                    frechet_distance(feats, real_feats),
                    scored,
                )
            )
            print(rows[-1], f"{seconds:.0f} s", flush=True)
        if hasattr(pipe, "driffusion"):
            pipe.driffusion.restore()
            del pipe.driffusion
    lines = [
        "## Image quality with DPM-Solver++ 2M and UniPC on the digits model "
        "(`benchmarks/bench_quality_samplers.py`)",
        "",
        f"The embedded digits pipeline with its scheduler replaced by each sampler (built from "
        f"its own config), S={args.steps}, guidance {args.guidance:g}, {args.images} images per "
        "cell (balanced digits 0-9, the same noise in every cell), judged by the model's own "
        "classifier: *accuracy* (prompt match), *Frechet distance* to the held-out real digits in "
        f"its feature space (lower is better), *PSNR* against the same sampler's sequential images "
        f"(capped at {PSNR_CAP:g} dB).",
        "",
        "| sampler | mode | k | rounds | ideal speedup | accuracy | Frechet distance | PSNR dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, mode, k, rounds, acc, fd, p in rows:
        lines.append(
            f"| {name} | {mode} | {k if mode != 'sequential' else '-'} | {rounds} | "
            f"{args.steps / rounds:.2f} | {acc:.1%} | {fd:.2f} | "
            f"{'-' if p is None else f'{p:.1f}'} |"
        )
    write_section("quality-samplers", "\n".join(lines))


if __name__ == "__main__":
    main()
