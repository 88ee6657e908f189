"""The ``driffusion`` command line: one subcommand per job, each defined next to its code."""

from __future__ import annotations

import argparse
import sys


def _gmm_demo(args: argparse.Namespace) -> int:
    """Sample an exact Gaussian-mixture model sequentially and with DRiffusion; print the table."""
    import torch

    from . import Schedule, sample
    from .gmm import GaussianMixture, mean_relative_deviation, sd_ddim_scheduler

    mixture, scheduler = GaussianMixture.default(), sd_ddim_scheduler(args.steps)
    schedule, denoise = (
        Schedule.from_diffusers(scheduler),
        mixture.denoiser(scheduler.alphas_cumprod),
    )
    x = torch.randn(args.samples, mixture.dim, generator=torch.Generator().manual_seed(args.seed))
    x = x.double()
    ref = sample(denoise, x, schedule, "sequential")
    print(
        f"DRiffusion on an exact 8-D Gaussian-mixture denoiser: DDIM, S={args.steps}, "
        f"{args.samples} samples"
    )
    print(f"{'mode':<13} {'k':>2} {'rounds':>6} {'ideal speedup':>13} {'deviation':>10}")
    for mode in ("sequential", "aggressive", "conservative"):
        for k in (1,) if mode == "sequential" else (1, 2, 4, 8):
            r = ref if mode == "sequential" else sample(denoise, x, schedule, mode, k=k)
            dev = mean_relative_deviation(r.sample, ref.sample)
            print(f"{mode:<13} {k:>2} {r.rounds:>6} {args.steps / r.rounds:>12.2f}x {dev:>10.3%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driffusion", description="DRiffusion parallel diffusion sampling, served by Triton."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gmm = sub.add_parser("gmm-demo", help=_gmm_demo.__doc__.splitlines()[0])
    gmm.add_argument("--steps", type=int, default=50, help="sampler steps S (default 50)")
    gmm.add_argument("--samples", type=int, default=4000, help="samples (default 4000)")
    gmm.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gmm.set_defaults(func=_gmm_demo)
    from .client import cli as client_cli  # generate, bench

    client_cli.register(sub)
    from .client import demo
    from .model_repository import serve

    serve.register(sub)
    demo.register(sub)
    from .export import cli as export_cli

    export_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
