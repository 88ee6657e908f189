"""LoRA: fused into exported repositories (``driffusion export --lora``) and followed by the
replicas of ``parallelize``.

The LoRA is made here from config, offline: peft ``LoraConfig`` adapters on the tiny SD2.1
pipeline's UNet and text encoder with random non-zero weights (``init_lora_weights=False``), saved
with the pipeline's ``save_lora_weights``. References are diffusers' own LoRA calls on the
unpatched pipeline (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
``unload_lora_weights``).
Tolerances: ONNX Runtime against torch as test_export (relative 1e-4); served images within one
uint8 level of the torch pipeline's (as test_embedded); parallelize at k=1 within 1e-4 of the
pipeline's own sampler and replicas within 1e-5 of the one-device batch (as test_parallel).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from driffusion import parallelize, tensors
from driffusion.export.introspect import family_for_pipeline
from driffusion.export.lora import Lora, LoraError, check_peft, fuse_loras, weights_file
from driffusion.export.tiny import load_tiny_pipeline
from driffusion.export.wrappers import wrap_component
from driffusion.families import at_precision
from driffusion.model_repository.build import (
    RepositoryBuildError,
    RepositorySettings,
    build_repository,
    is_up_to_date,
    read_manifest,
)
from driffusion.parallel import DraftingDenoiser, state_key

SCALE = 0.8
PROMPT = "a photo of a cat"
STEPS = 8
GUIDANCE = 4.0
RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread; two fight over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_lora(pipeline_dir: Path, out: Path, seed: int = 0, rank: int = 4) -> Path:
    """A LoRA for the tiny SD2.1 pipeline from config: attention projections of the UNet and the
    text encoder, random non-zero A and B; returns the .safetensors file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = load_tiny_pipeline(pipeline_dir)
    unet = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    text = LoraConfig(
        r=rank,
        lora_alpha=rank,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
    )
    pipe.unet.add_adapter(unet)
    pipe.text_encoder.add_adapter(text)
    type(pipe).save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet.to_dict(),
        text_encoder_lora_adapter_metadata=text.to_dict(),
    )
    return out / "pytorch_lora_weights.safetensors"


def with_lora(pipeline_dir: Path, lora: Path, scale: float | None = None, fuse: bool = False):
    """The tiny pipeline with ``lora`` loaded by diffusers as adapter "l" (at ``scale``; fused
    and unloaded with ``fuse``)."""
    pipe = load_tiny_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="l")
    if scale is not None:
        pipe.set_adapters(["l"], [scale])
    if fuse:
        pipe.fuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    return pipe


def plain(pipeline_dir: Path):
    pipe = load_tiny_pipeline(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed: int = 0) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def lora_file(tiny_pipeline_dir, tmp_path_factory) -> Path:
    return make_lora(tiny_pipeline_dir, tmp_path_factory.mktemp("lora"))


def lora_settings(lora: Path, scale: float = SCALE, **extra) -> RepositorySettings:
    fields = dict(denoiser_instances=2, orchestrator_instances=1, max_k=4)
    return RepositorySettings(loras=(Lora(str(lora), scale),), **{**fields, **extra})


@pytest.fixture(scope="module")
def lora_repository(tiny_pipeline_dir, lora_file, tmp_path_factory):
    """(repository built with the LoRA at SCALE, its build messages)."""
    messages: list[str] = []
    out = tmp_path_factory.mktemp("lora-repository") / "repo"
    settings = lora_settings(lora_file)
    build_repository(tiny_pipeline_dir, out, settings, progress=messages.append)
    return out, messages


# --- export: the LoRA is in the exported weights ------------------------------------------------


def component_inputs(pipe, family, role: str, batch: int = 2) -> dict[str, np.ndarray]:
    spec = family.components[role]
    x = spec.sample_inputs(batch, *family.default_size, seed=1)
    if role == tensors.TEXT_ENCODER:
        prompts = [PROMPT, "An astronaut riding a horse"][:batch]
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=family.tokenizer_max_length, truncation=True
        ).input_ids
        x[tensors.INPUT_IDS] = np.asarray(ids, dtype=np.int64)
    return x


def onnx_run(path: Path, inputs: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def test_the_exported_denoiser_and_text_encoder_are_the_fused_pipelines(
    tiny_pipeline_dir, lora_file, lora_repository, tiny_repository
):
    repo, messages = lora_repository
    assert any("fused 1 LoRA(s) into unet, text_encoder" in m for m in messages)
    fused = with_lora(tiny_pipeline_dir, lora_file, SCALE, fuse=True)
    family = at_precision(family_for_pipeline("sd21", fused), "fp32")
    for role in (tensors.TEXT_ENCODER, tensors.DENOISER):
        spec = family.components[role]
        x = component_inputs(fused, family, role)
        with torch.no_grad():
            ref = wrap_component(fused, spec)(*(torch.from_numpy(x[n]) for n in spec.input_names))
        ref = (ref if isinstance(ref, tuple) else (ref,))[0].numpy()
        (got,) = onnx_run(repo / role / "1" / "model.onnx", x)[:1]
        (without,) = onnx_run(tiny_repository / role / "1" / "model.onnx", x)[:1]
        assert rel_err(got, ref) <= RTOL, role
        # the LoRA moves the outputs far beyond the export's error (seen: 5e-7 vs 0.4 and 1.0)
        assert rel_err(without, ref) > 0.05, role


def test_the_torch_and_tensorrt_engines_get_the_fused_weights_too(
    tiny_pipeline_dir, lora_file, lora_repository, tmp_path
):
    """torch: the saved modules are the fused ones; tensorrt (a recording builder stands in for
    TensorRT): its engines are built from the LoRA repository's ONNX exports."""
    from driffusion.export.torch_modules import load_component

    fused = with_lora(tiny_pipeline_dir, lora_file, SCALE, fuse=True)
    family = at_precision(family_for_pipeline("sd21", fused), "fp32")
    torch_repo = build_repository(
        tiny_pipeline_dir,
        tmp_path / "torch",
        lora_settings(lora_file, engine="torch"),
        progress=None,
    )
    for role in (tensors.TEXT_ENCODER, tensors.DENOISER):
        module, spec = load_component(torch_repo / role / "1" / "component")
        assert not any("lora" in name for name, _ in module.named_parameters()), role
        x = component_inputs(fused, family, role)
        with torch.no_grad():
            args = [torch.from_numpy(x[n]) for n in spec.input_names]
            got, ref = module(*args), wrap_component(fused, spec)(*args)
        got, ref = (
            (got if isinstance(got, tuple) else (got,)),
            (ref if isinstance(ref, tuple) else (ref,)),
        )
        assert torch.equal(got[0], ref[0]), role

    built = {}

    def builder(onnx, plan, spec, profiles, **kwargs):
        built[spec.role] = onnx.parent
        plan.write_bytes(b"engine")

    settings = lora_settings(
        lora_file, engine="tensorrt", gpus=(0,), denoiser_instances=None, precision="fp32"
    )
    build_repository(
        tiny_pipeline_dir, tmp_path / "trt", settings, progress=None, engine_builder=builder
    )
    exports = read_manifest(lora_repository[0])["engines"]  # the same spec (fp32) and LoRA
    for role in (tensors.TEXT_ENCODER, tensors.DENOISER):
        assert str(built[role]) == exports[role]["onnx"], role


def test_the_manifest_records_the_loras_and_other_loras_rebuild(
    tiny_pipeline_dir, lora_file, lora_repository, tiny_repository
):
    repo, _ = lora_repository
    manifest = read_manifest(repo)
    fingerprint = hashlib.sha256(lora_file.read_bytes()).hexdigest()[:16]
    assert manifest["loras"] == [
        {"path": str(lora_file.resolve()), "scale": SCALE, "fingerprint": fingerprint}
    ]
    settings = lora_settings(lora_file)
    assert RepositorySettings.from_dict(manifest["settings"]) == settings
    assert is_up_to_date(repo, tiny_pipeline_dir, settings)
    assert not is_up_to_date(repo, tiny_pipeline_dir, lora_settings(lora_file, 0.5))
    assert not is_up_to_date(repo, tiny_pipeline_dir, replace(settings, loras=settings.loras * 2))
    assert not is_up_to_date(repo, tiny_pipeline_dir, replace(settings, loras=()))
    # exports with and without LoRAs are cached apart
    ours, theirs = read_manifest(repo)["engines"], read_manifest(tiny_repository)["engines"]
    for role in (tensors.TEXT_ENCODER, tensors.DENOISER):
        assert ours[role]["onnx"] != theirs[role]["onnx"], role


def test_a_changed_lora_file_is_exported_again(tiny_pipeline_dir, lora_file, tmp_path):
    lora = tmp_path / "lora.safetensors"
    shutil.copy2(lora_file, lora)
    out = tmp_path / "repo"
    settings = RepositorySettings(loras=(Lora(str(lora)),), denoiser_instances=1)
    build_repository(tiny_pipeline_dir, out, settings, progress=None)
    first = (out / "denoiser" / "1" / "model.onnx").read_bytes()
    weights = load_file(lora)
    save_file({k: v * 1.5 for k, v in weights.items()}, lora)
    assert not is_up_to_date(out, tiny_pipeline_dir, settings)
    messages: list[str] = []
    build_repository(tiny_pipeline_dir, out, settings, progress=messages.append)
    assert any("another pipeline, weights or LoRAs: rebuilding" in m for m in messages)
    assert (out / "denoiser" / "1" / "model.onnx").read_bytes() != first


# --- serving: a real Triton server on the LoRA repository ---------------------------------------


def test_a_repository_built_with_a_lora_serves_the_fused_pipelines_image(
    tiny_pipeline_dir, lora_file, lora_repository, start_triton_server
):
    from driffusion.client import DriffusionClient

    repo, _ = lora_repository
    server = start_triton_server(repo)
    with DriffusionClient(server.grpc_url) as client:
        client.wait_ready(timeout_s=120)
        served = client.generate(
            PROMPT, steps=STEPS, seed=3, guidance_scale=GUIDANCE, mode="sequential"
        ).image
    ref = run(with_lora(tiny_pipeline_dir, lora_file, SCALE, fuse=True), seed=3)[0]
    ref = (ref * 255).round().astype(np.uint8)
    without = (run(plain(tiny_pipeline_dir), seed=3)[0] * 255).round().astype(np.uint8)
    # ONNX Runtime against torch: at most one uint8 level after rounding
    assert np.abs(served.astype(int) - ref).max() <= 1
    assert np.abs(served.astype(int) - without).max() > 10  # the LoRA is served (seen: 171)


# --- parallelize: the replicas follow adapters --------------------------------------------------


def batched(pipe) -> np.ndarray:
    """``pipe`` sampled by parallelize on one device (one batch per round: no replicas)."""
    parallelize(pipe, mode="aggressive", k=4)
    try:
        return run(pipe)
    finally:
        pipe.driffusion.restore()


def test_a_lora_loaded_after_parallelize_changes_k1_as_on_the_unpatched_pipeline(
    tiny_pipeline_dir, lora_file
):
    pipe = plain(tiny_pipeline_dir)
    ref = run(pipe)
    ref_lora = run(with_lora(tiny_pipeline_dir, lora_file))  # unpatched, sequential
    parallelize(pipe, devices=["cpu", "cpu"], mode="aggressive", k=1)
    try:
        assert np.abs(run(pipe) - ref).max() < RTOL
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="l")
        out = run(pipe)
    finally:
        pipe.driffusion.restore()
    assert np.abs(out - ref_lora).max() < RTOL
    assert np.abs(ref_lora - ref).max() > 0.05


def test_replicas_follow_adapters_loaded_weighted_fused_and_unloaded_after_parallelize(
    tiny_pipeline_dir, lora_file
):
    """Two CPU "devices", k=4: every round's drafts are split over the real denoiser and a
    replica, so a stale replica shows as a difference from the one-device batch."""
    pipe, ref = plain(tiny_pipeline_dir), plain(tiny_pipeline_dir)
    parallelize(pipe, devices=["cpu", "cpu"], mode="aggressive", k=4)
    controller = pipe.driffusion
    source = dict(pretrained_model_name_or_path_or_dict=str(lora_file.parent))
    load = dict(weight_name=lora_file.name, adapter_name="l")
    try:
        first = run(pipe)
        np.testing.assert_allclose(first, batched(ref), atol=1e-5)
        assert not controller.sync()  # nothing changed since that run

        # the stand-in passes diffusers' pipeline-level LoRA calls to the real UNet
        pipe.load_lora_weights(**source, **load)
        ref.load_lora_weights(**source, **load)
        assert type(pipe.unet) is DraftingDenoiser and pipe.get_list_adapters()["unet"] == ["l"]
        loaded = run(pipe)
        np.testing.assert_allclose(loaded, batched(ref), atol=1e-5)
        assert np.abs(loaded - first).max() > 0.05

        pipe.set_adapters(["l"], [0.5])  # scales only: no parameter changes
        ref.set_adapters(["l"], [0.5])
        np.testing.assert_allclose(run(pipe), batched(ref), atol=1e-5)

        pipe.unload_lora_weights()
        np.testing.assert_allclose(run(pipe), first, atol=1e-6)

        # load, fuse and unload with no run between: the same parameters, written through .data
        # (the version counters do not move); the sampled values in the key do
        pipe.load_lora_weights(**source, **load)
        pipe.set_adapters(["l"], [0.5])
        pipe.fuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
        assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
        np.testing.assert_allclose(run(pipe), batched(ref), atol=1e-5)
    finally:
        controller.restore()


def test_a_lora_loaded_before_parallelize_is_in_every_replica(tiny_pipeline_dir, lora_file):
    pipe = with_lora(tiny_pipeline_dir, lora_file, SCALE)
    ref = run(pipe)
    parallelize(pipe, devices=["cpu", "cpu"], mode="aggressive", k=1)
    k1 = run(pipe)
    parallelize(pipe, devices=["cpu", "cpu"], mode="aggressive", k=4)
    fanned = run(pipe)
    pipe.driffusion.restore()
    assert np.abs(k1 - ref).max() < RTOL
    np.testing.assert_allclose(fanned, batched(pipe), atol=1e-5)


def test_the_state_key_sees_data_writes_and_adapter_scales_and_is_stable_otherwise(
    tiny_pipeline_dir, lora_file
):
    pipe = with_lora(tiny_pipeline_dir, lora_file)
    key = state_key(pipe.unet)
    assert state_key(pipe.unet) == key
    pipe.set_adapters(["l"], [0.3])
    assert state_key(pipe.unet) != key
    key = state_key(pipe.unet)
    weight = pipe.unet.conv_in.weight
    with torch.no_grad():
        weight.data[0, 0, 0, 0] += 1.0  # through .data: the version counter stays
    assert state_key(pipe.unet) != key
    with torch.no_grad():
        weight.data[0, 0, 0, 0] = float("nan")
    assert state_key(pipe.unet) == state_key(pipe.unet)  # NaN compares equal bit for bit


# --- errors name the LoRA and say why -----------------------------------------------------------


def test_a_missing_lora_fails_naming_it_before_the_pipeline_loads(tiny_pipeline_dir, tmp_path):
    missing = tmp_path / "missing.safetensors"
    messages: list[str] = []
    settings = RepositorySettings(loras=(Lora(str(missing)),))
    with pytest.raises(RepositoryBuildError, match=f"LoRA {missing}: no such file or folder"):
        build_repository(tiny_pipeline_dir, tmp_path / "repo", settings, progress=messages.append)
    assert not any("loading" in m for m in messages)


def test_the_cli_takes_repeated_loras_with_scales_and_names_a_bad_one(
    tiny_pipeline_dir, tiny_repository, tmp_path, capsys
):
    from driffusion.cli.main import _settings, build_parser, main

    args = build_parser().parse_args(
        ["serve", "--lora", "a.safetensors:0.5", "--lora", "hub/lora", "--lora", "x:y"]
    )
    assert _settings(args).loras == (
        Lora("a.safetensors", 0.5),
        Lora("hub/lora", 1.0),
        Lora("x:y", 1.0),  # not a number: part of the path
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--lora", "a.safetensors:1.2.3"])
    assert "LoRA a.safetensors: scale must be a number, got '1.2.3'" in capsys.readouterr().err

    missing = tmp_path / "nope.safetensors"
    rc = main(
        [
            "export",
            "--pipeline",
            str(tiny_pipeline_dir),
            "--family",
            "sd21",
            "--out",
            str(tmp_path / "repo"),
            "--lora",
            f"{missing}:0.7",
        ]
    )
    assert rc == 1
    assert f"LoRA {missing}: no such file or folder" in capsys.readouterr().err

    # an existing repository without --pipeline is served as built: --lora is refused, not lost
    assert main(["serve", "--repository", str(tiny_repository), "--lora", str(missing)]) == 2
    assert "add --pipeline to rebuild it with these LoRAs" in capsys.readouterr().err


def rewritten(lora: Path, out: Path, change) -> Path:
    """A copy of ``lora``'s tensors passed through ``change(name, tensor) -> (name, tensor)``."""
    weights = load_file(lora)
    save_file(dict(change(k, v.clone()) for k, v in weights.items()), out)
    return out


INCOMPATIBLE = {
    # weights for modules the UNet lacks (a LoRA for another UNet layout)
    "modules": (
        lambda k, v: (k.replace("down_blocks.0", "down_blocks.9"), v),
        "16 of its 88 weight tensors match no module of this StableDiffusionPipeline "
        r"\(unet, text_encoder\): its target modules were not found \(e.g. unet.down_blocks.9",
    ),
    # weights for a component the pipeline lacks (an SDXL LoRA's second text encoder)
    "component": (
        lambda k, v: (k.replace("text_encoder.", "text_encoder_2."), v),
        "24 of its 88 weight tensors match no module .* text_encoder_2",
    ),
    # the right modules, other widths (a LoRA for a larger model)
    "shapes": (
        lambda k, v: (k, torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v),
        "its weights do not fit this pipeline's modules .*: UNet2DConditionModel.* copying a param",
    ),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_an_incompatible_lora_fails_naming_it_and_why(tiny_pipeline_dir, lora_file, tmp_path, case):
    change, message = INCOMPATIBLE[case]
    bad = rewritten(lora_file, tmp_path / f"{case}.safetensors", change)
    with pytest.raises(LoraError, match=f"^LoRA {bad}: {message}"):
        fuse_loras(plain(tiny_pipeline_dir), [Lora(str(bad))])


def test_unreadable_files_ambiguous_folders_and_old_peft_fail_naming_the_lora(
    tiny_pipeline_dir, lora_file, tmp_path, monkeypatch
):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match=f"^LoRA {garbage}: .* cannot be read as LoRA weights"):
        fuse_loras(plain(tiny_pipeline_dir), [Lora(str(garbage))])
    with pytest.raises(LoraError, match=f"^LoRA {tmp_path}: the folder holds no single LoRA"):
        shutil.copy2(lora_file, tmp_path / "second.safetensors")
        weights_file(Lora(str(tmp_path)))
    assert weights_file(Lora(str(lora_file.parent))) == lora_file.resolve()
    assert weights_file(Lora("owner/some-lora")) is None  # a hub id: nothing local to check

    with pytest.raises(LoraError, match=r"^LoRA x.safetensors: peft 0.5.0 is too old .*>= 0\."):
        check_peft("0.5.0", name="x.safetensors")
    from importlib import metadata

    def no_peft(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", no_peft)
    with pytest.raises(LoraError, match="^LoRA x.safetensors: loading LoRAs needs peft, which"):
        check_peft(name="x.safetensors")
