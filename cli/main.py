"""The ``driffusion`` command line: every subcommand's flags, in one place.

Each command is argparse on top of typed library functions (``build_repository``,
``prepare_repository``, ``serve``, ``DriffusionClient``, ``compare``, ``run_demo``); nothing below
this file takes an ``argparse.Namespace``. Request flags are made from ``api.INPUTS`` (name, type,
help): a flag left out is not sent, so the server's default applies. Heavy modules (torch,
diffusers, TensorRT, the server) are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from driffusion import api
from driffusion.families import FAMILY_NAMES
from driffusion.samplers import SAMPLERS

from .progress import ProgressBar, progress

ENGINES = ("onnx", "tensorrt", "torch")  # as driffusion.model_repository.build.ENGINES
DEFAULT_URL = "localhost:8001"
DEFAULT_WAIT_S = 30.0
SERVER_HINT = "is the server running? start it with `driffusion serve`"
_CHOICES = {
    api.MODE: api.MODES,
    api.K_SCHEDULE: api.K_SCHEDULES,
    api.FANOUT: api.FANOUTS,
    api.SCHEDULER: SAMPLERS,
}
_TYPES = {"BYTES": str, "INT64": int, "INT32": int, "FP32": float}


# --- argument types ----------------------------------------------------------------------------


def positive_int(text: str, least: int = 1) -> int:
    """An int >= ``least`` (1), else an argparse error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
    return value


def count(text: str) -> int:
    """An int >= 0."""
    return positive_int(text, least=0)


def lora_arg(text: str):
    """``PATH[:SCALE]`` -> ``Lora``; argparse error for a bad scale."""
    from driffusion.export.lora import Lora

    try:
        return Lora.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def gpu_list(text: str) -> tuple[int, ...]:
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


# --- flag groups ------------------------------------------------------------------------------


def _repository_flags(parser: argparse.ArgumentParser, *, export: bool = False) -> None:
    """Which pipeline is served and how: shared by export, serve and demo."""
    g = parser.add_argument_group("model repository")
    g.add_argument(
        "--pipeline",
        required=export,
        help="a diffusers pipeline: a local folder, or a hub id on a machine that can download "
        "(set HF_TOKEN for gated models)" + ("" if export else "; default: the embedded model"),
    )
    g.add_argument(
        "--family",
        choices=FAMILY_NAMES,
        required=export,
        default=None if export else "sd21",
        help="spec family of the pipeline" + ("" if export else " (default sd21)"),
    )
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="onnx",
        help="onnx: ONNX Runtime on the CPU (default); tensorrt: TensorRT engines built for this "
        "machine's GPU model; torch: the pipeline's modules run by PyTorch (fp16 on GPUs, fp32 "
        "on the CPU)",
    )
    g.add_argument(
        "--gpus",
        type=gpu_list,
        default=(),
        help="GPU indices, e.g. 0,1,2,3: one denoiser instance per GPU (tensorrt, torch), the "
        "other models on the first; default none (CPU)",
    )
    g.add_argument(
        "--denoiser-instances",
        type=positive_int,
        default=None,
        help="denoiser instances in all (default: one per GPU, or 4 on the CPU; torch may run "
        "several on each GPU)",
    )
    g.add_argument(
        "--orchestrator-instances",
        type=positive_int,
        default=4,
        help="requests served at once without queueing (default %(default)s)",
    )
    g.add_argument(
        "--max-k",
        type=positive_int,
        default=4 if export else 8,
        help="largest k a request may ask for; the denoiser takes batches up to 2*max-k "
        "(default %(default)s)",
    )
    g.add_argument(
        "--max-images",
        type=positive_int,
        default=4,
        help="largest num_images a request may ask for; with --max-k it bounds the denoiser's "
        "batch, 2*max-k*max-images rows (default %(default)s)",
    )
    g.add_argument(
        "--stream-instances",
        type=count,
        default=1,
        help="instances of driffusion_stream, the model that streams progress (default "
        "%(default)s; 0: not served)",
    )
    g.add_argument(
        "--precision",
        choices=("fp16", "fp32"),
        default=None,
        help="weights of the GPU engines (default fp16 on GPUs; the CPU runs fp32)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=float,
        default=300.0,
        help="a request still running after this long fails with a deadline error "
        "(default %(default)s; a client's own shorter timeout also applies)",
    )
    g.add_argument(
        "--lora",
        dest="loras",
        type=lora_arg,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA fused into the denoiser and text encoders before export (repeatable; scale "
        "default 1): a .safetensors file, a folder holding one, or a hub id where the machine "
        "can download",
    )
    g.add_argument("--force", action="store_true", help="export and build again what is built")
    if not export:
        g.add_argument(
            "--repository",
            type=Path,
            default=None,
            help="where the repository is written or reused (default: model_repository in the "
            "cache folder, $DRIFFUSION_CACHE or ~/.cache/driffusion); an existing repository "
            "given without --pipeline is served as it was built",
        )
        g.add_argument(
            "--emulated-latency-ms",
            type=float,
            default=0.0,
            help="pad every denoiser call to at least this long, standing for a GPU on the CPU "
            "(default %(default)s: raw CPU)",
        )
    t = parser.add_argument_group("tensorrt")
    t.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        help="TensorRT timing cache file, read and updated (default: in the cache folder)",
    )
    t.add_argument(
        "--workspace-gib",
        type=float,
        default=None,
        help="cap on TensorRT's builder scratch memory in GiB (default: TensorRT's)",
    )


def _settings(args: argparse.Namespace, **extra: Any):
    from driffusion.model_repository.build import RepositorySettings

    return RepositorySettings(
        family=args.family or "sd21",
        engine=args.engine,
        gpus=args.gpus,
        denoiser_instances=args.denoiser_instances,
        orchestrator_instances=args.orchestrator_instances,
        max_k=args.max_k,
        max_images=args.max_images,
        stream_instances=args.stream_instances,
        precision=args.precision,
        request_timeout_s=args.request_timeout_s,
        workspace_gib=args.workspace_gib,
        loras=tuple(args.loras),
        **extra,
    )


def _server_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument(
        "--address",
        default="127.0.0.1",
        help="bind address for HTTP, gRPC and metrics (default 127.0.0.1: this machine only; "
        "0.0.0.0 exposes it)",
    )
    g.add_argument("--http-port", type=int, default=8000, help="default %(default)s")
    g.add_argument("--grpc-port", type=int, default=8001, help="default %(default)s")
    g.add_argument("--metrics-port", type=int, default=8002, help="default %(default)s")
    g.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    g.add_argument(
        "--max-request-mb",
        type=float,
        default=8.0,
        help="largest request body or gRPC message accepted, after decompression "
        "(default %(default)s)",
    )
    g.add_argument(
        "--tritonserver",
        type=Path,
        default=None,
        help="a tritonserver binary to run (e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's "
        "container); default: the one in the nvidia-pytriton wheel",
    )


def remote_denoisers(text: str) -> tuple[str, ...]:
    """``"h1:8001,h2:8001/4"`` -> ``("h1:8001", "h2:8001/4")``; argparse error naming a bad
    entry."""
    from driffusion.routing import parse_endpoints

    try:
        return tuple(str(spec) for spec in parse_endpoints(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scale_out_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scaling out over several servers")
    g.add_argument(
        "--role",
        choices=("all", "denoiser"),
        default="all",
        help="all: serve the pipeline (default); denoiser: serve only the denoiser instances, "
        "for the --remote-denoisers of other servers (no orchestrator, text encoders or VAE)",
    )
    g.add_argument(
        "--remote-denoisers",
        type=remote_denoisers,
        default=(),
        metavar="HOST:PORT[/N][,...]",
        help="gRPC ports of `--role denoiser` servers: a round's drafts are fanned out over the "
        "local denoiser instances and theirs, by free capacity; N: a server's instances (default: "
        "asked from its model config). A server that fails is skipped and retried later.",
    )


def _request_flags(
    parser: argparse.ArgumentParser, overrides: dict[api.Field, dict[str, Any]] | None = None
) -> None:
    """One flag per input of ``api.INPUTS`` (``--negative-prompt`` for ``negative_prompt``)."""
    for f in api.INPUTS:
        kwargs: dict[str, Any] = dict(
            dest=f.name,
            required=not f.optional,
            help=f.doc.replace("%", "%%"),  # argparse %-formats help texts
        )
        if f is api.INIT_IMAGE:  # a picture file, read when the request is made
            kwargs.update(
                type=Path, metavar="FILE", help=f"{kwargs['help']}; a picture file (PNG, JPEG, ...)"
            )
        elif f.dtype == "BOOL":
            kwargs.update(action="store_const", const=True, default=None)
        else:
            kwargs.update(type=_TYPES[f.dtype], choices=_CHOICES.get(f))
        kwargs.update((overrides or {}).get(f, {}))
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help="Triton gRPC endpoint host:port (default %(default)s)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="how long to wait for the server and model to be ready (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a request after this long (default: no limit)",
    )


def request_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The inputs given on the command line, by name (an image file read into pixels)."""
    request = {
        f.name: getattr(args, f.name) for f in api.INPUTS if getattr(args, f.name) is not None
    }
    if isinstance(request.get(api.INIT_IMAGE.name), Path):
        from PIL import Image

        with Image.open(request[api.INIT_IMAGE.name]) as picture:
            request[api.INIT_IMAGE.name] = np.asarray(picture.convert("RGB"))
    return request


# --- commands ------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    """Export a diffusers pipeline and write a Triton model repository."""
    from driffusion.model_repository.build import build_repository

    build_repository(
        args.pipeline,
        args.out,
        _settings(args),
        force=args.force,
        timing_cache=args.timing_cache,
        progress=_say,
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve a pipeline through Triton (gRPC 8001, HTTP 8000, metrics 8002)."""
    from driffusion.model_repository.serve import ServerOptions, prepare_repository, serve

    _check_served_loras(args)
    options = ServerOptions(  # checked before the repository is built
        address=args.address,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log=args.log,
        tritonserver=args.tritonserver,
        max_request_mb=args.max_request_mb,
        role=args.role,
        remote_denoisers=args.remote_denoisers,
    )
    repository = prepare_repository(
        args.repository,
        _settings(args, emulated_latency_ms=args.emulated_latency_ms),
        args.pipeline,
        rebuild=args.force,
        timing_cache=args.timing_cache,
        progress=_say,
    )
    return serve(repository, options, progress=_say)


def _check_served_loras(args: argparse.Namespace) -> None:
    """``--lora`` with an existing ``--repository`` and no ``--pipeline``: that repository is
    served as it was built, so the LoRAs would be ignored; say so instead."""
    from driffusion.model_repository.build import read_manifest

    if not args.loras or args.pipeline is not None or args.repository is None or args.force:
        return
    manifest = read_manifest(args.repository)
    if manifest is not None:
        raise ValueError(
            f"--lora: {args.repository} is served as it was built (from {manifest['pipeline']}); "
            "add --pipeline to rebuild it with these LoRAs"
        )


def _generate(args: argparse.Namespace) -> int:
    """Generate images on a running server and write them as PNG."""
    from driffusion.client import DriffusionClient, build_inputs, save_png

    request = request_inputs(args)
    build_inputs(**request)  # values that cannot be sent fail before the wait
    with DriffusionClient(args.url) as client:
        _wait(client, args.wait)
        if args.stream:
            bar = ProgressBar(f"generating on {args.url}")
            result = client.stream(**request, on_progress=bar.update, timeout_s=args.timeout)
            bar.done()
        else:
            request.pop(api.PREVIEW.name, None)
            with progress(f"generating on {args.url}"):
                result = client.generate(**request, timeout_s=args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    count, height, width, _ = result.images.shape
    for i, image in enumerate(result.images):
        path = args.out if count == 1 else args.out.with_stem(f"{args.out.stem}-{i}")
        save_png(image, path)
        print(f"wrote {path} ({width}x{height})")
    print(f"rounds {result.rounds}, evaluations {result.evaluations}")
    print(
        f"text {result.text_ms:.1f} ms, denoise {result.denoise_ms:.1f} ms, "
        f"decode {result.decode_ms:.1f} ms (host work {result.host_ms:.1f} ms of the denoising); "
        f"latency {result.latency_ms:.1f} ms (client)"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Time sequential sampling against a DRiffusion mode on one seed; print a table."""
    from driffusion.client import DriffusionClient, build_inputs
    from driffusion.client.bench import compare

    request = request_inputs(args)  # mode and k always set: bench has defaults for them
    build_inputs(**request)
    with DriffusionClient(args.url) as client:
        _wait(client, args.wait)
        result = compare(client, request, args.repeats, args.timeout, progress=progress)
    print(result.table())
    if args.out_dir is not None:
        for path in result.write_images(args.out_dir):
            print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The main job: serve the embedded model, compare sequential and DRiffusion over gRPC."""
    from .demo import run_demo

    _check_served_loras(args)
    settings = _settings(args, emulated_latency_ms=args.emulated_latency_ms)
    request = {
        api.PROMPT.name: args.prompt,
        api.MODE.name: args.mode,
        api.K.name: args.k,
        api.STEPS.name: args.steps,
        api.SEED.name: args.seed,
    }
    return run_demo(
        settings, request, args.repeats, args.out_dir, args.repository, pipeline=args.pipeline
    )


def _http(args: argparse.Namespace) -> int:
    """Serve OpenAI's Images API (POST /v1/images/generations) in front of a Triton server."""
    try:
        from driffusion.client.openai_http import HttpSettings, api_keys_from, serve_http
    except ModuleNotFoundError as e:  # starlette and uvicorn are dependencies; a broken install
        raise ValueError(f"driffusion http cannot start: {e} (reinstall driffusion)") from None

    settings = HttpSettings(
        triton_url=args.triton_url,
        model=args.model,
        api_keys=api_keys_from(args.api_key),
        max_body_bytes=int(args.max_body_kb * 1024),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_n=args.max_n,
    )
    where = f"http://{args.address}:{args.port}/v1/images/generations"
    _say(f"driffusion http: {where} -> model {args.model!r} at {args.triton_url}")
    if settings.api_keys:
        _say(f"authentication: Bearer key required ({len(settings.api_keys)} key(s))")
    else:
        _say(
            "authentication: none (no --api-key and no $DRIFFUSION_API_KEYS): anyone who reaches "
            "this port can generate"
        )
    return serve_http(settings, args.address, args.port, log_level=args.log_level)


def _gmm_demo(args: argparse.Namespace) -> int:
    """Sample an exact Gaussian-mixture model sequentially and with DRiffusion; print the table."""
    from driffusion.gmm import demo_table

    print(demo_table(args.steps, args.samples, args.seed))
    return 0


def _wait(client, timeout_s: float) -> None:
    """``client.wait_ready``, its error extended with how to start a server."""
    from driffusion.client import DriffusionError

    try:
        client.wait_ready(timeout_s=timeout_s)
    except DriffusionError as e:
        raise DriffusionError(f"{e}\n{SERVER_HINT}", status=e.status) from e


def _say(message: str) -> None:
    print(message, flush=True)


def _help(command) -> str:
    return command.__doc__.splitlines()[0]


# --- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_EMULATED_LATENCY_MS, DEFAULT_PROMPT

    parser = argparse.ArgumentParser(
        prog="driffusion", description="DRiffusion parallel diffusion sampling, served by Triton."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help=_help(_demo), description=_help(_demo))
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="default %(default)r")
    p.add_argument(
        "--mode",
        default="aggressive",
        choices=("aggressive", "conservative"),
        help="DRiffusion mode compared with sequential (default %(default)s)",
    )
    p.add_argument("--k", type=positive_int, default=4, help="drafts per round (default 4)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument(
        "--repeats", type=positive_int, default=3, help="timed runs per mode (default 3)"
    )
    p.add_argument(
        "--out-dir", type=Path, default=None, help="where the PNGs go (default: demo/ in the cache)"
    )
    _repository_flags(p)
    p.set_defaults(func=_demo, emulated_latency_ms=DEFAULT_EMULATED_LATENCY_MS)
    for action in p._actions:  # the demo's default differs from serve's: say so in --help
        if action.dest == "emulated_latency_ms":
            action.help = (
                f"pad every denoiser call to at least this long (default "
                f"{DEFAULT_EMULATED_LATENCY_MS:g} ms here)"
            )

    p = sub.add_parser(
        "export",
        help=_help(_export).rstrip(".") + " (ONNX for the CPU, TensorRT or torch for GPUs)",
        description="Export a diffusers pipeline (text encoders, denoiser, VAE decoder) and write "
        "a complete Triton model repository. Re-running skips what is built (--force rebuilds).",
    )
    p.add_argument("--out", required=True, type=Path, help="the model repository to write")
    _repository_flags(p, export=True)
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help=_help(_serve), description=_help(_serve))
    _repository_flags(p)
    _server_flags(p)
    _scale_out_flags(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("generate", help=_help(_generate), description=_request_doc(_generate))
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="PNG file to write (with --num-images n: OUT-0.png .. OUT-<n-1>.png)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="through driffusion_stream: a progress bar with a line per round",
    )
    _request_flags(p)
    _connection_flags(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("bench", help=_help(_bench), description=_request_doc(_bench))
    _request_flags(
        p,
        {
            api.MODE: dict(
                choices=("aggressive", "conservative"),
                default="aggressive",
                help="DRiffusion mode timed against sequential (default %(default)s)",
            ),
            api.K: dict(default=4, help="drafts per round of that mode (default %(default)s)"),
        },
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed requests per mode, after one warm-up each (default %(default)s)",
    )
    p.add_argument("--out-dir", type=Path, help="also write both images as PNG here")
    _connection_flags(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser(
        "http",
        help=_help(_http),
        description=_help(_http)
        + " Also GET /v1/models and GET /health. A thin translator onto the gRPC API: the server "
        "validates every field.",
    )
    p.add_argument(
        "--triton-url",
        default=DEFAULT_URL,
        help="Triton gRPC endpoint host:port (default %(default)s)",
    )
    p.add_argument(
        "--address",
        default="127.0.0.1",
        help="bind address (default %(default)s: this machine only; 0.0.0.0 exposes it)",
    )
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default %(default)s)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept requests with 'Authorization: Bearer KEY' (repeatable); keys also come from "
        "$DRIFFUSION_API_KEYS, comma-separated, which keeps them out of `ps`; with none, no "
        "authentication",
    )
    p.add_argument(
        "--model",
        default="driffusion",
        help="the Triton model, also the one model name served (default %(default)s)",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=4,
        help="requests sent to Triton at once (default %(default)s; match serve's "
        "--orchestrator-instances)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for a slot; beyond, 429 at once (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="per request, queueing included; the rest is the gRPC deadline; 504 beyond "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-body-kb",
        type=float,
        default=1024.0,
        help="largest request body; 413 beyond (default %(default)s)",
    )
    p.add_argument(
        "--max-n",
        type=positive_int,
        default=4,
        help="most images per request, n (default %(default)s, as serve's --max-images, which "
        "also applies where the server takes n as one request)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="default %(default)s (info logs each request's line)",
    )
    p.set_defaults(func=_http)

    p = sub.add_parser("gmm-demo", help=_help(_gmm_demo), description=_help(_gmm_demo))
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps S (default 50)")
    p.add_argument("--samples", type=positive_int, default=4000, help="samples (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.set_defaults(func=_gmm_demo)
    return parser


def _request_doc(command) -> str:
    return (
        f"{_help(command)} Request flags left out are not sent, so the server's defaults apply "
        '("model\'s": those of the served pipeline).'
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 failed, 2 bad flags or a request the server
    rejected as invalid, 130 interrupted."""
    from driffusion.client import DriffusionError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except DriffusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.is_invalid_argument else 1
    except (TypeError, ValueError) as e:  # values the client cannot send, bad settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # build and export failures name the step and the component
        print(f"driffusion {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
