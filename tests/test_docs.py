"""The README stays true: its request API table, its commands and CI's command match the code."""

from __future__ import annotations

import re
from pathlib import Path

from driffusion import api, metrics
from driffusion.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def table_names(header: str) -> set[str]:
    """Backticked names in the first column of the table that starts with ``| header |``."""
    block = README.split(f"| {header} |", 1)[1].split("\n\n", 1)[0]
    return {n for row in block.splitlines()[2:] for n in re.findall(r"`(\w+)`", row.split("|")[1])}


def test_the_request_table_lists_every_input_and_output_of_the_served_model():
    assert table_names("input") == {f.name for f in api.INPUTS}
    assert table_names("output") == {f.name for f in api.OUTPUTS}


def test_the_metrics_table_lists_every_metric_the_orchestrator_exports():
    assert table_names("metric") == {m.name for m in metrics.METRICS}


def test_the_two_commands_exist_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make demo" in README and "make test" in README
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line[:1] not in "#"]
    assert "make test" in ci


def test_every_driffusion_subcommand_in_the_readme_exists():
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    mentioned = set(re.findall(r"^driffusion (\w[\w-]*)", README, re.M))
    mentioned |= set(re.findall(r"`driffusion (\w[\w-]*)", README))
    assert mentioned and mentioned <= commands
