"""The repository builder: what it writes; it never serves the ONNX files of another pipeline."""

from __future__ import annotations

import hashlib

from driffusion.export.tiny import build_tiny_pipeline
from driffusion.model_repository.build import (
    ORCHESTRATOR,
    STREAM,
    RepositorySettings,
    build_repository,
    read_manifest,
)
from driffusion.model_repository.config import parse_config


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_repository_holds_every_model_with_a_config_triton_parses(tiny_repository):
    names = {p.parent.name for p in tiny_repository.glob("*/config.pbtxt")}
    assert names == {"text_encoder", "denoiser", "vae_decoder", "vae_encoder", ORCHESTRATOR, STREAM}
    for name in names:
        config = parse_config((tiny_repository / name / "config.pbtxt").read_text())
        assert config.name == name and config.backend == "python"
        assert (tiny_repository / name / "1" / "model.py").exists()
    denoiser = parse_config((tiny_repository / "denoiser" / "config.pbtxt").read_text())
    assert denoiser.instance_group[0].count == RepositorySettings().instances
    for name in names:  # written out, not left to the server's auto-complete
        assert "max_batch_size: 0" in (tiny_repository / name / "config.pbtxt").read_text()


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

    from driffusion.model_repository.serve import prepare_repository

    out = tmp_path / "repo"
    settings = RepositorySettings()
    said: list[str] = []
    prepare_repository(out, settings, tiny_pipeline_dir, progress=said.append)
    prepare_repository(out, settings, tiny_pipeline_dir, progress=said.append)
    assert any("[serve] reusing" in line for line in said)

    manifest = read_manifest(out)
    (out / "repository.json").write_text(json.dumps({**manifest, "code": "older version"}))
    said.clear()
    prepare_repository(out, settings, tiny_pipeline_dir, progress=said.append)
    assert not any("[serve] reusing" in line for line in said)  # rewritten ...
    assert any("denoiser: reusing the ONNX export" in line for line in said)  # ... not exported
    assert read_manifest(out)["code"] == manifest["code"]


def test_repositories_that_differ_only_in_settings_share_their_exports(tiny_pipeline_dir, tmp_path):
    said: list[str] = []
    build_repository(tiny_pipeline_dir, tmp_path / "a", RepositorySettings(), progress=said.append)
    said.clear()
    other = RepositorySettings(denoiser_instances=2, max_k=4, emulated_latency_ms=10)
    build_repository(tiny_pipeline_dir, tmp_path / "b", other, progress=said.append)
    assert not any("exporting" in line for line in said)
    for role in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder"):
        a, b = (tmp_path / r / role / "1" / "model.onnx" for r in ("a", "b"))
        assert a.stat().st_ino == b.stat().st_ino or digest(a) == digest(b)


def test_an_existing_repository_given_without_a_pipeline_is_served_as_built(
    tiny_repository, tmp_path
):
    from driffusion.model_repository.serve import prepare_repository

    said: list[str] = []
    served = prepare_repository(tiny_repository, RepositorySettings(max_k=2), progress=said.append)
    assert served == tiny_repository
    assert said == [
        f"[serve] serving {tiny_repository} as built from {read_manifest(served)['pipeline']}"
    ]
