"""Several images per request against as many requests, and what streaming costs.

    .venv/bin/python benchmarks/bench_images.py [--repeats 3] [--write]

The tiny SD2.1-like pipeline through the real Triton server, every denoiser call padded to
40 ms + 6 ms per batch row (a GPU whose cost grows with the batch; a CFG draft is 2 rows), 4
denoiser instances, one client. For n = 1, 2, 4: one request with ``num_images=n`` against n
one-image requests one after another (seeds seed..seed+n-1, the same images), sequential and
aggressive k=4, S=20: latency per request and images per second. Then the streaming model
against the plain one for the same request, with and without previews: the latency streaming
adds. Writes the ``images`` section of BENCHMARKS.md with ``--write``. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from driffusion.client import DriffusionClient
from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import TritonServer
from report import write_section

BASE_MS, PER_ROW_MS, STEPS = 40.0, 6.0, 20
PROMPT = "a red cube"


def median_ms(runs) -> float:
    return statistics.median(runs) * 1e3


def timed(call, repeats: int) -> float:
    call()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    pipeline = build_tiny_pipeline("sd21", work / "tiny")
    settings = RepositorySettings(
        denoiser_instances=4,
        orchestrator_instances=1,
        emulated_latency_ms=BASE_MS,
        emulated_latency_per_item_ms=PER_ROW_MS,
        max_images=4,
    )
    repository = build_repository(pipeline, work / "repo", settings, progress=None)
    rows, stream_rows = [], []
    with TritonServer.on_free_ports(repository) as server, DriffusionClient(server.grpc_url) as c:
        c.wait_ready(timeout_s=120)
        for mode, k in (("sequential", None), ("aggressive", 4)):
            fields = dict(steps=STEPS, seed=0, mode=mode, k=k)
            for n in (1, 2, 4):
                together = timed(
                    lambda f=fields, n=n: c.generate(PROMPT, **f, num_images=n), args.repeats
                )
                apart = timed(
                    lambda f=fields, n=n: [
                        c.generate(PROMPT, **{**f, "seed": s}) for s in range(n)
                    ],
                    args.repeats,
                )
                rows.append((mode, k, n, together, apart))
                print(rows[-1], flush=True)
        fields = dict(steps=STEPS, seed=0, mode="aggressive", k=4)
        plain = timed(lambda: c.generate(PROMPT, **fields), args.repeats)
        for preview in (False, True):
            streamed = timed(lambda p=preview: c.stream(PROMPT, preview=p, **fields), args.repeats)
            stream_rows.append((preview, plain, streamed))
            print(stream_rows[-1], flush=True)
    lines = [
        "## Several images per request, and streaming (`benchmarks/bench_images.py`)",
        "",
        f"Tiny SD2.1-like pipeline, real Triton server, 4 denoiser instances, S={STEPS}, one "
        f"client; every denoiser call padded to {BASE_MS:g} ms + {PER_ROW_MS:g} ms per batch row "
        "(a CFG draft of one image is 2 rows), so n images in one request cost what a bigger "
        "batch costs. *n requests*: n one-image requests one after another with seeds "
        "seed..seed+n-1 (the same images as one request with num_images=n).",
        "",
        "| mode | k | n | one request, ms | n requests, ms | images/s one request | "
        "images/s n requests | gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, k, n, together, apart in rows:
        lines.append(
            f"| {mode} | {k or '-'} | {n} | {together * 1e3:.0f} | {apart * 1e3:.0f} | "
            f"{n / together:.1f} | {n / apart:.1f} | {apart / together:.2f}x |"
        )
    lines += [
        "",
        "Streaming (`driffusion_stream`, gRPC streaming, a response per round) against the plain "
        "model, aggressive k=4, one image:",
        "",
        "| previews | plain, ms | streamed, ms | added |",
        "|---|---|---|---|",
    ]
    for preview, plain, streamed in stream_rows:
        lines.append(
            f"| {'yes' if preview else 'no'} | {plain * 1e3:.0f} | {streamed * 1e3:.0f} | "
            f"{(streamed - plain) * 1e3:+.0f} ms |"
        )
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section("images", body)


if __name__ == "__main__":
    main()
