"""One GPU, served: SD2.1 768 px in Triton, torch engine, sequential against DRiffusion.

    python benchmarks/bench_gpu_served.py [--triton DIR] [--python PY] [--out DIR] [--write]
    python benchmarks/bench_gpu_served.py --tiny --device cpu --steps 8 --k 2 --wide-k 3  # smoke

The model is ``bench_gpu.py``'s: a ``StableDiffusionPipeline`` with SD2.1-768's architecture and
random weights (real FLOPs), built on the device and saved in fp16 (fp32 on the CPU; nothing is
downloaded). ``build_repository`` writes its ``torch``-engine repository: every component a
python-backend model running PyTorch on the GPU (``KIND_GPU``, fp16; on the CPU ``KIND_CPU``,
fp32), ``--k`` denoiser instances on the one GPU; one orchestrator instance. A real
``tritonserver`` serves it: the nvidia-pytriton wheel's, from ``--triton DIR`` where the wheel's
parts were unpacked (``benchmarks/gpu/pack_server.sh``, ``TritonDistribution.from_folder``), else
the installed wheel; its models run in ``--python``'s environment (default this interpreter's).

Measured through the server with the gRPC client (``DriffusionClient``), S = ``--steps``, CFG 7.5,
each configuration a warm-up then ``--repeats`` timed requests of the same prompt and seed:
sequential; aggressive k = ``--k`` with the drafts fanned out over the k instances; the same with
the drafts as one batched request (``fanout=batch``); then, on a second server with ``--wide-k``
instances, aggressive k = ``--wide-k`` both ways. Reported: end-to-end latency (client), rounds,
the time the orchestrator waited per round for the denoiser and its own host time per round (the
response's ``denoise_ms`` and ``host_ms``), the denoiser's time per call as Triton counts it
(``/v2/models/denoiser/stats``), device memory per process (``nvidia-smi
--query-compute-apps``, mapped to the workers' pids) against the UNet's fp16 weights, and the
device-bound expectation of fan-out from the sequential run's per-call time. The targets (issue
13): drafts batched at least 1.35x faster than sequential at k=4, host time per round under 2 ms,
no device memory per instance beyond the model and its activations.

``--out DIR`` writes ``gpu_served.md`` (and the server logs) there as soon as each table is
measured; ``--write`` puts the same into the ``gpu-served`` section of BENCHMARKS.md
(``DRIFFUSION_BENCHMARKS`` names another copy). The table is printed in any case. Not a test
(``tests/test_gpu_served.py`` runs the tiny CPU form). On the lent GPU machine,
``benchmarks/gpu/run_served.sh`` runs it from the packed files (``benchmarks/gpu/README.md``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_gpu import FULL, GUIDANCE, PROMPT, TINY, build_pipeline

from driffusion import count_rounds
from driffusion.client import DriffusionClient, GenerateResult, psnr
from driffusion.model_repository.build import RepositorySettings, build_repository
from driffusion.model_repository.serve import bls_thread_pool_size
from driffusion.model_repository.server import (
    TritonDistribution,
    TritonServer,
    locate_tritonserver,
)
from report import write_section

SECTION = "gpu-served"
MIB = 2**20
TARGET_SPEEDUP = 1.35  # drafts batched, k=4, end to end
TARGET_HOST_MS = 2.0  # the orchestrator's own time per round
SLACK_MIB = 64  # allocator granularity: what "no extra memory" tolerates
COMPUTE = ("compute_input", "compute_infer", "compute_output")  # Triton's per-request phases


def say(message: str) -> None:
    print(f"[gpu-served {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the GPU, as nvidia-smi sees it -------------------------------------------------------------


def nvidia_smi(*query: str) -> list[list[str]] | None:
    """CSV rows of an nvidia-smi query, or None where there is no nvidia-smi (or it fails)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line]


def card_name() -> str | None:
    rows = nvidia_smi("--query-gpu=name,memory.total,driver_version")
    if not rows or len(rows[0]) < 3:
        return None
    name, total, driver = rows[0][:3]
    return f"{name} ({total} MiB, driver {driver})"


def device_memory() -> dict[int, float] | None:
    """{pid: MiB} of the compute processes on the GPUs; None without nvidia-smi."""
    rows = nvidia_smi("--query-compute-apps=pid,used_memory")
    if rows is None:
        return None
    usage: dict[int, float] = {}
    for row in rows:
        try:
            usage[int(row[0])] = usage.get(int(row[0]), 0.0) + float(row[1])
        except (IndexError, ValueError):  # "[N/A]" where the driver cannot tell
            continue
    return usage


# --- what one UNet instance needs, measured in this process -------------------------------------


@dataclass
class Reference:
    """The memory a plain PyTorch process needs for the UNet, measured here on the same device."""

    weights_mib: float  # the UNet's parameters in the served dtype
    context_mib: float | None = None  # CUDA context and libraries: nvidia-smi minus torch's pool
    activations_mib: dict[int, float] = field(default_factory=dict)  # batch rows -> pool growth


def reference_memory(pipe, device: torch.device, batches: list[int], hw) -> Reference:
    unet = pipe.unet
    weights = sum(p.numel() * p.element_size() for p in unet.parameters()) / MIB
    ref = Reference(weights)
    if device.type != "cuda":
        return ref
    h, w = hw[0] // 8, hw[1] // 8
    width = unet.config.cross_attention_dim
    gc.collect()
    torch.cuda.empty_cache()
    # before any call: what the first one allocates for good (cuBLAS workspaces) is activation
    # memory too, and stays in every later measurement
    before = torch.cuda.memory_reserved(device)
    for rows in sorted(set(batches)):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(rows, 4, h, w, device=device, dtype=unet.dtype)
        t = torch.full((rows,), 999, device=device)
        text = torch.randn(rows, 77, width, device=device, dtype=unet.dtype)
        with torch.inference_mode():
            unet(x, t, encoder_hidden_states=text, return_dict=False)
        torch.cuda.synchronize(device)
        ref.activations_mib[rows] = (torch.cuda.max_memory_reserved(device) - before) / MIB
        del x, t, text
    used = (device_memory() or {}).get(os.getpid())
    if used is not None:
        ref.context_mib = used - torch.cuda.memory_reserved(device) / MIB
    return ref


# --- one configuration through the server -------------------------------------------------------


@dataclass(frozen=True)
class Config:
    mode: str  # sequential | aggressive
    k: int
    fanout: str  # instances | batch


@dataclass
class Measured:
    config: Config
    instances: int
    runs: list[GenerateResult]
    calls: int  # denoiser requests during the timed runs (Triton's statistics)
    call_ms: float  # Triton's compute time per denoiser request (input + infer + output)

    @property
    def median_ms(self) -> float:
        return statistics.median(r.latency_ms for r in self.runs)

    @property
    def rounds(self) -> int:
        return self.runs[-1].rounds

    @property
    def wait_ms(self) -> float:
        """Per round: what the orchestrator waited for the denoiser's answers."""
        return statistics.median((r.denoise_ms - r.host_ms) / r.rounds for r in self.runs)

    @property
    def host_ms(self) -> float:
        """Per round: the orchestrator's own work (drafts, refinement, CFG, tensors)."""
        return statistics.median(r.host_ms / r.rounds for r in self.runs)

    @property
    def image(self) -> np.ndarray:
        return self.runs[-1].image


def denoiser_stats(server: TritonServer) -> tuple[int, float]:
    """(requests, ns) the denoiser model has served so far (Triton's statistics API)."""
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/denoiser/stats", headers=server.admin_headers
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        data = json.load(response)
    count, ns = 0, 0.0
    for model in data.get("model_stats", []):
        stats = model["inference_stats"]
        count += int(stats["success"]["count"])
        ns += sum(float(stats[phase]["ns"]) for phase in COMPUTE)
    return count, ns


def measure(client, server, config: Config, instances: int, args) -> Measured:
    fields = dict(
        prompt=PROMPT,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=GUIDANCE,
        mode=config.mode,
        k=config.k,
        fanout=config.fanout,
        timeout_s=600.0,
    )
    client.generate(**fields)  # warm-up: kernels, allocator growth, every instance reached
    calls0, ns0 = denoiser_stats(server)
    runs = [client.generate(**fields) for _ in range(args.repeats)]
    calls1, ns1 = denoiser_stats(server)
    calls = calls1 - calls0
    m = Measured(config, instances, runs, calls, (ns1 - ns0) / max(calls, 1) / 1e6)
    say(
        f"{config.mode} k={config.k} {config.fanout} x{instances}: {m.median_ms:.1f} ms, "
        f"{m.rounds} rounds, wait {m.wait_ms:.1f} ms/round, host {m.host_ms:.2f} ms/round"
    )
    return m


@dataclass
class Memory:
    """Device memory of a server's processes after its runs (None: not measured, e.g. CPU)."""

    instances: int
    rows: list[tuple[str, int, float | None]] | None  # (process, pid, MiB)
    max_batch: int  # the most rows one denoiser request of this server had


def server_memory(server: TritonServer, instances: int, max_batch: int) -> Memory:
    usage = device_memory()
    if usage is None:
        return Memory(instances, None, max_batch)
    stubs = sorted(server.stubs(), key=lambda s: (s.model != "denoiser", s.model, s.instance))
    rows = [(f"{s.model} ({s.instance})", s.pid, usage.get(s.pid)) for s in stubs]
    rows.append(("tritonserver", server.pid, usage.get(server.pid)))
    return Memory(instances, rows, max_batch)


def run_server(pipeline: Path, work: Path, instances: int, configs, args, dist) -> tuple:
    """Build the repository for ``instances`` denoiser instances, serve it, measure ``configs``.
    Returns ([Measured], Memory)."""
    cuda = args.device.type == "cuda"
    settings = RepositorySettings(
        engine="torch",
        gpus=(args.device.index or 0,) if cuda else (),
        denoiser_instances=instances,
        orchestrator_instances=1,
        max_k=max(args.k, args.wide_k),
    )
    repository = work / f"repository-{instances}"
    t0 = time.perf_counter()
    build_repository(pipeline, repository, settings, progress=lambda m: say(str(m)))
    say(f"repository with {instances} denoiser instances built in {time.perf_counter() - t0:.0f} s")
    log = (args.out or work) / f"server-{instances}.log"
    # Each python-backend worker maps a shared-memory region of this size at start (it grows for
    # larger requests): smaller where /dev/shm is small, as in some containers.
    workers = instances + 3  # + text encoder, VAE decoder, orchestrator
    shm = 16 * MIB if shutil.disk_usage("/dev/shm").free > 4 * workers * 16 * MIB else 4 * MIB
    server = TritonServer.on_free_ports(
        repository,
        distribution=dist,
        python=args.python,
        log_path=log,
        start_timeout_s=600,
        thread_pool_size=bls_thread_pool_size(repository),
        shm_default_byte_size=shm,
    )
    t0 = time.perf_counter()
    try:
        server.start()
        say(f"server ready in {time.perf_counter() - t0:.0f} s (log {log})")
        measured = []
        with DriffusionClient(server.grpc_url) as client:
            client.wait_ready(timeout_s=300)
            for config in configs:
                measured.append(measure(client, server, config, instances, args))
        max_batch = 2 * max(c.k if c.fanout == "batch" else 1 for c in configs)
        memory = server_memory(server, instances, max_batch)
    except BaseException:
        print(server.log_tail(60), file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(repository, ignore_errors=True)
    return measured, memory


# --- the report ---------------------------------------------------------------------------------


def latency_table(rows: list[Measured], base: Measured, steps: int) -> str:
    lines = [
        "| mode | k | fan-out | instances | rounds | ideal | median ms | speedup | wait ms/round "
        "| denoiser ms/call | host ms/round | PSNR vs seq dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        c = m.config
        seq = c.mode == "sequential"
        quality = "-" if m is base else f"{psnr(m.image, base.image):.1f}"
        lines.append(
            f"| {c.mode} | {'-' if seq else c.k} | {'-' if seq else c.fanout} | {m.instances} | "
            f"{m.rounds} | {steps / m.rounds:.2f} | {m.median_ms:.1f} | "
            f"{base.median_ms / m.median_ms:.2f} | {m.wait_ms:.1f} | {m.call_ms:.1f} | "
            f"{m.host_ms:.2f} | {quality} |"
        )
    return "\n".join(lines)


def memory_table(memories: list[Memory], ref: Reference) -> str:
    if all(m.rows is None for m in memories):
        return "Device memory: n/a (no nvidia-smi: measured on a GPU only)."
    lines = [
        "| server | process | pid | device MiB | UNet weights MiB | excess MiB | context + "
        "activations MiB | beyond MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mem in memories:
        if mem.rows is None:
            continue
        bound = _bound(mem, ref)
        for process, pid, used in mem.rows:
            cells = ["n/a" if used is None else f"{used:.0f}", "-", "-", "-", "-"]
            if process.startswith("denoiser") and used is not None:
                excess = used - ref.weights_mib
                cells[1:3] = [f"{ref.weights_mib:.0f}", f"{excess:+.0f}"]
                cells[3:] = ["n/a", "n/a"]
                if bound is not None:
                    cells[3:] = [f"{bound:.0f}", f"{excess - bound:+.0f}"]
            lines.append(f"| x{mem.instances} | {process} | {pid} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _bound(mem: Memory, ref: Reference) -> float | None:
    """CUDA context + the activations of the largest batch ``mem``'s server sent one instance."""
    act = ref.activations_mib.get(mem.max_batch)
    return None if ref.context_mib is None or act is None else ref.context_mib + act


def beyond_mib(memories: list[Memory], ref: Reference) -> float | None:
    """The largest device memory of a denoiser instance beyond weights + context + activations."""
    values = [
        used - ref.weights_mib - bound
        for mem in memories
        if mem.rows is not None and (bound := _bound(mem, ref)) is not None
        for process, _pid, used in mem.rows
        if process.startswith("denoiser") and used is not None
    ]
    return max(values) if values else None


def expectation_table(measured: dict[Config, Measured], base: Measured, ks, steps: int) -> str:
    """Fan-out against the device-bound expectation from the sequential run's per-call time."""
    t1 = base.wait_ms  # one denoiser call of one state (CFG pair), as the orchestrator waits for it
    lines = [
        "| k | instances | rounds | sequential ms/call | fan-out wait ms/round | batched wait "
        "ms/round | device-bound speedup | fan-out speedup | batched speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        fan = measured.get(Config("aggressive", k, "instances"))
        bat = measured.get(Config("aggressive", k, "batch"))
        if fan is None:
            continue
        # every round costs one call, as if each instance had a device of its own
        bound = base.median_ms / (base.median_ms - steps * t1 + fan.rounds * t1)
        batched = "-" if bat is None else f"{bat.wait_ms:.1f}"
        batched_x = "-" if bat is None else f"{base.median_ms / bat.median_ms:.2f}"
        lines.append(
            f"| {k} | {fan.instances} | {fan.rounds} | {t1:.1f} | {fan.wait_ms:.1f} | {batched} | "
            f"{bound:.2f} | {base.median_ms / fan.median_ms:.2f} | {batched_x} |"
        )
    return "\n".join(lines)


def verdicts(measured: dict[Config, Measured], base, memories, ref, args) -> str:
    lines = []
    bat = measured.get(Config("aggressive", args.k, "batch"))
    if bat is not None:
        x = base.median_ms / bat.median_ms
        ok = "met" if x >= TARGET_SPEEDUP else "not met"
        lines.append(
            f"- drafts batched at k={args.k}: {x:.2f}x lower latency than sequential end to end "
            f"(target >= {TARGET_SPEEDUP}x for SD2.1 at k=4): {ok}"
        )
    host = max(m.host_ms for m in measured.values())
    ok = "met" if host < TARGET_HOST_MS else "not met"
    lines.append(
        f"- host time per round: at most {host:.2f} ms over the configurations "
        f"(target < {TARGET_HOST_MS:g} ms): {ok}"
    )
    worst = beyond_mib(memories, ref)
    if worst is None:
        lines.append("- device memory per instance beyond the model and its activations: n/a")
    else:
        ok = "met" if worst <= SLACK_MIB else "not met"
        lines.append(
            f"- device memory per denoiser instance beyond weights + CUDA context + activations: "
            f"at most {worst:+.0f} MiB (target: none, {SLACK_MIB} MiB of allocator slack): {ok}"
        )
    wide = measured.get(Config("aggressive", args.wide_k, "instances"))
    if wide is not None:
        t1 = base.wait_ms
        bound = base.median_ms / (base.median_ms - args.steps * t1 + wide.rounds * t1)
        x = base.median_ms / wide.median_ms
        lines.append(
            f"- k={args.wide_k} on {wide.instances} instances: fan-out {x:.2f}x against a "
            f"device-bound {bound:.2f}x ({x / bound:.0%} of it); a round waited "
            f"{wide.wait_ms:.1f} ms against {t1:.1f} ms for one call alone"
        )
    return "\n".join(lines)


def render(measured, memories, ref, header: str, args, notes: list[str]) -> str:
    base = measured[Config("sequential", 1, "instances")]
    rows = list(measured.values())
    model = "tiny stand-in" if args.tiny else "SD2.1"
    size = f"{args.size}x{args.size} px"
    ks = [k for k in (args.k, args.wide_k) if k]
    context = "n/a" if ref.context_mib is None else f"{ref.context_mib:.0f} MiB"
    activations = ", ".join(f"{r} rows {v:.0f} MiB" for r, v in sorted(ref.activations_mib.items()))
    activations = activations or "n/a"
    body = f"""## One GPU, served: {model} {size}, torch engine (`benchmarks/bench_gpu_served.py`)

{header}

The pipeline of `bench_gpu.py` (random weights, {args.steps} DDIM v-prediction steps, CFG
{GUIDANCE}) served by Triton with `engine="torch"`: text encoder, denoiser and VAE decoder are
python-backend models running PyTorch on the device; one orchestrator instance; each row a warm-up
then the median of {args.repeats} requests over gRPC (`DriffusionClient`), same prompt and seed.
*fan-out* `instances`: a round's drafts as concurrent requests, one per denoiser instance, all on
the one device; `batch`: one request with every draft. *ideal* = S / rounds; *wait ms/round*: what
the orchestrator waited for the denoiser per round, *host ms/round*: its own work per round (the
response's `denoise_ms` and `host_ms`); *denoiser ms/call*: Triton's compute time per denoiser
request (input + infer + output, `/v2/models/denoiser/stats`); *PSNR vs seq dB*: the image against
the sequential one.

{latency_table(rows, base, args.steps)}

Device memory after the runs (`nvidia-smi --query-compute-apps`, by the workers' pids).
*excess*: the process's memory minus the UNet's weights ({ref.weights_mib:.0f} MiB); *context +
activations*: what a plain PyTorch process on the same device needs beside the weights, measured
here: its CUDA context and libraries ({context}) plus what one UNet call of the largest batch that
server sent one instance added to torch's pool ({activations}); *beyond*: the excess that
neither explains.

{memory_table(memories, ref)}

Fan-out on one device against its device-bound expectation: *device-bound speedup* is what the
sequential run's per-call time t1 (its wait per round) predicts when every round costs one call,
as with a device per instance: sequential ms / (sequential ms - S t1 + rounds t1).

{expectation_table(measured, base, ks, args.steps)}

Targets (issue 13):

{verdicts(measured, base, memories, ref, args)}
"""
    if notes:
        body += "\n" + "\n".join(f"Note: {n}" for n in notes) + "\n"
    return body


def publish(body: str, args, final: bool) -> None:
    """The table into --out and (--write) BENCHMARKS.md as soon as it exists; printed at the end."""
    if args.out is not None:
        (args.out / "gpu_served.md").write_text(body)
    if args.write:
        try:
            write_section(SECTION, body)
        except OSError as error:
            say(f"BENCHMARKS.md not written: {error}")
    if final:
        print(body, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny stand-in model (smoke run)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps S")
    parser.add_argument(
        "--k", type=int, default=4, help="k of the first server (and its instances)"
    )
    parser.add_argument("--wide-k", type=int, default=8, help="k of the second server; 0: skip")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests after the warm-up")
    parser.add_argument("--seed", type=int, default=0, help="initial noise seed")
    parser.add_argument("--triton", type=Path, help="unpacked server (default: installed wheel)")
    parser.add_argument("--python", type=Path, help="interpreter of the models' environment")
    parser.add_argument("--out", type=Path, help="write gpu_served.md and server logs here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--write", action="store_true", help="write the gpu-served section")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 2 or args.k < 2 or args.wide_k < 0:
        parser.error("--repeats >= 1, --steps >= 2, --k >= 2 and --wide-k >= 0")
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    sizes = TINY if args.tiny else FULL
    args.size = sizes.image_size
    dtype = torch.float16 if cuda else torch.float32
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    dist: TritonDistribution = (
        TritonDistribution.from_folder(args.triton) if args.triton else locate_tritonserver()
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="driffusion-gpu-served-"))
    work.mkdir(parents=True, exist_ok=True)

    import diffusers
    import transformers

    t0 = time.perf_counter()
    pipe = build_pipeline(sizes, args.device, dtype)
    batches = [2, 2 * args.k] + ([2 * args.wide_k] if args.wide_k else [])
    ref = reference_memory(pipe, args.device, batches, (args.size, args.size))
    pipeline = work / "pipeline"
    pipe.save_pretrained(pipeline, safe_serialization=True)
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    say(f"pipeline built and saved ({str(dtype)[6:]}) in {time.perf_counter() - t0:.0f} s")

    card = card_name()
    where = f"unpacked from the pack in `{args.triton.name}`" if args.triton else "installed wheel"
    header = (
        f"Card: {card or 'none (CPU run)'}; device {args.device} ({str(dtype)[6:]}); torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}; Triton 2.51 from nvidia-pytriton {dist.version} "
        f"({where}); models' Python: `{args.python or sys.executable}`."
    )
    say(header)
    measured: dict[Config, Measured] = {}
    memories: list[Memory] = []
    notes: list[str] = []
    if not cuda:
        notes.append("a CPU run checks the served path; its numbers say nothing of the targets.")
    status = 0
    first = [
        Config("sequential", 1, "instances"),
        Config("aggressive", args.k, "instances"),
        Config("aggressive", args.k, "batch"),
    ]
    try:
        rows, memory = run_server(pipeline, work, args.k, first, args, dist)
        measured.update({m.config: m for m in rows})
        memories.append(memory)
        if args.wide_k:
            notes.append(f"k={args.wide_k} on {args.wide_k} instances: not measured yet.")
        publish(render(measured, memories, ref, header, args, notes), args, final=False)
        if args.wide_k:
            wide = [Config("aggressive", args.wide_k, f) for f in ("instances", "batch")]
            try:
                rows, memory = run_server(pipeline, work, args.wide_k, wide, args, dist)
                measured.update({m.config: m for m in rows})
                memories.append(memory)
                notes.pop()
            except Exception as error:  # the first server's numbers stand
                traceback.print_exc()
                notes[-1] = f"k={args.wide_k} failed: {type(error).__name__}: {error}"
                status = 1
        for m in measured.values():
            expected, _ = count_rounds(args.steps, m.config.mode, m.config.k)
            if m.rounds != expected:
                notes.append(f"{m.config}: {m.rounds} rounds, count_rounds says {expected}")
                status = 1
        publish(render(measured, memories, ref, header, args, notes), args, final=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
