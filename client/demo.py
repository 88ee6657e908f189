"""``driffusion demo``: the main job, end to end on this machine.

Builds (or reuses) the model repository of the embedded model, starts a real Triton server on free
local ports, runs ``driffusion bench`` against it over gRPC (sequential vs DRiffusion on one seed:
latency, rounds, image difference, PNGs), then stops the server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PROMPT = "a handwritten digit seven"


def demo(args: argparse.Namespace) -> int:
    from driffusion.cli import build_parser
    from driffusion.model_repository.serve import prepare_repository
    from driffusion.model_repository.server import TritonServer, find_free_ports

    print("== DRiffusion demo: draft-and-refine sampling served by Triton ==", flush=True)
    repository = prepare_repository(args)
    http, grpc, metrics = find_free_ports(3)
    server = TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    print(f"[demo] starting tritonserver (gRPC {server.grpc_url}) ...", flush=True)
    with server:
        print(f"[demo] server ready; log {server.log_path}", flush=True)
        if args.emulated_latency_ms:
            print(
                f"[demo] every denoiser call is padded to >= {args.emulated_latency_ms:g} ms, "
                f"standing for one GPU per denoiser instance ({args.denoiser_instances} "
                "instances); --emulated-latency-ms 0 shows raw CPU time",
                flush=True,
            )
        bench = [
            "bench", "--url", server.grpc_url, "--prompt", args.prompt, "--mode", args.mode,
            "--k", str(args.k), "--steps", str(args.steps), "--seed", str(args.seed),
            "--repeats", str(args.repeats), "--out-dir", str(args.out_dir),
        ]  # fmt: skip
        bench_args = build_parser().parse_args(bench)
        code = bench_args.func(bench_args)
    print("[demo] server stopped", flush=True)
    if code == 0:
        side = side_by_side(
            [args.out_dir / "sequential.png", args.out_dir / f"{args.mode}-k{args.k}.png"],
            args.out_dir / "comparison.png",
        )
        print(f"[demo] sequential | {args.mode} k={args.k}, enlarged: {side}")
    return code


def side_by_side(paths: list[Path], out: Path, height: int = 256) -> Path:
    """The images next to each other, enlarged (nearest neighbour) to ``height`` pixels."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    scaled = [im.resize((im.width * height // im.height, height), Image.NEAREST) for im in images]
    gap = 8
    canvas = Image.new(
        "RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white"
    )
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    canvas.save(out)
    return out


def register(sub) -> None:
    from driffusion.model_repository.serve import BUILD, add_repository_arguments

    p = sub.add_parser(
        "demo",
        help="the main job: serve the embedded model, compare sequential and DRiffusion over gRPC",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"default {DEFAULT_PROMPT!r}")
    p.add_argument(
        "--mode",
        default="aggressive",
        choices=("aggressive", "conservative"),
        help="DRiffusion mode compared with sequential (default aggressive)",
    )
    p.add_argument("--k", type=int, default=4, help="drafts per round (default 4)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (default 3)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=BUILD / "demo",
        help="where the PNGs go (default .build/demo)",
    )
    add_repository_arguments(p)
    p.set_defaults(func=demo, emulated_latency_ms=50.0)
    for action in p._actions:  # the demo's default differs from serve's: say so in --help
        if action.dest == "emulated_latency_ms":
            action.help = "pad every denoiser call to at least this long (default 50 ms here)"
