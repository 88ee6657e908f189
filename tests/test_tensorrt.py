"""The TensorRT path: profiles from the specs, tensorrt_plan configs, the repository around the
engines, the build itself where TensorRT and a CUDA GPU exist, and (opt-in, ``--run-slow``) a
full-size SD2.1 UNet export.

Where TensorRT or a GPU is missing, the engine build is skipped with the reason (``pytest -rs``
prints it); everything around it runs here with a stand-in builder.
Tolerance of the GPU test: fp16 engine vs fp32 ONNX Runtime, relative error (max |diff| / max |ref|)
<= 1e-2 (fp16 keeps about 3 significant digits; the tiny models are a few layers deep).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from driffusion import tensors
from driffusion.export import tensorrt as trt_build
from driffusion.export.tensorrt import GpuInfo
from driffusion.families import get_family
from driffusion.model_repository.build import (
    ENGINE_FILE,
    RepositorySettings,
    build_repository,
    component_configs,
)
from driffusion.model_repository.config import parse_config
from driffusion.tensors import DENOISER

MAX_K = 4
GPUS = (0, 1, 2, 3)


# --- profiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd21", "sdxl", "sd3"])
def test_denoiser_profile_spans_batch_one_to_two_k_with_opt_at_two_k(name):
    family = get_family(name)
    profiles = family.trt_profiles(MAX_K)
    denoiser = profiles[DENOISER]
    assert set(denoiser) == set(family.components[DENOISER].input_names)
    for shapes in denoiser.values():
        assert [shape[0] for shape in shapes] == [1, 2 * MAX_K, 2 * MAX_K]  # min, opt, max batch
    lo, opt, hi = denoiser[tensors.SAMPLE]
    s = family.vae_scale_factor
    assert lo[2:] == (family.min_size // s,) * 2
    assert opt[2:] == tuple(d // s for d in family.default_size)
    assert hi[2:] == (family.max_size // s,) * 2
    for role in family.text_roles:  # prompt and negative prompt
        for shapes in profiles[role].values():
            assert [shape[0] for shape in shapes] == [1, 2, 2]
    for shapes in profiles[tensors.VAE_DECODER].values():  # one final latent
        assert [shape[0] for shape in shapes] == [1, 1, 1]
    for role, spec in family.components.items():
        trt_build.check_profile(spec, profiles[role])


def test_check_profile_names_the_component_and_the_problem():
    spec = get_family("sd21").components[DENOISER]
    good = get_family("sd21").trt_profiles(MAX_K)[DENOISER]
    with pytest.raises(ValueError, match=r"denoiser: profile inputs"):
        trt_build.check_profile(spec, {k: v for k, v in good.items() if k != tensors.TIMESTEP})
    lo, opt, hi = good[tensors.TIMESTEP]
    with pytest.raises(ValueError, match=r"denoiser/timestep: profile needs min <= opt <= max"):
        trt_build.check_profile(spec, {**good, tensors.TIMESTEP: (hi, opt, lo)})


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd21", "sdxl", "sd3"])
def test_tensorrt_configs_for_four_gpus_parse_with_tritons_protobuf(name):
    family = get_family(name)
    configs = component_configs(family, RepositorySettings(name, engine="tensorrt", gpus=GPUS))
    assert set(configs) == set(family.components)
    for role, text in configs.items():
        config = parse_config(text)  # text_format.Parse into model_config_pb2.ModelConfig
        assert isinstance(config, mc.ModelConfig)
        assert config.name == role
        assert config.platform == "tensorrt_plan"
        assert config.max_batch_size == 0
        spec = family.components[role]
        assert [(i.name, tuple(i.dims)) for i in config.input] == [
            (t.name, t.wildcard_shape) for t in spec.inputs
        ]
        assert [o.name for o in config.output] == list(spec.output_names)
        groups = [(g.kind, g.count, list(g.gpus)) for g in config.instance_group]
        gpu = mc.ModelInstanceGroup.KIND_GPU
        if role == DENOISER:  # one instance on each GPU
            assert groups == [(gpu, 1, list(GPUS))]
        else:  # text encoders and VAE on the first GPU
            assert groups == [(gpu, 1, [0])]


# --- the repository around the engines, with a stand-in builder ---------------------------------


class StandInBuilder:
    """Records what build_engine would get and writes a placeholder engine."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx_path, engine_path, spec, profile, **kwargs):
        self.calls.append(
            SimpleNamespace(onnx=Path(onnx_path), spec=spec, profile=profile, **kwargs)
        )
        Path(engine_path).write_bytes(b"stand-in engine for " + spec.role.encode())
        return SimpleNamespace(record={"role": spec.role})


@pytest.fixture(scope="module")
def tensorrt_repository(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    builder = StandInBuilder()
    settings = RepositorySettings(
        "sd21", engine="tensorrt", gpus=GPUS, max_k=MAX_K, orchestrator_instances=2
    )
    out = build_repository(
        tiny_pipeline_dir,
        root / "repo",
        settings,
        cache=root / "cache",
        progress=None,
        engine_builder=builder,
    )
    return out, builder, settings


def test_repository_has_an_engine_and_a_tensorrt_config_per_component(tensorrt_repository):
    out, builder, _ = tensorrt_repository
    roles = [c.spec.role for c in builder.calls]
    assert roles == ["text_encoder", "denoiser", "vae_decoder"]
    for role in roles:
        assert (out / role / "1" / ENGINE_FILE).read_bytes().endswith(role.encode())
        config = parse_config((out / role / "config.pbtxt").read_text())
        assert config.platform == "tensorrt_plan"
    denoiser = parse_config((out / DENOISER / "config.pbtxt").read_text())
    assert [list(g.gpus) for g in denoiser.instance_group] == [list(GPUS)]
    manifest = json.loads((out / "repository.json").read_text())
    assert manifest["settings"]["engine"] == "tensorrt"
    assert manifest["settings"]["gpus"] == list(GPUS)
    assert manifest["engines"] == {role: {"role": role} for role in roles}


def test_engines_are_built_from_onnx_outside_the_repository_with_the_spec_profiles(
    tensorrt_repository,
):
    out, builder, _ = tensorrt_repository
    cache = out.parent / "cache"
    for call in builder.calls:
        assert call.onnx.parent.parent == cache / "onnx"
        assert call.onnx.parent.name.startswith(call.spec.role) and call.onnx.exists()
        assert call.timing_cache == cache / "tensorrt" / "timing.cache"
        assert call.force is False
    denoiser = next(c for c in builder.calls if c.spec.role == DENOISER)
    batches = {name: [s[0] for s in shapes] for name, shapes in denoiser.profile.items()}
    assert batches == {name: [1, 2 * MAX_K, 2 * MAX_K] for name in denoiser.spec.input_names}
    assert not any(p.suffix == ".onnx" for p in out.rglob("*"))  # no ONNX inside the repository


def test_orchestrator_fans_out_over_the_gpus(tensorrt_repository):
    out, _, settings = tensorrt_repository
    version = out / "driffusion" / "1"
    assert (version / "model.py").exists()
    assert (version / "pipeline" / "tokenizer").is_dir()
    service = json.loads((version / "settings.json").read_text())
    assert service["denoiser_instances"] == len(GPUS)
    assert service["limits"]["max_k"] == MAX_K
    config = parse_config((out / "driffusion" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert [g.count for g in config.instance_group] == [settings.orchestrator_instances]


def test_rebuild_reuses_the_onnx_exports(tensorrt_repository, tiny_pipeline_dir):
    out, first, settings = tensorrt_repository
    onnx = {c.spec.role: c.onnx.stat().st_mtime_ns for c in first.calls}
    messages = []
    again = StandInBuilder()
    build_repository(
        tiny_pipeline_dir,
        out,
        settings,
        cache=out.parent / "cache",
        progress=messages.append,
        engine_builder=again,
    )
    assert {c.spec.role: c.onnx.stat().st_mtime_ns for c in again.calls} == onnx
    assert sum("reusing the ONNX export" in m for m in messages) == len(onnx)


def test_tensorrt_settings_reject_bad_gpu_lists():
    for gpus in ((), (0, 0), (-1,)):
        with pytest.raises(ValueError, match="gpus"):
            RepositorySettings(engine="tensorrt", gpus=gpus)


# --- GPU checks and engine records (pure) --------------------------------------------------------

H100 = "NVIDIA H100 80GB HBM3"


def test_check_gpus_accepts_one_model_and_names_mixed_or_missing_gpus():
    four = [GpuInfo(i, H100, (9, 0)) for i in range(4)]
    assert trt_build.check_gpus(GPUS, four, "10.13.3.9") == four[0]
    assert trt_build.check_gpus(GPUS, [], "10.13.3.9") is None  # no nvidia-smi: nothing checked
    with pytest.raises(trt_build.EngineBuildError, match=r"GPU\(s\) \[3\] not found"):
        trt_build.check_gpus(GPUS, four[:3], "10.13.3.9")
    mixed = four[:3] + [GpuInfo(3, "NVIDIA A100-SXM4-80GB", (8, 0))]
    with pytest.raises(trt_build.EngineBuildError, match="different models"):
        trt_build.check_gpus(GPUS, mixed, "10.13.3.9")


def test_volta_needs_tensorrt_10_4_or_older():
    v100 = [GpuInfo(i, "Tesla V100-SXM2-32GB", (7, 0)) for i in range(4)]
    assert trt_build.check_gpus(GPUS, v100, "10.3.0.26") == v100[0]
    assert trt_build.check_gpus(GPUS, v100, "10.4.0.26") == v100[0]
    with pytest.raises(trt_build.EngineBuildError, match="TRITON_TAG=24.08"):
        trt_build.check_gpus(GPUS, v100, "10.5.0.18")


def test_an_engine_is_reused_only_when_built_from_the_same_record(tmp_path):
    family = get_family("sd21")
    spec = family.components[DENOISER]
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"graph")
    profile = family.trt_profiles(MAX_K)[DENOISER]
    gpu = GpuInfo(2, H100, (9, 0))
    record = trt_build.engine_record(onnx, spec, profile, "fp16", "10.13.3.9", gpu)
    engine = tmp_path / ENGINE_FILE
    assert not trt_build.is_current(engine, record)  # no engine yet
    engine.write_bytes(b"engine")
    (tmp_path / f"{ENGINE_FILE}.json").write_text(json.dumps(record))
    assert trt_build.is_current(engine, record)
    other_slot = GpuInfo(0, H100, (9, 0))  # same model, another index: still current
    same = trt_build.engine_record(onnx, spec, profile, "fp16", "10.13.3.9", other_slot)
    assert trt_build.is_current(engine, same)
    changes = [
        trt_build.engine_record(
            onnx, spec, family.trt_profiles(2)[DENOISER], "fp16", "10.13.3.9", gpu
        ),
        trt_build.engine_record(onnx, spec, profile, "fp32", "10.13.3.9", gpu),
        trt_build.engine_record(onnx, spec, profile, "fp16", "10.14.1.48", gpu),
    ]
    for changed in changes:
        assert not trt_build.is_current(engine, changed)
    onnx.write_bytes(b"re-exported graph")  # a new ONNX file invalidates the engine
    assert not trt_build.is_current(
        engine, trt_build.engine_record(onnx, spec, profile, "fp16", "10.13.3.9", gpu)
    )


def test_without_tensorrt_the_error_says_what_to_install():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(trt_build.TensorRTUnavailable, match="pip install tensorrt"):
        trt_build.import_tensorrt()
    assert trt_build.tensorrt_version() is None


# --- the real build (TensorRT + CUDA GPU only) ---------------------------------------------------


def _gpu_build_unavailable() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT engine build skipped: the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT engine build skipped: no CUDA GPU visible to torch"
    return None


def _run_engine(path: Path, inputs: dict[str, np.ndarray], output_names) -> dict[str, np.ndarray]:
    """Run a TensorRT engine once on CUDA tensors; outputs as numpy."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    context = engine.create_execution_context()
    tensors = {name: torch.from_numpy(a).cuda() for name, a in inputs.items()}
    for name, t in tensors.items():
        context.set_input_shape(name, tuple(t.shape))
        context.set_tensor_address(name, t.data_ptr())
    outputs = {}
    for name in output_names:
        shape = tuple(context.get_tensor_shape(name))
        outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: t.cpu().numpy() for name, t in outputs.items()}


def test_tensorrt_fp16_engines_match_onnx_runtime(tiny_pipeline_dir, tmp_path):
    reason = _gpu_build_unavailable()
    if reason:
        pytest.skip(reason)
    import onnxruntime as ort

    settings = RepositorySettings(engine="tensorrt", gpus=(0,), max_k=MAX_K)
    cache = tmp_path / "cache"
    out = build_repository(tiny_pipeline_dir, tmp_path / "repo", settings, cache=cache)
    assert (cache / "tensorrt" / "timing.cache").stat().st_size > 0
    from driffusion.export.introspect import family_for_pipeline
    from driffusion.export.pipelines import load_pipeline

    family = family_for_pipeline("sd21", load_pipeline(tiny_pipeline_dir))
    height, width = family.default_size
    for role, spec in family.components.items():
        batch = spec.max_batch(MAX_K)
        inputs = spec.sample_inputs(batch, height, width, seed=1)
        (onnx,) = (cache / "onnx").glob(f"{role}-*/model.onnx")
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        ref = dict(zip(spec.output_names, session.run(None, inputs), strict=True))
        got = _run_engine(out / role / "1" / ENGINE_FILE, inputs, spec.output_names)
        for name in spec.output_names:
            err = np.abs(got[name] - ref[name]).max() / np.abs(ref[name]).max()
            assert err <= 1e-2, f"{role}/{name}: relative error {err:.2e}"
    messages = []
    build_repository(tiny_pipeline_dir, out, settings, cache=cache, progress=messages.append)
    assert sum("is up to date, skipped" in m for m in messages) == len(family.components)


# --- full-size SD2.1 UNet export (opt-in: --run-slow) -------------------------------------------


@pytest.mark.slow
def test_full_size_sd21_unet_exports_to_onnx_with_external_data(tmp_path):
    """The real SD2.1 UNet architecture (random weights, 865,910,724 parameters, 3.5 GB fp32)
    exports with dynamic axes and its weights in model.onnx.data (above protobuf's 2 GiB)."""
    import onnx
    import torch
    from diffusers import UNet2DConditionModel

    from driffusion.export.onnx import DATA_FILE, export_component, graph_io

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-2-1 unet/config.json
        sample_size=96,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ).eval()
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    family = get_family("sd21")
    spec = family.components[DENOISER]
    path = tmp_path / DENOISER / "model.onnx"
    path.parent.mkdir()
    with torch.no_grad():
        export_component(SimpleNamespace(unet=unet), spec, path, trace_size=(256, 256))
    assert (path.parent / DATA_FILE).stat().st_size > 2**31
    assert path.stat().st_size < 2**31
    model = onnx.load(str(path), load_external_data=False)
    want = {t.name: (t.dtype, t.shape) for t in spec.inputs}
    assert graph_io(model)["inputs"] == want
    shutil.rmtree(path.parent)
