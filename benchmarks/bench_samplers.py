"""The multistep and ancestral samplers on the exact Gaussian mixture: rounds, deviation, sliced W1.

    .venv/bin/python benchmarks/bench_samplers.py [--samples 10000]

Writes the ``samplers`` section of BENCHMARKS.md (the core table of ``bench_core.py`` for
DPM-Solver++ 2M, DPM++ 2M Karras, UniPC, PNDM and Euler ancestral), plus the host time per round
of each sampler's drafting and refinement. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from driffusion import Schedule, sample
from driffusion.gmm import GaussianMixture, mean_relative_deviation, sliced_wasserstein
from report import write_section

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SAMPLERS = {  # served name -> scheduler with Stable Diffusion's betas (epsilon)
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD),
    "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True),
    "unipc": lambda: UniPCMultistepScheduler(**SD),
    "pndm": lambda: PNDMScheduler(
        **SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    ),
    "euler_ancestral": lambda: EulerAncestralDiscreteScheduler(**SD),
    "ddim (reference)": lambda: DDIMScheduler(
        **SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    ),
}
STEPS = (20, 25, 50)
TOLERANCE = 1.05  # a cell "breaks" when its sliced W1 exceeds sequential's by more than 5%


def quality_table(samples: int) -> tuple[str, list[str]]:
    mixture = GaussianMixture.default()
    data = mixture.sample_data(samples, torch.Generator().manual_seed(2))
    rows = [
        "| sampler | S | mode | k | rounds | evaluations | ideal speedup | deviation | "
        "sliced W1 to data | W1 / sequential's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    broken = []
    for name, make in SAMPLERS.items():
        for steps in STEPS:
            scheduler = make()
            scheduler.set_timesteps(steps)
            schedule = Schedule.from_diffusers(scheduler)
            # the exact denoiser by step index: Karras timesteps repeat at S=50 (rounding)
            schedule = dataclasses.replace(schedule, timesteps=torch.arange(schedule.num_steps))
            denoise = mixture.denoiser_for(scheduler, by_index=True)
            x = torch.randn(
                samples,
                mixture.dim,
                generator=torch.Generator().manual_seed(1),
                dtype=torch.float64,
            )
            x = x * float(scheduler.init_noise_sigma)

            def run(mode, k, schedule=schedule, denoise=denoise, x=x):
                g = torch.Generator().manual_seed(3)  # Euler ancestral's step noise
                return sample(denoise, x, schedule, mode, k=k, generator=g)

            ref = run("sequential", 1)
            floor = sliced_wasserstein(ref.sample, data)
            cells = [("sequential", 1, ref)]
            cells += [(m, k, run(m, k)) for m in ("aggressive", "conservative") for k in (2, 3, 4)]
            for mode, k, r in cells:
                dev = mean_relative_deviation(r.sample, ref.sample)
                sw = sliced_wasserstein(r.sample, data)
                rows.append(
                    f"| {name} | {steps} | {mode} | {k} | {r.rounds} | {r.evaluations} | "
                    f"{ref.rounds / r.rounds:.2f} | {dev:.2%} | {sw:.4f} | {sw / floor:.3f} |"
                )
                if sw > TOLERANCE * floor:
                    broken.append(f"{name}, S={steps}, {mode} k={k}: W1 {sw / floor - 1:+.1%}")
            print(f"{name} S={steps} done", flush=True)
    return "\n".join(rows), broken


def host_time_table(repeats: int = 5) -> str:
    """Drafting + refinement per round at SDXL's latent size with a free model (k=4)."""
    rows = [
        "| sampler | mode | k | rounds | drafting + refinement, ms/round |",
        "|---|---|---|---|---|",
    ]
    x = torch.randn(1, 4, 128, 128)
    for name, make in SAMPLERS.items():
        scheduler = make()
        scheduler.set_timesteps(50)
        schedule = Schedule.from_diffusers(scheduler)
        ready = {}

        def free(x, t, ready=ready):
            if x.shape[0] not in ready:
                ready[x.shape[0]] = torch.randn_like(x) * 0.1
            return ready[x.shape[0]]

        for mode, k in (("sequential", 1), ("aggressive", 4), ("conservative", 4)):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                r = sample(free, x, schedule, mode, k=k, generator=torch.Generator())
                times.append((time.perf_counter() - start) / r.rounds * 1e3)
            rows.append(f"| {name} | {mode} | {k} | {r.rounds} | {statistics.median(times):.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000, help="mixture samples per cell")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quality, broken = quality_table(args.samples)
    host = host_time_table()
    breaks = "\n".join(f"- {b}" for b in broken) or "- none"
    title = "Samplers: DPM-Solver++, UniPC, PNDM, Euler ancestral"
    body = f"""## {title} (`benchmarks/bench_samplers.py`)

The core table for the multistep and ancestral samplers (docs/samplers.md: their jumps and
refinements). Analytic 8-D Gaussian mixture with exact epsilon at the noise level each timestep is
evaluated at (`GaussianMixture.denoiser_for`), SD "scaled_linear" betas, diffusers' default
settings of each scheduler, {args.samples} samples; DDIM as the reference. *ideal speedup*:
sequential rounds / rounds (PNDM makes S + 1 model calls, so its sequential run has S + 1
rounds). *deviation*: mean relative deviation from the sequential sample of the same noise (and,
for Euler ancestral, the same step noise). *sliced W1*: distance to {args.samples} exact data
draws; the last column divides it by the sequential sampler's own.

{quality}

Cells whose sliced W1 exceeds the sequential sampler's by more than 5% (computed by the script):

{breaks}

### Host time per round (drafting and refinement; the denoiser free)

S=50, one SDXL-size latent (4, 128, 128), one torch thread. The multistep samplers pay for their
history (one to three more tensor passes per step than DDIM).

{host}
"""
    write_section("samplers", body)


if __name__ == "__main__":
    main()
