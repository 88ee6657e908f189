"""NVIDIA's perf_analyzer against the ``driffusion`` model on the real Triton server (issue 6).

    .venv/bin/python benchmarks/bench_perf_analyzer.py [--latency-ms 100] [--steps 20]
        [--concurrency 1 4 16] [--quick] [--write]

The server is bench_load.py's: tiny SD2.1-like pipeline, 4 denoiser instances padded to
``--latency-ms`` per call, 8 orchestrator instances. perf_analyzer sends the requests of the
committed input-data files in ``benchmarks/perf_analyzer/`` (one per mode; fields in its README)
at each concurrency and reports throughput, client latency percentiles and the server's queue and
compute times: an independent check of bench_load.py's gRPC-client numbers.

perf_analyzer is the binary inside the ``tritonclient==2.51.0`` wheel; it is unpacked, with the
``libcudart.so.12`` it links against, into ``.build/perf_analyzer/`` on first use. It also needs
Debian's ``libb64-0d`` (``apt-get install libb64-0d``). With ``--write``, writes the
``perf-analyzer`` section of BENCHMARKS.md. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from driffusion.client import DriffusionClient
from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import TritonServer
from report import write_section

ROOT = Path(__file__).resolve().parent.parent
INPUTS_DIR = Path(__file__).resolve().parent / "perf_analyzer"
INPUT_FILES = ("sequential.json", "aggressive_k4.json", "aggressive_k4_batch.json")
BUILD_DIR = ROOT / ".build" / "perf_analyzer"
TRITONCLIENT = "tritonclient==2.51.0"  # ships perf_analyzer; the server is Triton 2.51.0 too
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12==12.9.79"  # libcudart.so.12, linked even without a GPU
WHEEL_MEMBERS = {  # wheel name prefix -> (member, where it goes under BUILD_DIR)
    "tritonclient-2.51.0-": (
        "tritonclient-2.51.0.data/data/bin/perf_analyzer",
        "bin/perf_analyzer",
    ),
    "nvidia_cuda_runtime_cu12-12.9.79-": (
        "nvidia/cuda_runtime/lib/libcudart.so.12",
        "lib/libcudart.so.12",
    ),
}
MODEL = "driffusion"


@dataclass(frozen=True)
class PerfAnalyzer:
    """The unpacked perf_analyzer binary and the folder of the libraries it loads."""

    binary: Path
    lib_dir: Path

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in [str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")] if p
        )
        return env


def install_perf_analyzer(build_dir: Path = BUILD_DIR) -> PerfAnalyzer:
    """Unpack perf_analyzer and libcudart from their wheels into ``build_dir`` (once)."""
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        sys.exit(
            f"perf_analyzer ships for Linux x86_64 only, not {sys.platform} {platform.machine()}"
        )
    libs = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    if "libb64.so.0d" not in libs:
        sys.exit(
            "perf_analyzer needs libb64.so.0d, which is not installed; on Debian/Ubuntu run:\n"
            "    apt-get update && apt-get install -y libb64-0d"
        )
    pa = PerfAnalyzer(build_dir / "bin" / "perf_analyzer", build_dir / "lib")
    if not all((build_dir / target).exists() for _, target in WHEEL_MEMBERS.values()):
        wheels = build_dir / "wheels"
        print(f"[perf_analyzer] downloading {TRITONCLIENT} and {CUDA_RUNTIME} to {wheels}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            + ["--dest", str(wheels), TRITONCLIENT, CUDA_RUNTIME],
            check=True,
        )
        for prefix, (member, target) in WHEEL_MEMBERS.items():
            (wheel,) = wheels.glob(f"{prefix}*.whl")
            out = build_dir / target
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                staging = out.with_name(f".{out.name}.partial")
                with open(staging, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            staging.chmod(0o755)
            staging.rename(out)  # atomic: a present file is a complete one
    check = subprocess.run(
        [str(pa.binary), "--version"], capture_output=True, text=True, env=pa.environment()
    )
    if check.returncode != 0:
        sys.exit(f"{pa.binary} does not run:\n{check.stdout}{check.stderr}")
    return pa


def describe(input_file: Path) -> tuple[str, str, str]:
    """(mode, k, fanout) that every entry of an input-data file asks for ("-": not sent)."""
    entries = json.loads(input_file.read_text())["data"]
    kinds = {tuple(str(e.get(n, ["-"])[0]) for n in ("mode", "k", "fanout")) for e in entries}
    if len(kinds) != 1:
        raise ValueError(f"{input_file}: entries must share mode, k and fanout, got {kinds}")
    return kinds.pop()


# perf_analyzer counts whole requests per window: with windows of a few 2-second requests, the
# window throughput alone moves by 10-25% (seen: "Failed to obtain stable measurement" at the
# default 10%), while latency is steady. Stability is judged at this percentage instead.
STABILITY_PERCENT = 25


def measure(
    pa: PerfAnalyzer, url: str, input_file: Path, concurrency: int, window: int, out: Path
) -> dict[str, float]:
    """One perf_analyzer run at one concurrency; its CSV row (latencies in microseconds)."""
    csv_path = out / f"{input_file.stem}-c{concurrency}.csv"
    cmd = [
        str(pa.binary),
        *("-m", MODEL, "-u", url, "-i", "grpc"),
        f"--input-data={input_file}",
        f"--concurrency-range={concurrency}:{concurrency}",
        "--measurement-mode=count_windows",
        f"--measurement-request-count={window}",
        f"--stability-percentage={STABILITY_PERCENT}",
        *("-f", str(csv_path)),
    ]
    print("$", " ".join(cmd).replace(str(ROOT) + "/", ""), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, env=pa.environment())
    if result.returncode != 0 or not csv_path.exists():
        sys.exit(f"perf_analyzer failed (rc {result.returncode}):\n{result.stdout}{result.stderr}")
    with open(csv_path, newline="") as f:
        (row,) = list(csv.DictReader(f))
    return {name: float(value) for name, value in row.items() if value not in ("", None)}


def table_row(clients: int, label: tuple[str, str, str], r: dict[str, float]) -> str:
    """A markdown row from perf_analyzer's CSV row (microseconds)."""
    compute = sum(r[f"Server Compute {p}"] for p in ("Input", "Infer", "Output"))
    parts = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Client Recv")
    mean_ms = (sum(r[p] for p in parts) + compute) / 1e3  # perf_analyzer's average latency
    cells = [
        str(clients),
        *label,
        f"{r['Inferences/Second']:.2f}",
        f"{clients / mean_ms * 1e3:.2f}",  # Little's law: closed loop, no think time
        f"{r['p50 latency'] / 1e3:.0f}",
        f"{r['p99 latency'] / 1e3:.0f}",
        f"{r['Server Queue'] / 1e3:.0f}",
        f"{compute / 1e3:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0, help="padding per call")
    parser.add_argument("--steps", type=int, default=None, help="S (default 20; 10 with --quick)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=None, help="default 1 4 16; 1 4 with --quick"
    )
    parser.add_argument(
        "--window", type=int, default=None, help="requests per client per window (default 4; 2)"
    )
    parser.add_argument("--quick", action="store_true", help="S=10, concurrency 1 4, short windows")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args()
    steps = args.steps or (10 if args.quick else 20)
    concurrency = args.concurrency or ([1, 4] if args.quick else [1, 4, 16])
    per_client = args.window or (2 if args.quick else 4)
    labels = {name: describe(INPUTS_DIR / name) for name in INPUT_FILES}
    pa = install_perf_analyzer()  # fail before the minutes spent building the repository
    rows = [
        "| clients | mode | k | fan-out | inferences/s | clients / mean latency "
        "| p50 latency ms | p99 latency ms | server queue ms | server compute ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="driffusion-perf-analyzer-") as tmp:
        work = Path(tmp)
        pipeline = build_tiny_pipeline("sd21", work / "tiny")
        settings = RepositorySettings(
            emulated_latency_ms=args.latency_ms,
            orchestrator_instances=8,
            default_steps=steps,  # the input-data files leave steps to the server
        )
        repo = build_repository(pipeline, work / "repo", settings, progress=None)
        with TritonServer.on_free_ports(repo, start_timeout_s=600) as server:
            with DriffusionClient(server.grpc_url) as c:
                c.wait_ready(timeout_s=120)
                c.generate("warm", steps=2, mode="sequential")
            for clients in concurrency:
                for name, label in labels.items():
                    window = per_client * clients
                    r = measure(pa, server.grpc_url, INPUTS_DIR / name, clients, window, work)
                    rows.append(table_row(clients, label, r))
                    print(rows[-1], flush=True)
    files = ", ".join(f"`{name}`" for name in INPUT_FILES)
    body = f"""## Load measured by NVIDIA perf_analyzer (`benchmarks/bench_perf_analyzer.py`)

The `load` section's server (tiny SD2.1-like pipeline, S={steps}, CFG; 4 denoiser instances padded
to {args.latency_ms:g} ms per call, 8 orchestrator instances), loaded by perf_analyzer 2.51.0 with
the input-data files {files} of `benchmarks/perf_analyzer/` (fields in its README): gRPC,
synchronous clients, count windows of at least {per_client} requests per client, reported once 3
windows agree within {STABILITY_PERCENT}%. perf_analyzer's *inferences/s* is the requests completed
per window, coarse when a window holds a few requests of a second or more; *clients / mean
latency* is the closed-loop throughput by Little's law (no think time), the figure to compare
with the `load` section. Latencies are perf_analyzer's, per request; *server queue* (waiting for
an orchestrator instance) and *server compute* (the whole BLS request) are Triton's averages for
the `driffusion` model.

{chr(10).join(rows)}
"""
    print(body)
    if args.write:
        write_section("perf-analyzer", body)


if __name__ == "__main__":
    main()
