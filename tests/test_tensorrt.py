"""The TensorRT path: profiles from the specs, tensorrt_plan configs, the repository around the
engines, the build itself where TensorRT and a CUDA GPU exist, and (opt-in, ``--run-slow``) a
full-size SD2.1 UNet export.

Where TensorRT or a GPU is missing, the engine build is skipped with the reason (``pytest -rs``
prints it); everything around it runs here with a stand-in builder.
Tolerance of the GPU test: the strongly typed fp16 engine vs ONNX Runtime on the same fp16 ONNX file
(which runs most fp16 operators in float32 on the CPU), relative error (max |diff| / max |ref|)
<= 1e-2: about 20 fp16 roundings, as the fp16 export tests in test_export.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from driffusion import tensors
from driffusion.export import tensorrt as trt_build
from driffusion.export.onnx import graph_io, weights_precision
from driffusion.export.tensorrt import GpuInfo
from driffusion.families import at_precision, get_family
from driffusion.model_repository.build import (
    ENGINE_FILE,
    RepositoryBuildError,
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


@pytest.mark.parametrize("name", ["sd21", "sdxl", "sd3"])
def test_the_denoiser_engine_has_a_round_profile_and_a_fanout_profile(name):
    """Profile 0 is optimised for a whole round as one batch (2*max_k), profile 1 for one CFG
    pair (what each GPU gets per round when fanning out); both accept every batch 1..2*max_k."""
    family = get_family(name)
    profiles = trt_build.engine_profiles(family, MAX_K)
    rounds, fanout = profiles[DENOISER]
    for name_, (lo, opt, hi) in rounds.items():
        assert (lo[0], opt[0], hi[0]) == (1, 2 * MAX_K, 2 * MAX_K), name_
        f_lo, f_opt, f_hi = fanout[name_]
        assert (f_lo, f_hi) == (lo, hi)  # same range: any request fits either profile
        assert f_opt[0] == trt_build.FANOUT_OPT_BATCH == 2 and f_opt[1:] == opt[1:]
    for role in family.components:
        if role != DENOISER:
            assert profiles[role] == [family.trt_profiles(MAX_K)[role]]
        for profile in profiles[role]:
            trt_build.check_profile(family.components[role], profile)
    one = trt_build.engine_profiles(family, 1)[DENOISER]  # max_k 1: both optimise batch 2
    assert [p[tensors.SAMPLE][1][0] for p in one] == [2, 2]


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
        else:  # text encoders and VAE on the first GPU, one profile: none listed
            assert groups == [(gpu, 1, [0])]
            assert all(list(g.profile) == [] for g in config.instance_group)


@pytest.mark.parametrize("name", ["sd21", "sdxl", "sd3"])
def test_every_denoiser_instance_may_use_both_profiles_and_types_are_the_served_ones(name):
    family = at_precision(get_family(name), "fp16")
    settings = RepositorySettings(name, engine="tensorrt", gpus=GPUS, max_k=MAX_K)
    configs = component_configs(family, settings)
    denoiser = parse_config(configs[DENOISER])
    assert [list(g.profile) for g in denoiser.instance_group] == [["0", "1"]]
    for role, text in configs.items():
        config = parse_config(text)
        spec = family.components[role]
        want = {t.name: t.dtype for t in spec.inputs + spec.outputs}
        got = {t.name: t.data_type for t in [*config.input, *config.output]}
        names = {mc.TYPE_FP16: "float16", mc.TYPE_FP32: "float32", mc.TYPE_INT64: "int64"}
        assert {n: names[d] for n, d in got.items()} == want, role
        if role != DENOISER:
            assert all(list(g.profile) == [] for g in config.instance_group), role


# --- the repository around the engines, with a stand-in builder ---------------------------------


class StandInBuilder:
    """Records what build_engine would get and writes a placeholder engine."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx_path, engine_path, spec, profiles, **kwargs):
        self.calls.append(
            SimpleNamespace(onnx=Path(onnx_path), spec=spec, profiles=profiles, **kwargs)
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
    assert roles == ["text_encoder", "denoiser", "vae_decoder", "vae_encoder"]
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
    assert len(denoiser.profiles) == 2
    for profile, opt in zip(denoiser.profiles, (2 * MAX_K, 2), strict=True):
        batches = {name: [s[0] for s in shapes] for name, shapes in profile.items()}
        top = 2 * MAX_K * RepositorySettings().max_images  # every draft of every image, CFG pairs
        assert batches == {name: [1, opt, top] for name in denoiser.spec.input_names}
    assert all(len(c.profiles) == 1 for c in builder.calls if c.spec.role != DENOISER)
    assert not any(p.suffix == ".onnx" for p in out.rglob("*"))  # no ONNX inside the repository


def test_engines_are_built_from_fp16_onnx_with_float16_io(tensorrt_repository):
    """The default precision: fp16 weights and float16 I/O in every ONNX file the engines are
    built from, and the same dtypes in config.pbtxt and in the orchestrator's spec."""
    out, builder, _ = tensorrt_repository
    for call in builder.calls:
        model = onnx.load(str(call.onnx), load_external_data=False)
        assert call.spec.precision == "fp16" == weights_precision(model)
        io = graph_io(model)
        assert io["inputs"][call.spec.input_names[0]][0] in ("float16", "int64")
        config = parse_config((out / call.spec.role / "config.pbtxt").read_text())
        assert [i.data_type for i in config.input] == [
            {"float16": mc.TYPE_FP16, "float32": mc.TYPE_FP32, "int64": mc.TYPE_INT64}[t.dtype]
            for t in call.spec.inputs
        ]
    served = json.loads((out / "driffusion" / "1" / "settings.json").read_text())["family"]
    sample = served["components"][DENOISER]["inputs"][0]
    assert (sample["name"], sample["dtype"]) == (tensors.SAMPLE, "float16")


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


# --- strongly typed, TensorRT 10 and 11; the server's TensorRT; the build GPU ------------------


def fake_trt(version: str, strongly_typed: bool = True):
    flags = {"STRONGLY_TYPED": 1} if strongly_typed else {}
    return SimpleNamespace(
        __version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(**flags)
    )


def test_networks_are_strongly_typed_on_tensorrt_10_and_11_and_older_ones_are_refused():
    assert trt_build.network_flags(fake_trt("10.13.3.9")) == 1 << 1
    assert trt_build.network_flags(fake_trt("11.4.0.106")) == 1 << 1  # accepted, ignored
    assert trt_build.network_flags(fake_trt("11.9.0.1", strongly_typed=False)) == 0  # always on
    with pytest.raises(trt_build.EngineBuildError, match="STRONGLY_TYPED"):
        trt_build.network_flags(fake_trt("10.1.0", strongly_typed=False))
    with pytest.raises(trt_build.EngineBuildError, match="too old"):
        trt_build.network_flags(fake_trt("8.6.1"))


def test_the_build_never_sets_a_precision_builder_flag():
    """BuilderFlag.FP16 is deprecated in 10.12 and gone in 11: precision comes from the ONNX."""
    source = Path(trt_build.__file__).read_text()
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
    assert "set_flag(" not in code and "BuilderFlag." not in code.split('"""', 2)[2]


@pytest.mark.parametrize(
    "name, version",
    [
        ("libnvinfer.so.10.14.1", "10.14.1"),
        ("libnvinfer.so.10.3.0", "10.3.0"),
        ("libnvinfer.so.11.4.0.106", "11.4.0"),
        ("libnvinfer.so.10", None),
        ("libnvinfer_plugin.so.10.14.1", None),
    ],
)
def test_libnvinfer_versions_are_read_from_the_file_name(tmp_path, name, version):
    path = tmp_path / name
    path.write_bytes(b"")
    assert trt_build.libnvinfer_file_version(path) == version


def test_a_symlinked_libnvinfer_is_read_through_the_link(tmp_path):
    real = tmp_path / "libnvinfer.so.10.14.1"
    real.write_bytes(b"")
    (tmp_path / "libnvinfer.so.10").symlink_to(real.name)
    assert trt_build.libnvinfer_file_version(tmp_path / "libnvinfer.so.10") == "10.14.1"
    found = trt_build.find_libnvinfer(dirs=[str(tmp_path)])
    assert found is not None and trt_build.libnvinfer_file_version(found) == "10.14.1"


def test_get_infer_lib_version_numbers():
    assert trt_build.infer_lib_version(101401) == "10.14.1"
    assert trt_build.infer_lib_version(100300) == "10.3.0"
    assert trt_build.infer_lib_version(110400) == "11.4.0"
    assert trt_build.infer_lib_version(8601) == "8.6.1"


def test_the_servers_tensorrt_comes_from_the_environment_or_the_system_library(tmp_path):
    lib = tmp_path / "libnvinfer.so.10.14.1"
    lib.write_bytes(b"")
    env = trt_build.SERVER_TENSORRT_ENV
    assert trt_build.server_tensorrt_version({env: "10.14.1.48"}) == ("10.14.1", f"${env}")
    assert trt_build.server_tensorrt_version({env: str(lib)}) == ("10.14.1", str(lib))
    assert trt_build.server_tensorrt_version({}, find=lambda: lib) == ("10.14.1", str(lib))
    short = tmp_path / "libnvinfer.so.10"
    short.write_bytes(b"")  # no version in the name: asked through getInferLibVersion
    probed = trt_build.server_tensorrt_version({}, find=lambda: short, probe=lambda p: "10.3.0")
    assert probed == ("10.3.0", str(short))
    with pytest.raises(trt_build.EngineBuildError, match=env):
        trt_build.server_tensorrt_version({}, find=lambda: None)
    with pytest.raises(trt_build.EngineBuildError, match="no such file"):
        trt_build.server_tensorrt_version({env: str(tmp_path / "missing.so")})


def test_a_tensorrt_package_other_than_the_servers_is_refused():
    trt_build.check_server_tensorrt("10.14.1.48", "10.14.1", "/usr/lib/libnvinfer.so.10.14.1")
    trt_build.check_server_tensorrt("11.4.0.106", "11.4.0", "$DRIFFUSION_SERVER_TENSORRT")
    for wheel, server in (
        ("11.4.0.106", "10.14.1"),
        ("10.13.3.9", "10.14.1"),
        ("10.14.2", "10.14.1"),
    ):
        with pytest.raises(trt_build.EngineBuildError, match=rf"{wheel}.*{server}.*do not load"):
            trt_build.check_server_tensorrt(wheel, server, "/usr/lib/libnvinfer.so")


def test_the_build_device_is_set_through_the_cuda_runtime():
    calls = []

    class Cudart:
        def cudaSetDevice(self, index):
            calls.append(index)
            return 0 if index < 4 else 101  # cudaErrorInvalidDevice

    trt_build.select_device(2, cudart=Cudart)
    assert calls == [2]
    with pytest.raises(trt_build.EngineBuildError, match=r"cudaSetDevice\(7\).*101"):
        trt_build.select_device(7, cudart=Cudart)
    with pytest.raises(trt_build.EngineBuildError, match="no CUDA runtime"):
        trt_build.select_device(0, cudart=lambda: None)


def test_the_real_build_checks_tensorrt_and_selects_gpus0_before_exporting(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    """Without a stand-in builder: the server's TensorRT is compared and GPU gpus[0] selected
    before the (long) export; a mismatch fails there, naming both versions."""
    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: fake_trt("10.13.3.9"))
    monkeypatch.setattr(trt_build, "query_gpus", lambda: [GpuInfo(i, H100, (9, 0)) for i in GPUS])
    selected = []
    monkeypatch.setattr(trt_build, "select_device", selected.append)
    monkeypatch.setenv(trt_build.SERVER_TENSORRT_ENV, "10.14.1")
    settings = RepositorySettings(engine="tensorrt", gpus=(2, 3), max_k=MAX_K)
    with pytest.raises(RepositoryBuildError, match=r"10\.13\.3\.9.*10\.14\.1"):
        build_repository(tiny_pipeline_dir, tmp_path / "repo", settings, progress=None)
    assert selected == [] and not (tmp_path / "repo").exists()
    monkeypatch.setenv(trt_build.SERVER_TENSORRT_ENV, "10.13.3")
    monkeypatch.setattr(
        trt_build,
        "build_engine",
        lambda *a, **k: (_ for _ in ()).throw(trt_build.EngineBuildError("stop after the checks")),
    )
    with pytest.raises(RepositoryBuildError, match="stop after the checks"):
        build_repository(tiny_pipeline_dir, tmp_path / "repo", settings, progress=None)
    assert selected == [2]


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
        dtype = torch.float16 if engine.get_tensor_dtype(name) == trt.float16 else torch.float32
        outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: t.float().cpu().numpy() for name, t in outputs.items()}


def test_tensorrt_fp16_engines_match_onnx_runtime(tiny_pipeline_dir, tmp_path):
    reason = _gpu_build_unavailable()
    if reason:
        pytest.skip(reason)
    import onnxruntime as ort
    import tensorrt

    # This machine has no Triton: the engines are checked here, so the server is this TensorRT.
    os.environ.setdefault(trt_build.SERVER_TENSORRT_ENV, tensorrt.__version__)
    settings = RepositorySettings(engine="tensorrt", gpus=(0,), max_k=MAX_K)
    cache = tmp_path / "cache"
    out = build_repository(tiny_pipeline_dir, tmp_path / "repo", settings, cache=cache)
    assert (cache / "tensorrt" / "timing.cache").stat().st_size > 0
    from driffusion.export.introspect import family_for_pipeline
    from driffusion.export.pipelines import load_pipeline

    family = at_precision(family_for_pipeline("sd21", load_pipeline(tiny_pipeline_dir)), "fp16")
    height, width = family.default_size
    for role, spec in family.components.items():
        batch = spec.max_batch(MAX_K)
        inputs = spec.sample_inputs(batch, height, width, seed=1)
        (onnx,) = (cache / "onnx").glob(f"{role}-*/model.onnx")
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        ref = dict(zip(spec.output_names, session.run(None, inputs), strict=True))
        got = _run_engine(out / role / "1" / ENGINE_FILE, inputs, spec.output_names)
        for name in spec.output_names:
            err = np.abs(got[name] - ref[name].astype(np.float32)).max()
            err /= np.abs(ref[name].astype(np.float32)).max()
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
    family = at_precision(get_family("sd21"), "fp32")
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
