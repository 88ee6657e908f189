"""The quality benchmark's sampling through the real Triton server: served images against the
library's (the diffusers pipeline, with ``parallelize`` for DRiffusion).

    cd benchmarks && ../.venv/bin/python bench_quality_served.py [--images 50] [--steps 50]

The embedded digits model is served exactly as ``driffusion serve`` serves it (ONNX Runtime
text encoder, denoiser and VAE decoder in Triton, the orchestrator's BLS model); each image's
prompt, seed, steps and guidance are sent over gRPC and also given to the diffusers pipeline in
this process. Reported per mode: classifier accuracy of the served images, how far they are from
the library's (uint8 levels, PSNR) and, for DRiffusion, their PSNR against the served sequential
image (the library's numbers are in the ``quality`` section). Writes the ``quality-served``
section of BENCHMARKS.md. Not a test (tests/test_embedded.py checks one image per mode).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from driffusion import parallelize
from driffusion.client import DriffusionClient, psnr
from driffusion.export.pipelines import load_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.paths import embedded_dir
from driffusion.model_repository.server import TritonServer
from driffusion.service import k_spec
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `training` is a folder of the repository, not an installed package

from training.digits_classifier import load_classifier, predict  # noqa: E402
from training.digits_data import prompt_for  # noqa: E402

MODES = [  # (mode, k, k_schedule)
    ("sequential", 1, "fixed"),
    ("aggressive", 4, "fixed"),
    ("aggressive", 4, "ramp"),
    ("conservative", 4, "fixed"),
]


def library_image(pipe, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
    image = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    return (image * 255).round().astype(np.uint8)  # as the server's postprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="per mode, digits 0-9 in turn")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    EMBEDDED = embedded_dir() / "digits"
    pipe = load_pipeline(EMBEDDED)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(EMBEDDED / "classifier")
    work = Path(tempfile.mkdtemp(prefix="driffusion-quality-served-"))
    repo = build_repository(EMBEDDED, work / "repo", RepositorySettings(), progress=print)
    labels = np.arange(args.images) % 10
    served: dict[tuple, np.ndarray] = {}
    rows = [
        "| mode | k | k_schedule | rounds | served accuracy | max uint8 diff served vs library "
        "| pixels that differ | PSNR served vs library dB | PSNR vs served sequential dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    start = time.perf_counter()
    with TritonServer.on_free_ports(repo) as server:
        with DriffusionClient(server.grpc_url) as client:
            client.wait_ready(timeout_s=300)
            for mode, k, schedule in MODES:
                if mode != "sequential":
                    parallelize(pipe, mode=mode, k=k_spec(k, schedule))
                images, refs, rounds = [], [], set()
                for i, label in enumerate(labels):
                    prompt = prompt_for(int(label))
                    out = client.generate(
                        prompt,
                        steps=args.steps,
                        seed=i,
                        guidance_scale=args.guidance,
                        mode=mode,
                        k=k,
                        k_schedule=schedule,
                    )
                    images.append(out.image)
                    rounds.add(out.rounds)
                    refs.append(library_image(pipe, prompt, i, args.steps, args.guidance))
                if mode != "sequential":
                    pipe.driffusion.restore()
                images, refs = np.stack(images), np.stack(refs)
                served[(mode, k, schedule)] = images
                diff = np.abs(images.astype(int) - refs)
                tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
                acc = float((predict(classifier, tensor) == labels).mean())
                vs_lib = psnr(images, refs)  # over the whole set: most images are identical
                seq = served[("sequential", 1, "fixed")]
                vs_seq = (
                    "-"
                    if mode == "sequential"
                    else f"{np.mean([psnr(a, b) for a, b in zip(images, seq, strict=True)]):.1f}"
                )
                rows.append(
                    f"| {mode} | {k if mode != 'sequential' else '-'} | {schedule} "
                    f"| {'/'.join(map(str, sorted(rounds)))} | {acc:.1%} | {diff.max()} "
                    f"| {(diff > 0).mean():.2%} | {vs_lib:.1f} | {vs_seq} |"
                )
                print(rows[-1], flush=True)
    minutes = (time.perf_counter() - start) / 60
    title = "Image quality through the server: served against the library"
    body = f"""## {title} (`benchmarks/bench_quality_served.py`)

The embedded digits model served as `driffusion serve` serves it (ONNX Runtime components in
Triton, the BLS orchestrator), S={args.steps}, guidance {args.guidance}, {args.images} images per
mode (digits 0-9 in turn, seed = image index), every image also sampled by the diffusers pipeline
(with `parallelize` for DRiffusion) from the same prompt and seed. *max uint8 diff* and *pixels
that differ*: served against library, after both round to uint8 (ONNX Runtime against torch
float math); *PSNR served vs library* over the whole set (inf: all identical); *PSNR vs served
sequential* the mean over images, as in the ``quality`` section.
Took {minutes:.0f} min on this machine.

{chr(10).join(rows)}
"""
    write_section("quality-served", body)


if __name__ == "__main__":
    main()
