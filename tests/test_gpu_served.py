"""``benchmarks/bench_gpu_served.py`` in its tiny CPU form, against the installed server (one
server, k=2 on 2 instances, 8 steps; well under a minute): its table says what the library says
(rounds from ``count_rounds``, DRiffusion images close to the sequential one, fan-out and batched
alike), device memory is reported as not available on a CPU, and ``--out`` / ``--write`` put the
same section into a folder and into another copy of BENCHMARKS.md. The packed form
(``benchmarks/gpu/run_served.sh``) is dry-run by hand (benchmarks/gpu/README.md)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from driffusion import count_rounds

pytest.importorskip("pytriton", reason="tritonserver needs the driffusion[server] extra")

ROOT = Path(__file__).resolve().parent.parent
STEPS, K = 8, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The script's stdout, its --out folder and the BENCHMARKS.md copy it wrote."""
    folder = tmp_path_factory.mktemp("gpu-served")
    copy = folder / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", copy)
    command = [sys.executable, "benchmarks/bench_gpu_served.py", "--tiny", "--device", "cpu"]
    command += ["--steps", str(STEPS), "--k", str(K), "--wide-k", "0", "--repeats", "1"]
    command += ["--out", str(folder / "out"), "--write"]
    env = {**os.environ, "DRIFFUSION_BENCHMARKS": str(copy)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"stdout": done.stdout, "out": folder / "out", "copy": copy}


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """The markdown table whose header starts with ``first_header``, as a list of rows."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)))
    return rows


@pytest.fixture(scope="module")
def rows(run) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["mode"], r["fan-out"]): r for r in table(run["stdout"], "mode")}


def test_every_configuration_has_a_row(rows):
    assert set(rows) == {("sequential", "-"), ("aggressive", "instances"), ("aggressive", "batch")}
    assert {r["instances"] for r in rows.values()} == {str(K)}


def test_rounds_are_those_count_rounds_predicts(rows):
    assert int(rows["sequential", "-"]["rounds"]) == STEPS
    rounds, _ = count_rounds(STEPS, "aggressive", K)
    for fanout in ("instances", "batch"):
        row = rows["aggressive", fanout]
        assert (row["k"], int(row["rounds"])) == (str(K), rounds)
        assert float(row["ideal"]) == pytest.approx(STEPS / rounds, abs=0.005)


def test_drafted_images_are_close_to_the_sequential_one_and_to_each_other(rows):
    # random weights move a drafted image a little (tests/test_bench_gpu.py: > 20 dB); fan-out and
    # batch evaluate the same drafts, in one request or several
    fanned = float(rows["aggressive", "instances"]["PSNR vs seq dB"])
    batched = float(rows["aggressive", "batch"]["PSNR vs seq dB"])
    assert math.isfinite(fanned) and fanned > 20.0
    assert batched == pytest.approx(fanned, abs=1.0)


def test_timings_are_positive_and_host_time_is_within_a_round(rows):
    for row in rows.values():
        assert float(row["median ms"]) > 0 and float(row["wait ms/round"]) > 0
        assert float(row["denoiser ms/call"]) > 0
        assert 0 < float(row["host ms/round"]) < float(row["median ms"]) / int(row["rounds"])


def test_device_memory_is_reported_as_not_available_on_cpu(run):
    assert "Device memory: n/a" in run["stdout"]
    assert "device memory per instance beyond the model and its activations: n/a" in run["stdout"]


def test_the_expectation_table_uses_the_sequential_per_call_time(run, rows):
    (row,) = table(run["stdout"], "k")
    assert row["sequential ms/call"] == rows["sequential", "-"]["wait ms/round"]
    assert row["fan-out speedup"] == rows["aggressive", "instances"]["speedup"]


def test_out_and_write_hold_the_printed_section(run):
    body = (run["out"] / "gpu_served.md").read_text()
    assert body.strip() in run["stdout"]
    text = run["copy"].read_text()
    assert "<!-- begin gpu-served -->" in text and "<!-- end gpu-served -->" in text
    assert table(body, "mode")[0]["median ms"] in text
    assert (run["out"] / f"server-{K}.log").exists()
    assert "<!-- begin gpu-served -->" not in (ROOT / "BENCHMARKS.md").read_text()
