"""End-to-end speedup through the real Triton server, denoiser latency emulated.

    .venv/bin/python benchmarks/bench_serving.py [--latency-ms 100] [--repeats 3]

Serves the tiny SD2.1-like pipeline with every denoiser call padded to ``--latency-ms`` (standing
for one GPU per denoiser instance, 4 instances) and times sequential against DRiffusion over gRPC,
same prompt and seed. Writes the ``serving`` section of BENCHMARKS.md. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from driffusion.client import DriffusionClient, psnr
from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import TritonServer, find_free_ports
from report import write_section

STEPS = 50
CASES = [("sequential", 1)] + [(m, k) for m in ("aggressive", "conservative") for k in (2, 3, 4)]


def timed(client, repeats: int, **request):
    client.generate("a handwritten digit seven", seed=0, steps=STEPS, **request)  # warm-up
    runs = [
        client.generate("a handwritten digit seven", seed=0, steps=STEPS, **request)
        for _ in range(repeats)
    ]
    return runs, statistics.median(r.latency_ms for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0, help="emulated denoiser call")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="driffusion-bench-"))
    pipeline = build_tiny_pipeline("sd21", work / "tiny")
    settings = RepositorySettings(emulated_latency_ms=args.latency_ms, orchestrator_instances=1)
    repo = build_repository(pipeline, work / "repo", settings, progress=None)
    http, grpc, metrics = find_free_ports(3)
    rows = [
        "| mode | k | fan-out | rounds | ideal speedup | median ms | speedup | of ideal "
        "| overhead ms/round | PSNR vs seq |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics) as server:
        with DriffusionClient(server.grpc_url) as client:
            client.wait_ready(timeout_s=120)
            base_runs, base = timed(client, args.repeats, mode="sequential")
            for mode, k in CASES:
                for fanout in ("instances", "batch") if mode != "sequential" else ("-",):
                    if mode == "sequential":
                        runs, median = base_runs, base
                    else:
                        runs, median = timed(client, args.repeats, mode=mode, k=k, fanout=fanout)
                    r = runs[0]
                    ideal = STEPS / r.rounds
                    overhead = statistics.median(x.denoise_ms for x in runs) / r.rounds
                    overhead -= args.latency_ms
                    rows.append(
                        f"| {mode} | {k} | {fanout} | {r.rounds} | {ideal:.2f} | {median:.0f} | "
                        f"{base / median:.2f} | {base / median / ideal:.3f} | {overhead:.1f} | "
                        f"{psnr(r.image, base_runs[0].image):.1f} |"
                    )
                    print(rows[-1], flush=True)
    body = f"""## Serving: end-to-end speedup through Triton (`benchmarks/bench_serving.py`)

Tiny SD2.1-like pipeline (random weights, 64 px), S={STEPS}, CFG, one client; 4 denoiser instances,
each call padded to {args.latency_ms:g} ms (a stand-in for one GPU per instance: the padding is the
documented `emulated_latency_ms` option of the CPU denoiser model). Latency is the gRPC client's,
median of {args.repeats} after a warm-up, and includes text encoding and VAE decoding.
*speedup* = sequential median / this median; *of ideal* = speedup / (S / rounds); *overhead* =
denoising time per round beyond the padded model call (the orchestrator's drafting, refinement,
guidance and the BLS round trips). With a fixed per-call latency `batch` costs the same as fan-out
per round (batch-dependent latency is future work, issue 6).

{chr(10).join(rows)}
"""
    write_section("serving", body)


if __name__ == "__main__":
    main()
