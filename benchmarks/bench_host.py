"""The orchestrator's host time per round at real model sizes, without Triton.

    .venv/bin/python benchmarks/bench_host.py [--repeats 5] [--write]

The served orchestrator (``driffusion.service.Orchestrator``) of SD2.1 (768 px: 4x96x96 latents,
77x1024 text conditions) and SDXL (1024 px: 4x128x128, 77x2048 plus pooled and time ids), its
model calls answered at once by an in-process stand-in that returns zeros of the right shapes:
everything that is left of ``denoise_ms`` is the orchestrator's own work per round (drafting,
refinement, guidance, building each request's tensors). S=50, CFG, aggressive k=4, fan-out over 4
instances and batched. Writes the ``host`` section of BENCHMARKS.md with ``--write``. Not a test.

The same script measured the code before the per-round conditions were cast and tiled once per
request (commit 28ff7cb) with ``--label before``; ``--write`` keeps both rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

try:  # the code before the structure change (run with that checkout on PYTHONPATH)
    from driffusion.specs import get_family
except ImportError:  # this checkout
    from driffusion.families import get_family

from driffusion import api
from driffusion.service import Orchestrator, ServiceSettings
from report import BENCHMARKS, write_section

SIZES = {"sd21": 768, "sdxl": 1024}


def stand_in(family):
    """``infer`` answering every model at once with zeros of its outputs' shapes."""

    async def infer(model, inputs, outputs):
        spec = family.components[model]
        first = next(iter(inputs.values()))
        batch = first.shape[0]
        height, width = (first.shape[2] * 8, first.shape[3] * 8) if first.ndim == 4 else (8, 8)
        dims = spec.dims(batch, height, width)
        return {t.name: np.zeros(t.resolve(dims), t.dtype) for t in spec.outputs}

    return infer


def orchestrator(name: str, work: Path, pipelines: Path) -> Orchestrator:
    """The orchestrator of family ``name`` with a tiny pipeline's tokenizers and scheduler (the
    sizes come from the family spec, not from the pipeline)."""
    family = get_family(name)
    pipeline = pipelines / f"tiny-{name}"
    if not (pipeline / "model_index.json").exists():
        from driffusion.export.tiny import build_tiny_pipeline

        build_tiny_pipeline(name, pipeline)
    version = work / name
    (version / "pipeline").mkdir(parents=True)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        source = pipeline / tokenizer
        if source.exists():
            (version / "pipeline" / tokenizer).symlink_to(source)
    (version / "pipeline" / "scheduler").symlink_to(pipeline / "scheduler")
    side = SIZES[name]
    limits = api.Limits(max_size=side, max_k=8, size_multiple=8)
    defaults = api.Defaults(height=side, width=side, guidance_scale=7.5)
    settings = ServiceSettings(
        family=family, denoiser_instances=4, limits=limits, defaults=defaults
    )
    return Orchestrator(settings, version / "pipeline")


def per_round_ms(orch: Orchestrator, fanout: str, repeats: int) -> float:
    infer = stand_in(orch.family)
    values = {
        "prompt": np.array([b"a photo"], dtype=object),
        "steps": np.array([50], np.int32),
        "k": np.array([4], np.int32),
        "fanout": np.array([fanout.encode()], dtype=object),
    }
    req = orch.parse(values)
    runs = []
    for _ in range(repeats + 1):
        out = asyncio.run(orch.generate(req, infer))
        runs.append(out.denoise_ms / out.rounds)
    return statistics.median(runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label", default="after", help="row label (default after)")
    parser.add_argument(
        "--pipelines", type=Path, default=None, help="folder of the tiny pipelines (kept)"
    )
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-host-"))
    pipelines = args.pipelines or work
    rows = {}
    for name in SIZES:
        orch = orchestrator(name, work, pipelines)
        for fanout in ("instances", "batch"):
            rows[f"{args.label}|{name}|{fanout}"] = per_round_ms(orch, fanout, args.repeats)
            print(args.label, name, fanout, f"{rows[f'{args.label}|{name}|{fanout}']:.2f} ms")
    if args.write:
        keep = Path(BENCHMARKS).with_name(".bench_host.json")
        known = json.loads(keep.read_text()) if keep.exists() else {}
        known.update(rows)
        keep.write_text(json.dumps(known, indent=2))
        lines = [
            "## Orchestrator host time per round (`benchmarks/bench_host.py`)",
            "",
            "The served orchestrator at full SD2.1 (768 px) and SDXL (1024 px) sizes, model calls "
            "answered at once by an in-process stand-in: the time per round is the "
            "orchestrator's own work (drafting, refinement, guidance, building the requests' "
            "tensors). S=50, CFG, aggressive k=4, 4 denoiser instances; one torch thread. "
            "*before*: commit 28ff7cb, which rebuilt and re-cast the text conditions (most of a "
            "request's bytes) for every request of every round; *after*: cast once and tiled "
            "once per request.",
            "",
            "| code | model | fanout | host ms per round |",
            "|---|---|---|---|",
        ]
        for key in sorted(known):
            label, name, fanout = key.split("|")
            lines.append(f"| {label} | {name} | {fanout} | {known[key]:.2f} |")
        write_section("host", "\n".join(lines))


if __name__ == "__main__":
    main()
