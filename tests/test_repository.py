"""The repository builder: what it writes; it never serves the ONNX files of another pipeline."""

from __future__ import annotations

import hashlib

from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import (
    ORCHESTRATOR,
    RepositorySettings,
    build_repository,
    read_manifest,
)
from driffusion.model_repository.config import parse_config


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_repository_holds_every_model_with_a_config_triton_parses(tiny_repository):
    names = {p.parent.name for p in tiny_repository.glob("*/config.pbtxt")}
    assert names == {"text_encoder", "denoiser", "vae_decoder", ORCHESTRATOR}
    for name in names:
        config = parse_config((tiny_repository / name / "config.pbtxt").read_text())
        assert config.name == name and config.backend == "python"
        assert (tiny_repository / name / "1" / "model.py").exists()
    denoiser = parse_config((tiny_repository / "denoiser" / "config.pbtxt").read_text())
    assert denoiser.instance_group[0].count == RepositorySettings().denoiser_instances


def test_a_different_pipeline_is_re_exported_not_reused(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "repo"
    build_repository(tiny_pipeline_dir, out, progress=None)
    first = digest(out / "denoiser" / "1" / "model.onnx")
    other = build_tiny_pipeline("sd21", tmp_path / "other", seed=1)  # same shapes, other weights
    build_repository(other, out, progress=None)
    assert digest(out / "denoiser" / "1" / "model.onnx") != first
    assert read_manifest(out)["pipeline"] == str(other.resolve())


def test_serve_reuses_its_repository_unless_another_driffusion_version_wrote_it(
    tiny_pipeline_dir, tmp_path
):
    import json

    from driffusion.cli import build_parser
    from driffusion.model_repository.serve import prepare_repository

    out = tmp_path / "repo"
    args = build_parser().parse_args(
        ["serve", "--pipeline", str(tiny_pipeline_dir), "--repository", str(out)]
    )
    said: list[str] = []
    prepare_repository(args, progress=said.append)
    prepare_repository(args, progress=said.append)
    assert any("[serve] reusing" in line for line in said)

    manifest = read_manifest(out)
    (out / "repository.json").write_text(json.dumps({**manifest, "code": "older version"}))
    said.clear()
    prepare_repository(args, progress=said.append)
    assert not any("[serve] reusing" in line for line in said)  # rewritten ...
    assert any("denoiser: reusing" in line for line in said)  # ... keeping its ONNX files
    assert read_manifest(out)["code"] == manifest["code"]
