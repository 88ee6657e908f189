"""``driffusion export``: the parser, and tiny SD2.1 pipeline -> ``--engine onnx`` -> a repository
that a real Triton server serves; re-running skips, ``--force`` rebuilds, failures name the folder.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from driffusion.cli import build_parser, main

ROLES = ("text_encoder", "denoiser", "vae_decoder", "vae_encoder")


def make_parser():
    return build_parser()


def export(*argv: str) -> int:
    return main(["export", *argv])


def error_line(stderr: str) -> str:
    """The CLI's own error line (diffusers' progress bars share stderr)."""
    return next(line for line in stderr.splitlines() if line.startswith("driffusion export:"))


def onnx_stamps(repository: Path) -> dict[str, int]:
    return {role: (repository / role / "1" / "model.onnx").stat().st_mtime_ns for role in ROLES}


# --- parser ------------------------------------------------------------------------------------


def test_parser_reads_every_flag(tmp_path):
    args = make_parser().parse_args(
        [
            "export",
            "--pipeline",
            "stabilityai/stable-diffusion-2-1",
            "--family",
            "sd21",
            "--out",
            str(tmp_path / "repo"),
            "--engine",
            "tensorrt",
            "--gpus",
            "0,1,2,3",
            "--max-k",
            "4",
            "--orchestrator-instances",
            "8",
            "--precision",
            "fp32",
            "--force",
            "--timing-cache",
            str(tmp_path / "timing.cache"),
        ]
    )
    assert args.pipeline == "stabilityai/stable-diffusion-2-1"
    assert (args.family, args.engine, args.gpus) == ("sd21", "tensorrt", (0, 1, 2, 3))
    assert (args.max_k, args.orchestrator_instances, args.precision) == (4, 8, "fp32")
    assert args.force and args.out == tmp_path / "repo"
    assert args.timing_cache == tmp_path / "timing.cache"


def test_parser_defaults():
    args = make_parser().parse_args(["export", "--pipeline", "p", "--family", "sdxl", "--out", "r"])
    assert (args.engine, args.gpus, args.max_k, args.force) == ("onnx", (), 4, False)
    assert (args.precision, args.timing_cache) == (None, None)


@pytest.mark.parametrize("gpus", ["0,0", "a,b", "-1", ""])
def test_parser_rejects_bad_gpu_lists(gpus, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(
            ["export", "--pipeline", "p", "--family", "sd21", "--out", "r", "--gpus", gpus]
        )
    assert "--gpus must be distinct GPU indices" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--max-k", "--orchestrator-instances", "--max-images"])
def test_parser_rejects_counts_below_one(flag, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(
            ["export", "--pipeline", "p", "--family", "sd21", "--out", "r", flag, "0"]
        )
    assert "must be an integer >= 1" in capsys.readouterr().err


def test_request_limits_and_the_streaming_model_reach_the_repository_settings(capsys):
    from driffusion.cli.main import _settings

    args = make_parser().parse_args(["serve", "--max-images", "2", "--stream-instances", "0"])
    settings = _settings(args)
    assert (settings.max_images, settings.stream_instances) == (2, 0)
    defaults = _settings(make_parser().parse_args(["serve"]))
    assert (defaults.max_images, defaults.stream_instances, defaults.max_k) == (4, 1, 8)
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--stream-instances", "-1"])
    assert "--stream-instances: must be an integer >= 0, got '-1'" in capsys.readouterr().err


# --- onnx: export, serve, re-run, force ----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_pipeline_dir, tmp_path_factory):
    """The tiny SD2.1 pipeline exported by the CLI: (repository, pipeline folder)."""
    out = tmp_path_factory.mktemp("export") / "repo"
    rc = export(
        "--pipeline",
        str(tiny_pipeline_dir),
        "--family",
        "sd21",
        "--out",
        str(out),
        "--engine",
        "onnx",
        "--denoiser-instances",
        "2",
        "--max-k",
        "4",
        "--orchestrator-instances",
        "2",
    )
    assert rc == 0
    return out, tiny_pipeline_dir


def test_exported_repository_serves_a_request(exported, start_triton_server):
    from driffusion.client import DriffusionClient
    from driffusion.model_repository.config import parse_config

    repository, _ = exported
    denoiser = parse_config((repository / "denoiser" / "config.pbtxt").read_text())
    assert [g.count for g in denoiser.instance_group] == [2]
    server = start_triton_server(repository)
    with DriffusionClient(server.grpc_url) as client:
        result = client.generate("a photo of a cat", steps=6, k=4, seed=3, timeout_s=120)
    assert result.image.shape == (64, 64, 3) and result.image.dtype.name == "uint8"
    assert result.evaluations == 6
    assert result.rounds < 6  # drafts evaluated in parallel: fewer serial rounds than steps


def test_rerunning_skips_what_is_built(exported, capsys):
    repository, pipeline = exported
    before = onnx_stamps(repository)
    assert export("--pipeline", str(pipeline), "--family", "sd21", "--out", str(repository)) == 0
    output = capsys.readouterr().out
    assert onnx_stamps(repository) == before
    assert all(f"{role}: reusing the ONNX export" in output for role in ROLES)


def test_force_rebuilds(exported, capsys):
    repository, pipeline = exported
    before = onnx_stamps(repository)
    argv = ["--pipeline", str(pipeline), "--family", "sd21", "--out", str(repository), "--force"]
    assert export(*argv) == 0
    output = capsys.readouterr().out
    after = onnx_stamps(repository)
    assert all(after[role] != before[role] for role in ROLES)
    assert all(f"exporting {role}" in output for role in ROLES)


def test_an_fp16_repository_declares_float16_tensors_and_serves_a_request(
    tiny_pipeline_dir, tmp_path, start_triton_server
):
    """--precision fp16 on the CPU server: config.pbtxt says TYPE_FP16 where the spec says
    float16, and the real server accepts what the orchestrator sends (it refuses a dtype that
    differs from the config)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from driffusion.client import DriffusionClient
    from driffusion.model_repository.config import parse_config

    out = tmp_path / "repo"
    argv = ["--pipeline", str(tiny_pipeline_dir), "--family", "sd21", "--out", str(out)]
    assert (
        export(
            *argv,
            "--precision",
            "fp16",
            "--denoiser-instances",
            "2",
            "--orchestrator-instances",
            "1",
        )
        == 0
    )
    denoiser = parse_config((out / "denoiser" / "config.pbtxt").read_text())
    types = {t.name: t.data_type for t in [*denoiser.input, *denoiser.output]}
    assert types == {
        "sample": mc.TYPE_FP16,
        "timestep": mc.TYPE_FP32,
        "encoder_hidden_states": mc.TYPE_FP16,
        "model_output": mc.TYPE_FP16,
    }
    server = start_triton_server(out)
    with DriffusionClient(server.grpc_url) as client:
        result = client.generate("a photo of a cat", steps=4, k=2, seed=3, timeout_s=120)
    assert result.image.shape == (64, 64, 3) and result.evaluations == 4


# --- failures ----------------------------------------------------------------------------------


def test_a_broken_pipeline_folder_fails_naming_the_folder(tiny_pipeline_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    out = tmp_path / "repo"
    assert export("--pipeline", str(broken), "--family", "sd21", "--out", str(out)) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("driffusion export: RepositoryBuildError: loading pipeline")
    assert str(broken / "unet") in err  # the component folder whose weights are missing


def test_a_folder_that_is_no_pipeline_fails_naming_it(tmp_path, capsys):
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    assert export("--pipeline", str(empty), "--family", "sd21", "--out", str(tmp_path / "r")) == 1
    err = error_line(capsys.readouterr().err)
    assert f"{empty}: no model_index.json" in err


def test_tensorrt_without_tensorrt_fails_before_exporting(tiny_pipeline_dir, tmp_path, capsys):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here: the build would run")
    out = tmp_path / "repo"
    argv = ["--pipeline", str(tiny_pipeline_dir), "--family", "sd21", "--out", str(out)]
    assert export(*argv, "--engine", "tensorrt", "--gpus", "0,1,2,3") == 1
    err = error_line(capsys.readouterr().err)
    assert "TensorRT Python API is not installed" in err and "pip install tensorrt" in err
    assert not out.exists()


# --- the commands docker-compose.yml and docs/DEPLOY.md give parse with the real parsers ----------

ROOT = Path(__file__).resolve().parent.parent


def shell_commands(markdown: str) -> list[list[str]]:
    """The commands of the ```bash blocks of ``markdown``, continuation lines joined, split."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def test_the_compose_engine_build_command_parses(tmp_path):
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["engines"]["command"]
    # ${VAR:-default} -> default; ${VAR:?message} (required) -> a stand-in value.
    argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in command]
    argv = [re.sub(r"\$\{\w+:\?[^}]*\}", "/weights/sd21", a) for a in argv]
    args = make_parser().parse_args(["export", *argv])
    assert (args.engine, args.gpus, args.max_k) == ("tensorrt", (0, 1, 2, 3), 4)
    assert args.out == Path("/models") and args.pipeline == "/weights/sd21"


def test_the_deploy_guide_commands_parse():
    commands = shell_commands((ROOT / "docs" / "DEPLOY.md").read_text())
    rebuild = [c for c in commands if c[:4] == ["docker", "compose", "run", "--rm"]]
    assert rebuild, "the guide shows how to force a rebuild"
    for command in rebuild:
        args = make_parser().parse_args(["export", *command[5:]])  # after the service name
        assert args.force and args.engine == "tensorrt"
    client = [c for c in commands if c[0] == "driffusion"]
    assert {c[1] for c in client} == {"generate", "bench"}
    for command in client:
        build_parser().parse_args(command[1:])
