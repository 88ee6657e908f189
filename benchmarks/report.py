"""Write one section of BENCHMARKS.md, leaving the other sections as they are.

Environment: ``DRIFFUSION_BENCHMARKS`` writes into another copy of BENCHMARKS.md (a run on a lent
machine, a dry run); ``DRIFFUSION_COMMIT`` names the commit where the checkout has no git (a
copy of the working tree).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

BENCHMARKS = Path(
    os.environ.get("DRIFFUSION_BENCHMARKS")
    or Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
)
HEADER = "# Benchmarks\n\nEvery section is written by the script it names; rerun it to refresh.\n"


def machine() -> str:
    """A one-line description of this machine, for the absolute numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    """Replace the section ``name`` (between its markers) in BENCHMARKS.md, or append it."""
    command = " ".join([Path(sys.executable).name, *sys.argv]).replace(str(Path.cwd()) + "/", "")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:  # no git
        commit = ""
    commit = commit or os.environ.get("DRIFFUSION_COMMIT", "")
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = (
        f"{begin}\n{body.rstrip()}\n\n_Command: `{command}`; machine: {machine()}; "
        f"{date.today().isoformat()}, commit {commit or 'uncommitted'}._\n{end}"
    )
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    BENCHMARKS.write_text(text)
    print(f"wrote section {name!r} of {BENCHMARKS}")
