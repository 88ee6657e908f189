"""Sequential against a DRiffusion mode on one seed, through a running server: the numbers behind
``driffusion bench`` and ``driffusion demo``."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driffusion import api

from .client import DriffusionClient, GenerateResult, max_abs_diff, psnr, save_png

Progress = Callable[[str], AbstractContextManager[object]]


@dataclass
class Comparison:
    """Timed runs of the sequential sampler and of one DRiffusion mode, same request otherwise."""

    url: str
    mode: str  # the DRiffusion mode compared
    k: int | None  # its k (None: the server's default)
    request: dict[str, Any]  # the inputs sent (the mode's)
    runs: dict[str, list[GenerateResult]] = field(default_factory=dict)  # mode -> timed runs

    def median_ms(self, mode: str) -> float:
        return statistics.median(r.latency_ms for r in self.runs[mode])

    def table(self) -> str:
        """The comparison as the CLI prints it."""
        seq, drf = self.runs["sequential"], self.runs[self.mode]
        steps = seq[0].rounds  # sequential takes one round per step
        base = self.median_ms("sequential")
        seed = self.request.get(api.SEED.name, "server default")
        fanout = self.request.get(api.FANOUT.name, "server default")
        lines = [
            f"{self.url}: {steps} steps, seed {seed}, fanout {fanout}; median of {len(seq)} "
            "after one warm-up each",
            f"{'mode':<13} {'k':>2} {'rounds':>6} {'evals':>5} {'median ms':>10} "
            f"{'speedup':>8} {'ideal':>7}",
        ]
        for mode, rs, k in (("sequential", seq, "-"), (self.mode, drf, self.k or "-")):
            median = self.median_ms(mode)
            lines.append(
                f"{mode:<13} {k:>2} {rs[0].rounds:>6} {rs[0].evaluations:>5} {median:>10.1f} "
                f"{base / median:>7.2f}x {steps / rs[0].rounds:>6.2f}x"
            )
        a, b = seq[-1].image, drf[-1].image
        lines.append(
            f"image difference {self.mode} vs sequential: PSNR {psnr(a, b):.2f} dB, "
            f"max abs diff {max_abs_diff(a, b)}"
        )
        for mode, rs in self.runs.items():
            worst = max(max_abs_diff(rs[0].image, r.image) for r in rs)
            if worst:
                lines.append(f"note: {mode} images differ between repeats (max abs diff {worst})")
        return "\n".join(lines)

    def write_images(self, out_dir: Path) -> list[Path]:
        """The last image of each mode as PNG: ``sequential.png``, ``<mode>-k<k>.png``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        names = {"sequential": "sequential.png", self.mode: f"{self.mode}-k{self.k}.png"}
        return [save_png(self.runs[m][-1].image, out_dir / name) for m, name in names.items()]


def compare(
    client: DriffusionClient,
    request: dict[str, Any],
    repeats: int = 3,
    timeout_s: float | None = None,
    progress: Progress | None = None,
) -> Comparison:
    """Time ``request`` (its mode, default aggressive) against the same request run sequentially:
    one warm-up each, then ``repeats`` runs alternating, so drift hits both modes alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    step = progress or (lambda _label: contextlib.nullcontext())
    mode = request.get(api.MODE.name, "aggressive")
    if mode == "sequential":
        raise ValueError("mode must be a DRiffusion mode (aggressive, conservative) to compare")
    drafted = {**request, api.MODE.name: mode}
    sequential = {k: v for k, v in request.items() if k not in (api.K.name, api.K_SCHEDULE.name)}
    requests = {"sequential": {**sequential, api.MODE.name: "sequential"}, mode: drafted}
    result = Comparison(client.url, mode, request.get(api.K.name), drafted)
    result.runs = {m: [] for m in requests}
    for m, req in requests.items():
        with step(f"warm-up {m}"):
            client.generate(**req, timeout_s=timeout_s)
    for i in range(repeats):
        for m, req in requests.items():
            with step(f"{m} {i + 1}/{repeats}"):
                result.runs[m].append(client.generate(**req, timeout_s=timeout_s))
    return result
