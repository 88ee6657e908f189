"""The wheel, as a user installs it: built with ``python -m build``, installed into a fresh virtual
environment, and run from a directory that is not the checkout: ``driffusion demo``, ``serve`` and
``generate`` find the embedded model in the package and write their outputs to the cache folder.

The fresh environment gets the wheel itself (``pip install --no-deps``) and borrows the heavy
dependencies (torch, diffusers, the Triton wheel) from this test run's environment through a
``.pth`` line, so the test takes a minute rather than a multi-GB download; the editable install of
the checkout is not visible there (its import hook lives in a ``.pth`` file of the borrowed
folder, which Python does not process for folders added that way).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from driffusion.model_repository.server import find_free_ports

ROOT = Path(__file__).resolve().parent.parent


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, a working directory outside the checkout, env)."""
    pytest.importorskip("build", reason="the dev extra's `build` package builds the wheel")
    root = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(ROOT)])
    (wheel,) = (root / "dist").glob("driffusion-*.whl")
    run([sys.executable, "-m", "venv", str(root / "fresh")])
    fresh = root / "fresh"
    run([str(fresh / "bin" / "pip"), "install", "--quiet", "--no-deps", "--no-index", str(wheel)])
    site = Path(
        run(
            [
                str(fresh / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ]
        ).stdout.strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    work = root / "elsewhere"
    work.mkdir()
    env = dict(os.environ, DRIFFUSION_CACHE=str(root / "cache"))
    env.pop("PYTHONPATH", None)
    located = run(
        [str(fresh / "bin" / "python"), "-c", "import driffusion; print(driffusion.__file__)"],
        cwd=work,
        env=env,
    ).stdout.strip()
    assert located.startswith(str(fresh)), f"driffusion imported from {located}, not the wheel"
    return fresh / "bin", work, env


def test_the_demo_runs_from_the_installed_wheel(installed):
    bin_dir, work, env = installed
    out = run(
        [str(bin_dir / "driffusion"), "demo", "--steps", "8", "--repeats", "1"],
        cwd=work,
        env=env,
        timeout=600,
    ).stdout
    assert "aggressive" in out and "speedup" in out
    cache = Path(env["DRIFFUSION_CACHE"])
    assert (cache / "demo" / "comparison.png").exists()
    assert "embedded" in (cache / "model_repository" / "repository.json").read_text()


def test_serve_and_generate_run_from_the_installed_wheel(installed):
    bin_dir, work, env = installed
    http, grpc, metrics = find_free_ports(3)
    repository = Path(env["DRIFFUSION_CACHE"]) / "model_repository"
    serve = subprocess.Popen(
        [str(bin_dir / "driffusion"), "serve", "--repository", str(repository)]
        + ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out = run(
            [str(bin_dir / "driffusion"), "generate", "--prompt", "the number 3", "--steps", "8"]
            + ["--out", "three.png", "--url", f"127.0.0.1:{grpc}", "--wait", "120"],
            cwd=work,
            env=env,
            timeout=300,
        ).stdout
        assert "wrote three.png" in out and (work / "three.png").stat().st_size > 0
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            time.sleep(1)
    assert serve.returncode == 0, serve.stdout.read()
