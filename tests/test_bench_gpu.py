"""``benchmarks/bench_gpu.py`` in its tiny CPU form: it runs, and its table says what the library
says (rounds from ``count_rounds``, a DRiffusion image close to the sequential one)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from driffusion import count_rounds

ROOT = Path(__file__).resolve().parent.parent
STEPS, K = 8, 2


@pytest.fixture(scope="module")
def table() -> dict[str, dict[str, str]]:
    """The script's markdown table, as {k column: {header: cell}}."""
    command = [sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--device", "cpu"]
    command += ["--steps", str(STEPS), "--k", str(K), "--repeats", "1", "--threads", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in rows}


def test_the_sequential_row_takes_one_round_per_step(table):
    assert table["-"]["mode"] == "sequential"
    assert int(table["-"]["rounds"]) == STEPS


def test_the_k2_row_has_the_rounds_count_rounds_predicts(table):
    row = table[str(K)]
    rounds, _ = count_rounds(STEPS, "aggressive", K)
    assert (row["mode"], int(row["rounds"])) == ("aggressive", rounds)
    assert float(row["ideal speedup"]) == pytest.approx(STEPS / rounds, abs=0.005)


def test_the_k2_image_is_close_to_the_sequential_one(table):
    # drafts move a random-weight image a little (tests/test_parallel.py: mean abs diff < 0.05);
    # 20 dB is an RMS difference of 0.1 on [0, 1] images
    value = float(table[str(K)]["PSNR vs seq dB"])
    assert math.isfinite(value) and value > 20.0


def test_device_memory_is_not_reported_on_cpu(table):
    assert table[str(K)]["peak device MiB"] == table[str(K)]["added MiB"] == "n/a"
