"""Latency and throughput under load through the real Triton server (issue 6).

    .venv/bin/python benchmarks/bench_load.py [--latency-ms 100] [--steps 20]

4 denoiser instances, each call padded to ``--latency-ms`` (a stand-in for one GPU per instance);
1, 4 and 16 concurrent gRPC clients, sequential against DRiffusion aggressive k=4 (fan-out and
batch). Both sample about S states per image, so at saturation the images per second should match.
Writes the ``load`` section of BENCHMARKS.md. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from driffusion.client import DriffusionClient
from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import TritonServer
from report import write_section

MODES = [
    ("sequential", {}),
    ("aggressive", {"k": 4, "fanout": "instances"}),
    ("aggressive", {"k": 4, "fanout": "batch"}),
]


def run(url: str, clients: int, per_client: int, steps: int, mode: str, extra: dict):
    def worker(i):
        with DriffusionClient(url) as c:
            return [
                c.generate("load", steps=steps, seed=i * 100 + j, mode=mode, **extra).latency_ms
                for j in range(per_client)
            ]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(worker, range(clients)) for x in part]
    return len(latencies) / (time.perf_counter() - start), statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0, help="padding per call")
    parser.add_argument("--per-item-ms", type=float, default=0.0, help="plus this per batch row")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=32, help="requests per cell (at 16+)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="driffusion-load-"))
    pipeline = build_tiny_pipeline("sd21", work / "tiny")
    settings = RepositorySettings(
        emulated_latency_ms=args.latency_ms,
        emulated_latency_per_item_ms=args.per_item_ms,
        orchestrator_instances=8,
    )
    repo = build_repository(pipeline, work / "repo", settings, progress=None)
    rows = [
        "| clients | mode | fan-out | images/s | median latency ms | images/s vs sequential |",
        "|---|---|---|---|---|---|",
    ]
    with TritonServer.on_free_ports(repo, start_timeout_s=600) as server:
        with DriffusionClient(server.grpc_url) as c:
            c.wait_ready(timeout_s=120)
        run(server.grpc_url, 16, 1, 2, "sequential", {})  # warm every instance
        for clients in (1, 4, 16):
            per_client = max(1, args.requests // clients) if clients > 1 else 4
            base = None
            for mode, extra in MODES:
                ips, lat = run(server.grpc_url, clients, per_client, args.steps, mode, extra)
                base = base or ips
                rows.append(
                    f"| {clients} | {mode} | {extra.get('fanout', '-')} | {ips:.2f} | "
                    f"{lat:.0f} | {ips / base:.2f} |"
                )
                print(rows[-1], flush=True)
    model = f"{args.latency_ms:g} ms per call"
    if args.per_item_ms:
        model += f" + {args.per_item_ms:g} ms per batch row (a CFG pair is 2 rows)"
    section = "load" if not args.per_item_ms else "load-batched"
    body = f"""## Load: throughput and latency, denoiser call {model} (`bench_load.py`)

Tiny SD2.1-like pipeline, S={args.steps}, CFG; 4 denoiser instances, each call padded to {model}
(one GPU each, emulated), 8 orchestrator instances; aggressive k=4. Images per second over the whole
cell; latency is the gRPC client's median.

{chr(10).join(rows)}
"""
    write_section(section, body)


if __name__ == "__main__":
    main()
