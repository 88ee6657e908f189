"""``driffusion export``: a diffusers pipeline -> a complete Triton model repository.

    driffusion export --pipeline HUB_ID_OR_DIR --family sd21|sdxl|sd3 --out MODEL_REPOSITORY
                      [--engine onnx|tensorrt] [--precision fp16|fp32] [--gpus 0,1,2,3]
                      [--max-k 4] [--force]

``--engine onnx`` writes the repository the CPU server runs (``model_repository/build.py``);
``--engine tensorrt`` exports ONNX, builds strongly typed TensorRT engines on the first listed GPU
and writes ``tensorrt_plan`` models with one denoiser instance per listed GPU
(``model_repository/build_tensorrt.py``). ``--precision`` (default fp16 for tensorrt, fp32 for
onnx) sets the ONNX weights and the served tensors' dtypes (``specs.at_precision``); SDXL's VAE
stays fp32 either way. Re-running skips what is already built unless
``--force``. A failure prints the step, the component and why, and exits 1.

Heavy modules (torch, diffusers, TensorRT) are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAMILIES = ("sd21", "sdxl", "sd3")
ENGINES = ("onnx", "tensorrt")
PRECISIONS = ("fp16", "fp32")  # driffusion.specs.PRECISIONS (not imported: it loads numpy)
DEFAULT_PRECISION = {"onnx": "fp32", "tensorrt": "fp16"}


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"0,1,2,3"`` -> ``(0, 1, 2, 3)``; argparse error for anything else."""
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        gpus = ()
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(
            f"--gpus must be distinct GPU indices >= 0 separated by commas (e.g. 0,1,2,3), "
            f"got {text!r}"
        )
    return gpus


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def register(sub) -> None:
    """Add the ``export`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "export",
        help="export a diffusers pipeline and write a Triton model repository "
        "(ONNX for the CPU server, or TensorRT engines for GPUs)",
        description="Export a diffusers pipeline (text encoders, denoiser, VAE decoder) and "
        "write a complete Triton model repository. Re-running skips what is built (--force "
        "rebuilds).",
    )
    p.add_argument(
        "--pipeline",
        required=True,
        help="a diffusers pipeline: a local folder, or a hub id on a machine that can download "
        "(set HF_TOKEN for gated models)",
    )
    p.add_argument("--family", required=True, choices=FAMILIES, help="spec family of the pipeline")
    p.add_argument("--out", required=True, type=Path, help="the model repository to write")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="onnx",
        help="onnx: ONNX Runtime on the CPU (default); tensorrt: engines for this GPU model",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="weights and served tensors: fp16 (float16 at the engine boundary except timesteps; "
        "SDXL's VAE stays fp32) or fp32 (default: fp16 for tensorrt, fp32 for onnx)",
    )
    p.add_argument(
        "--gpus",
        type=parse_gpus,
        default=None,
        help="GPU indices, e.g. 0,1,2,3: one denoiser instance per GPU, the text encoders and "
        "VAE on the first (default 0 for tensorrt; for onnx the count sets the CPU denoiser "
        "instances, default 4)",
    )
    p.add_argument(
        "--max-k",
        type=positive_int,
        default=4,
        help="largest k a request may ask for; the denoiser engine covers batch 1..2*max-k "
        "(default 4)",
    )
    p.add_argument(
        "--orchestrator-instances",
        type=positive_int,
        default=4,
        help="requests served at once without queueing (default 4)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=18,
        help="ONNX opset of the TensorRT path's exports, >= 18 (default 18; the CPU repository "
        "is exported at build.py's opset 18)",
    )
    p.add_argument("--force", action="store_true", help="rebuild what is already built")
    g = p.add_argument_group("tensorrt")
    g.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the ONNX exports are kept (default: OUT.work beside the repository)",
    )
    g.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        help="TensorRT timing cache file, read and updated (default: WORK_DIR/timing.cache)",
    )
    g.add_argument(
        "--workspace-gib",
        type=float,
        default=None,
        help="cap on TensorRT's builder scratch memory in GiB (default: TensorRT's)",
    )
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Run ``driffusion export``; 0 on success, 1 with the reason on stderr."""
    try:
        if args.engine == "onnx":
            _export_onnx(args)
        else:
            _export_tensorrt(args)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the messages name the step and the component
        print(f"driffusion export: {exc}", file=sys.stderr)
        return 1
    return 0


def _export_onnx(args: argparse.Namespace) -> Path:
    from driffusion.model_repository.build import RepositorySettings, build_repository

    if args.opset != 18:
        raise ValueError(
            f"--opset applies to --engine tensorrt; the CPU repository uses 18, got {args.opset}"
        )
    kwargs = {} if args.gpus is None else {"denoiser_instances": len(args.gpus)}
    settings = RepositorySettings(
        family=args.family,
        orchestrator_instances=args.orchestrator_instances,
        max_k=args.max_k,
        precision=args.precision or DEFAULT_PRECISION["onnx"],
        **kwargs,
    )
    try:
        return build_repository(args.pipeline, args.out, settings, force=args.force, progress=_say)
    except Exception as exc:
        raise RuntimeError(
            f"building the ONNX repository {args.out} from {args.pipeline} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _export_tensorrt(args: argparse.Namespace) -> Path:
    from driffusion.model_repository.build_tensorrt import (
        TensorRTSettings,
        build_tensorrt_repository,
    )

    settings = TensorRTSettings(
        family=args.family,
        gpus=args.gpus or (0,),
        orchestrator_instances=args.orchestrator_instances,
        max_k=args.max_k,
        opset=args.opset,
        workspace_gib=args.workspace_gib,
        precision=args.precision or DEFAULT_PRECISION["tensorrt"],
    )
    return build_tensorrt_repository(
        args.pipeline,
        args.out,
        settings,
        work_dir=args.work_dir,
        timing_cache=args.timing_cache,
        force=args.force,
        progress=_say,
    )


def _say(message: str) -> None:
    print(message, flush=True)
