"""Remote denoisers on loopback: what a remote denoiser call costs against a local one, and the
speedup at k=8 with 4 local and 4 remote instances against the ideal.

    cd benchmarks && ../.venv/bin/python bench_remote.py [--repeats 5] [--profile sdxl]

Real ``driffusion serve`` processes on this machine, clients through their fronts, as deployed:

1. *one node, 8 GPUs*: one server with 8 denoiser instances (the reference: every draft local);
2. *one node, 4 GPUs*: server A with 4 instances and ``--remote-denoisers`` pointing at B, while
   B is not running: k=8 spreads 2 drafts per call over its 4 instances (the hybrid);
3. *4 local + 4 remote*: B (``--role denoiser``, 4 instances) started: A fans k=8 out over its 4
   and B's 4, one draft per call; k=4 stays local (a free local instance is always taken first).

Every denoiser call is padded to what one H100 measured for the profile's model (bench_serving's
fit, by batch rows), on every server alike. Per-call latency by endpoint comes from A's
``driffusion_denoiser_call_duration_seconds`` histogram. Writes the ``remote`` section of
BENCHMARKS.md. Not a test.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench_serving import H100_MS, Latency

from driffusion import round_sizes
from driffusion.client import DriffusionClient
from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.server import find_free_ports, metric_sum, read_metrics
from report import write_section

STEPS = 50
PROMPT = "a handwritten digit seven"
CALLS = "driffusion_denoiser_call_duration_seconds"


class Serve:
    """``driffusion serve`` in a subprocess of its own session."""

    def __init__(self, repository: Path, *extra: str, ports: list[int] | None = None):
        self.http, self.grpc, self.metrics = ports or find_free_ports(3)
        argv = [sys.executable, "-m", "driffusion.cli", "serve", "--repository", str(repository)]
        argv += ["--http-port", str(self.http), "--grpc-port", str(self.grpc)]
        argv += ["--metrics-port", str(self.metrics), *extra]
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.2)

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def calls(self) -> dict[str, tuple[float, float]]:
        """{endpoint: (calls, seconds)} of the denoiser call histogram."""
        values = read_metrics(f"http://127.0.0.1:{self.metrics}/metrics")
        endpoints = {dict(labels).get("endpoint") for (name, labels) in values if CALLS in name}
        return {
            e: (
                metric_sum(values, CALLS + "_count", endpoint=e),
                metric_sum(values, CALLS + "_sum", endpoint=e),
            )
            for e in endpoints
            if e
        }

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=120)


def timed(client, repeats: int, **request):
    kwargs = dict(prompt=PROMPT, seed=0, steps=STEPS, **request)
    client.generate(**kwargs, timeout_s=300)  # warm-up
    runs = [client.generate(**kwargs, timeout_s=300) for _ in range(repeats)]
    return runs


def device_ms(latency: Latency, k: int | None, instances: int) -> float:
    """Device time a run waits for: per round, its largest call (a CFG draft is 2 rows)."""
    sizes = [1] * STEPS if k is None else round_sizes(STEPS, "aggressive", k)
    return sum(latency(2 * -(-n // instances)) for n in sizes)


def cell(name, runs, latency, k, instances, seq):
    rounds = runs[0].rounds
    denoise = statistics.median(r.denoise_ms for r in runs)
    median = statistics.median(r.latency_ms for r in runs)
    device = device_ms(latency, k, instances)
    ideal = STEPS / rounds
    bound = device_ms(latency, None, 1) / device
    speedup = seq / median if seq else 1.0
    return dict(
        name=name,
        k=k or 1,
        rounds=rounds,
        median=median,
        speedup=speedup,
        ideal=ideal,
        bound=bound,
        overhead=(denoise - device) / rounds,
    )


def machine_busy_s() -> float:
    """CPU seconds this machine has been busy (all processes, all cores: /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_s() -> float:
    """CPU seconds of this script and of the servers it started and waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def others_share(seconds: float = 3.0) -> float:
    """Share of the machine's cores that other processes use now, over ``seconds``."""
    busy, own = machine_busy_s(), own_cpu_s()
    time.sleep(seconds)
    return ((machine_busy_s() - busy) - (own_cpu_s() - own)) / (seconds * os.cpu_count())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=list(H100_MS), default="sdxl")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    args = parser.parse_args()
    model, table = H100_MS[args.profile]
    latency = Latency.fit(table)
    others_before = others_share()
    print(f"{model}: {latency.base:.1f} ms + {latency.per_row:.2f} ms per row")
    run_start, busy_start, own_start = time.monotonic(), machine_busy_s(), own_cpu_s()
    work = Path(tempfile.mkdtemp(prefix="driffusion-bench-remote-"))
    os.environ.setdefault("DRIFFUSION_CACHE", str(work / "cache"))
    pipeline = build_tiny_pipeline("sd21", work / "tiny")

    def repository(instances: int) -> Path:
        settings = RepositorySettings(
            denoiser_instances=instances,
            orchestrator_instances=1,
            emulated_latency_ms=latency.base,
            emulated_latency_per_item_ms=latency.per_row,
        )
        return build_repository(pipeline, work / f"repo{instances}", settings, progress=None)

    repo8, repo4 = repository(8), repository(4)
    cells = []

    # 1. one node with 8 GPUs: every draft local
    server = Serve(repo8)
    try:
        with DriffusionClient(server.url) as client:
            seq_runs = timed(client, args.repeats, mode="sequential")
            seq = statistics.median(r.latency_ms for r in seq_runs)
            cells.append(cell("sequential", seq_runs, latency, None, 8, None))
            runs = timed(client, args.repeats, mode="aggressive", k=8)
            cells.append(cell("k=8, one node of 8 GPUs (8 local)", runs, latency, 8, 8, seq))
    finally:
        server.stop()

    # 2. A alone (B not running yet): 4 GPUs, the hybrid
    b_ports = find_free_ports(3)
    a = Serve(repo4, "--remote-denoisers", f"127.0.0.1:{b_ports[1]}")
    b = None
    try:
        with DriffusionClient(a.url) as client:
            runs = timed(client, args.repeats, mode="aggressive", k=8)
            cells.append(
                cell("k=8, one node of 4 GPUs (4 local, hybrid)", runs, latency, 8, 4, seq)
            )
            # 3. B up: 4 local + 4 remote
            b = Serve(repo4, "--role", "denoiser", ports=b_ports)
            remote = f"127.0.0.1:{b_ports[1]}"
            deadline = time.monotonic() + 60
            while a.calls().get(remote, (0, 0))[0] == 0:
                assert time.monotonic() < deadline, "A never used B"
                client.generate(prompt=PROMPT, steps=8, k=8, timeout_s=120)
            runs = timed(client, args.repeats, mode="aggressive", k=4)
            cells.append(cell("k=4, 4 local + 4 remote (stays local)", runs, latency, 4, 4, seq))
            before = a.calls()
            runs = timed(client, args.repeats, mode="aggressive", k=8)
            after = a.calls()
            cells.append(cell("k=8, 4 local + 4 remote", runs, latency, 8, 8, seq))
    finally:
        for s in (a, b):
            if s is not None:
                s.stop()
    wall = time.monotonic() - run_start
    own = own_cpu_s() - own_start
    others_during = ((machine_busy_s() - busy_start) - own) / (wall * os.cpu_count())
    others_after = others_share()

    def mean_ms(calls, key, base=None):
        n, total = calls.get(key, (0, 0))
        if base is not None:
            n0, t0 = base.get(key, (0, 0))
            n, total = n - n0, total - t0
        return (total / n * 1e3 if n else float("nan")), int(n)

    local_ms, local_n = mean_ms(after, "local", before)
    remote_ms, remote_n = mean_ms(after, remote, before)
    by_name = {c["name"]: c for c in cells}
    fanned = by_name["k=8, 4 local + 4 remote"]
    all_local = by_name["k=8, one node of 8 GPUs (8 local)"]
    hybrid = by_name["k=8, one node of 4 GPUs (4 local, hybrid)"]
    rows = [
        "| run | rounds | median ms | speedup | ideal | of ideal | device-bound | of device-bound "
        "| overhead ms/round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        rows.append(
            f"| {c['name']} | {c['rounds']} | {c['median']:.0f} | {c['speedup']:.2f} "
            f"| {c['ideal']:.2f} | {c['speedup'] / c['ideal']:.3f} | {c['bound']:.2f} "
            f"| {c['speedup'] / c['bound']:.3f} | {c['overhead']:.1f} |"
        )
    per_call = remote_ms - local_ms
    of_ideal = lambda c: c["speedup"] / c["ideal"]  # noqa: E731
    per_round = fanned["overhead"] - all_local["overhead"]
    quiet = max(others_before, others_during, others_after) < 0.1
    verdict = "quiet" if quiet else "NOT quiet: other work competed for the cores"
    body = f"""## Remote denoisers: a remote call against a local one (`benchmarks/bench_remote.py`)

Tiny SD2.1-like pipeline (random weights, 64 px), S={STEPS}, CFG, aggressive, one client, real
`driffusion serve` processes on loopback (client -> A's front -> A's Triton; A's orchestrator ->
B's front -> B's Triton for remote calls). Every denoiser call, local or remote, is padded to the
latency one H100 measured for {model} (fit {latency.base:.1f} ms + {latency.per_row:.2f} ms per
batch row; a CFG draft is 2 rows, {latency(2):.1f} ms). *one node of 8 GPUs*: one server with 8
denoiser instances; *4 local, hybrid*: server A with 4 instances while its remote server B is
down (2 drafts per call); *4 local + 4 remote*: A and B (`--role denoiser`, 4 instances) on
this same machine. Median of {args.repeats} after a warm-up; *ideal* = S / rounds;
*device-bound* = sequential device time over this run's; *overhead* = denoising time per round
beyond the device time.

{chr(10).join(rows)}

**Cost of a remote call.** In the k=8 runs over 4 local + 4 remote instances (each round 4 local
and 4 remote calls at once), A's `{CALLS}` histogram gives a mean of
{local_ms:.1f} ms per local call ({local_n} calls) and {remote_ms:.1f} ms per remote call
({remote_n} calls): **{per_call:+.1f} ms per remote call** on loopback (serialization, gRPC, B's
front and Triton; the pad is {latency(2):.1f} ms). A round waits for its slowest call: its
overhead beyond the device time is {fanned["overhead"]:.1f} ms over 4 + 4 against
{all_local["overhead"]:.1f} ms over 8 local instances (**{per_round:+.1f} ms per round**), and k=8
reaches {of_ideal(fanned):.3f} of the ideal {fanned["ideal"]:.2f}x against
{of_ideal(all_local):.3f} on the 8-GPU node and {of_ideal(hybrid):.3f} on the 4-GPU node.

Other processes used {others_before:.0%} of the {os.cpu_count()} cores before the run,
{others_during:.0%} during it (the machine's busy time less this run's own) and
{others_after:.0%} after it: {verdict}.
A, B and the client share these cores, so B's CPU work (its front, Triton, the tiny model)
competes with A's orchestrator here; on separate nodes it does not, and the network
adds its round trip and the transfer: SD2.1 sends about 0.6 MB per CFG draft in fp16 (latents
and text conditions, request and response), 0.05 ms at 100 Gbit/s, 0.5 ms at 10 Gbit/s.
"""
    write_section("remote", body)


if __name__ == "__main__":
    main()
