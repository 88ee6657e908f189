"""The ``driffusion generate`` and ``driffusion bench`` subcommands: clients of a running server.

Request flags are made from ``api.INPUTS`` (name, type, help); a flag left out is not sent, so the
server's default applies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from driffusion import api

DEFAULT_URL = "localhost:8001"
DEFAULT_WAIT_S = 30.0
SERVER_HINT = "is the server running? start it with `driffusion serve`"
_CHOICES = {api.MODE: api.MODES, api.K_SCHEDULE: api.K_SCHEDULES, api.FANOUT: api.FANOUTS}
_TYPES = {"BYTES": str, "INT64": int, "INT32": int, "FP32": float}
DRIFFUSION_MODES = tuple(m for m in api.MODES if m != "sequential")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``generate`` and ``bench`` to the ``driffusion`` command line."""
    gen = subparsers.add_parser(
        "generate", help=_generate.__doc__.splitlines()[0], description=_description(_generate)
    )
    gen.add_argument("--out", required=True, type=Path, help="PNG file to write")
    _add_request_flags(gen)
    _add_connection_flags(gen)
    gen.set_defaults(func=_generate)

    bench = subparsers.add_parser(
        "bench", help=_bench.__doc__.splitlines()[0], description=_description(_bench)
    )
    _add_request_flags(
        bench,
        {
            api.MODE: dict(
                choices=DRIFFUSION_MODES,
                default="aggressive",
                help="DRiffusion mode timed against sequential (default %(default)s)",
            ),
            api.K: dict(default=4, help="drafts per round of that mode (default %(default)s)"),
        },
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="timed requests per mode, after one warm-up each (default %(default)s)",
    )
    bench.add_argument("--out-dir", type=Path, help="also write both images as PNG here")
    _add_connection_flags(bench)
    bench.set_defaults(func=_bench)


def _description(command) -> str:
    return (
        f"{command.__doc__.splitlines()[0]} Request flags left out are not sent, so the server's "
        'defaults apply ("model\'s": those of the served pipeline).'
    )


def _add_request_flags(
    parser: argparse.ArgumentParser, overrides: dict[api.Field, dict[str, Any]] | None = None
) -> None:
    """One flag per input of ``api.INPUTS`` (``--negative-prompt`` for ``negative_prompt``).

    Its help is the field's doc, its default None (not sent); ``overrides`` replace either.
    """
    for f in api.INPUTS:
        kwargs = dict(
            dest=f.name,
            type=_TYPES[f.dtype],
            choices=_CHOICES.get(f),
            required=not f.optional,
            help=f.doc.replace("%", "%%"),  # argparse %-formats help texts
        )
        kwargs.update((overrides or {}).get(f, {}))
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """The inputs given on the command line, by name."""
    return {f.name: getattr(args, f.name) for f in api.INPUTS if getattr(args, f.name) is not None}


def _generate(args: argparse.Namespace) -> int:
    """Generate one image on a running server and write it as PNG."""
    from .client import DriffusionClient, DriffusionError, build_inputs, save_png

    request = _request(args)
    with DriffusionClient(args.url) as client:
        try:
            build_inputs(**request)  # values that cannot be sent fail before the wait
            _wait(client, args.wait)
            with _progress(f"generating on {args.url}"):
                result = client.generate(**request, timeout_s=args.timeout)
        except (DriffusionError, TypeError, ValueError) as e:
            return _fail(e)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(result.image, args.out)
    height, width, _ = result.image.shape
    print(f"wrote {args.out} ({width}x{height})")
    print(f"rounds {result.rounds}, evaluations {result.evaluations}")
    print(
        f"text {result.text_ms:.1f} ms, denoise {result.denoise_ms:.1f} ms, "
        f"decode {result.decode_ms:.1f} ms; latency {result.latency_ms:.1f} ms (client)"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Time sequential sampling against a DRiffusion mode on one seed; print a table."""
    from .client import (
        DriffusionClient,
        DriffusionError,
        build_inputs,
        max_abs_diff,
        psnr,
        save_png,
    )

    given = _request(args)  # mode and k always set: bench has defaults for them
    requests = {"sequential": {**given, api.MODE.name: "sequential"}, args.mode: given}
    del requests["sequential"][api.K.name]  # sequential has no drafts
    runs: dict[str, list] = {mode: [] for mode in requests}
    with DriffusionClient(args.url) as client:
        try:
            build_inputs(**given)  # values that cannot be sent fail before the wait
            _wait(client, args.wait)
            for mode, request in requests.items():
                with _progress(f"warm-up {mode}"):
                    client.generate(**request, timeout_s=args.timeout)
            for i in range(args.repeats):  # alternating, so drift hits both modes alike
                for mode, request in requests.items():
                    with _progress(f"{mode} {i + 1}/{args.repeats}"):
                        runs[mode].append(client.generate(**request, timeout_s=args.timeout))
        except (DriffusionError, TypeError, ValueError) as e:
            return _fail(e)

    seq, drf = runs["sequential"], runs[args.mode]
    steps = seq[0].rounds  # sequential takes one round per step
    median = {mode: statistics.median(r.latency_ms for r in rs) for mode, rs in runs.items()}
    print(
        f"{args.url}: {steps} steps, seed {_or_default(args.seed)}, "
        f"fanout {_or_default(args.fanout)}; median of {args.repeats} after one warm-up each"
    )
    print(
        f"{'mode':<13} {'k':>2} {'rounds':>6} {'evals':>5} {'median ms':>10} "
        f"{'speedup':>8} {'ideal':>7}"
    )
    for mode, rs, k in (("sequential", seq, "-"), (args.mode, drf, args.k)):
        print(
            f"{mode:<13} {k:>2} {rs[0].rounds:>6} {rs[0].evaluations:>5} {median[mode]:>10.1f} "
            f"{median['sequential'] / median[mode]:>7.2f}x {steps / rs[0].rounds:>6.2f}x"
        )
    a, b = seq[-1].image, drf[-1].image
    print(
        f"image difference {args.mode} vs sequential: PSNR {psnr(a, b):.2f} dB, "
        f"max abs diff {max_abs_diff(a, b)}"
    )
    for mode, rs in runs.items():
        worst = max(max_abs_diff(rs[0].image, r.image) for r in rs)
        if worst:
            print(f"note: {mode} images differ between repeats (max abs diff {worst})")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for path, image in (("sequential.png", a), (f"{args.mode}-k{args.k}.png", b)):
            print(f"wrote {save_png(image, args.out_dir / path)}")
    return 0


def _or_default(value: Any) -> str:
    return "server default" if value is None else str(value)


def _wait(client, timeout_s: float) -> None:
    """``client.wait_ready``, its error extended with how to start a server."""
    from .client import DriffusionError

    try:
        client.wait_ready(timeout_s=timeout_s)
    except DriffusionError as e:
        raise DriffusionError(f"{e}\n{SERVER_HINT}", status=e.status) from e


def _fail(error: Exception) -> int:
    """Print ``error``; exit code 2 for a rejected request (bad inputs), else 1."""
    from .client import DriffusionError

    server_side = isinstance(error, DriffusionError) and not error.is_invalid_argument
    print(f"error: {error}", file=sys.stderr)
    return 1 if server_side else 2  # TypeError/ValueError: flag values the client cannot send


@contextmanager
def _progress(label: str) -> Iterator[None]:
    """An elapsed-time ticker on a TTY stderr (every 0.5 s); else a start and an end line."""
    stream, start = sys.stderr, time.perf_counter()
    tty = stream.isatty()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            stream.write(f"\r{label}: {time.perf_counter() - start:.1f} s")
            stream.flush()

    if tty:
        stream.write(f"\r{label}: 0.0 s")
        stream.flush()
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    else:
        print(f"{label} ...", file=stream, flush=True)
    outcome = "failed"
    try:
        yield
        outcome = "done"
    finally:
        stop.set()
        if tty:
            ticker.join()
        elapsed = time.perf_counter() - start
        end = "\r\x1b[K" if tty else ""  # a TTY: overwrite the ticker's line
        print(f"{end}{label}: {outcome} in {elapsed:.1f} s", file=stream, flush=True)
