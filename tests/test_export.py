"""Family specs, tiny pipelines and ONNX export, checked against torch and diffusers.

Tolerances: relative error = max |onnx - torch fp32| / max |torch fp32| over the whole output.
- fp32 exports: <= 1e-4 (seen: about 1e-6).
- fp16 exports: <= 1e-2. One fp16 rounding is u = 2^-11 = 4.9e-4 relative; the tiny models
  chain 10 to 40 rounded operations between input and output, so errors of a few u are expected
  (seen: 1.2e-3 to 5e-3, the VAE decoders largest). 1e-2 is about 20 u: it passes fp16
  arithmetic and fails what fp16 breaks (an overflow gives inf/NaN, a lost float32 upcast or a
  wrong cast gives O(1) error). fp16 graphs run in onnx.reference, which computes in the graph's
  own types; ONNX Runtime's CPU provider lacks fp16 kernels for most operators and would run them
  in float32 behind inserted casts (it is used where it has every kernel: fp32 components).
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from driffusion import tensors
from driffusion.conditioning import denoiser_conditions
from driffusion.export.introspect import family_for_pipeline
from driffusion.export.onnx import (
    DATA_FILE,
    ExportError,
    export_component,
    export_pipeline_to_onnx,
    graph_io,
    matches_spec,
    weights_precision,
    wrap_component,
)
from driffusion.export.tiny import build_tiny_pipeline, load_tiny_pipeline, tiny_clip_vocab
from driffusion.families import FAMILIES, FP32_TENSORS, at_precision, get_family

RTOL = 1e-4
K = 4  # drafts per round: the denoiser is checked at batch 1 and 2*K
TINY = ("sd21", "sdxl", "sd3")  # tiny pipelines, each of its family
PROMPTS = ["a photo of a cat", "An astronaut riding a horse, 4k!", "", "dog"]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tokenize(tokenizer, prompts: list[str], length: int) -> np.ndarray:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int64)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread; two fight over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    """{family: pipeline}: each tiny pipeline built, saved and reloaded offline."""
    root = tmp_path_factory.mktemp("pipelines")
    pipes = {}
    for name in TINY:
        pipes[name] = load_tiny_pipeline(build_tiny_pipeline(name, root / name))
        pipes[name].set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tiny_pipes, tmp_path_factory):
    """(pipeline, family spec, {role: onnx path}) for one tiny family."""
    pipe = tiny_pipes[request.param]
    family = at_precision(family_for_pipeline(request.param, pipe), "fp32")
    out = tmp_path_factory.mktemp(request.param)
    paths = export_pipeline_to_onnx(pipe, family, out, progress=None)
    return pipe, family, paths


def component_inputs(pipe, family, role: str, batch: int, seed: int = 0) -> dict:
    spec = family.components[role]
    x = spec.sample_inputs(batch, *family.default_size, seed=seed)
    if role in family.text_roles:  # real prompts, so the pooled EOS state is the pipeline's
        tokenizer = pipe.tokenizer if role == tensors.TEXT_ENCODER else pipe.tokenizer_2
        prompts = (PROMPTS * batch)[:batch]
        x[tensors.INPUT_IDS] = tokenize(tokenizer, prompts, family.tokenizer_max_length)
    if tensors.TIME_IDS in x:
        h, w = family.default_size
        x[tensors.TIME_IDS] = np.tile(np.float32([h, w, 0, 0, h, w]), (batch, 1))
    return x


# --- specs ---------------------------------------------------------------------------------


def test_get_family_rejects_unknown_names_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="family must be one of sd21, sdxl, sd3, got 'sd4'"):
        get_family("sd4")
    assert get_family("sdxl") is FAMILIES["sdxl"]


def test_public_families_carry_the_checkpoint_conventions():
    sd21, sdxl, sd3 = FAMILIES["sd21"], FAMILIES["sdxl"], FAMILIES["sd3"]
    assert (sd21.default_size, sd21.scheduler_config["prediction_type"]) == (
        (768, 768),
        "v_prediction",
    )
    assert sd21.scheduler_class == "DDIMScheduler"
    assert (sdxl.default_size, sdxl.scheduler_class, sdxl.zero_empty_negative) == (
        (1024, 1024),
        "EulerDiscreteScheduler",
        True,
    )
    assert (sd3.latent_channels, sd3.scheduler_class, sd3.scheduler_config["shift"]) == (
        16,
        "FlowMatchEulerDiscreteScheduler",
        3.0,
    )
    assert sd3.components[tensors.DENOISER].tensor(tensors.ENCODER_HIDDEN_STATES).shape[1:] == (
        77 + 256,
        4096,
    )
    assert sdxl.components[tensors.DENOISER].input_names == (
        tensors.SAMPLE,
        tensors.TIMESTEP,
        tensors.ENCODER_HIDDEN_STATES,
        tensors.TEXT_EMBEDS,
        tensors.TIME_IDS,
    )
    for family in FAMILIES.values():
        for size in (family.min_size, family.default_size[0], family.max_size):
            family.check_size(size, size)


def test_trt_profiles_span_batch_1_to_2k_and_the_resolution_range():
    family = FAMILIES["sdxl"]
    profiles = family.trt_profiles(max_k=K)
    lo, hi = family.min_size // 8, family.max_size // 8
    assert profiles[tensors.DENOISER][tensors.SAMPLE] == (
        (1, 4, lo, lo),
        (2 * K, 4, 128, 128),
        (2 * K, 4, hi, hi),
    )
    assert profiles[tensors.DENOISER][tensors.TIMESTEP] == ((1,), (2 * K,), (2 * K,))
    assert profiles[tensors.TEXT_ENCODER][tensors.INPUT_IDS] == ((1, 77), (2, 77), (2, 77))
    assert profiles[tensors.VAE_DECODER][tensors.LATENT][2] == (1, 4, hi, hi)
    assert family.trt_profiles(max_k=K, opt_batch=2)[tensors.DENOISER][tensors.SAMPLE][1][0] == 2


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda f: f.trt_profiles(max_k=0), "max_k"),
        (lambda f: f.trt_profiles(max_k=2, opt_batch=5), "opt_batch"),
        (lambda f: f.check_size(1024, 1000), "width"),
        (lambda f: f.check_size(4096, 1024), "height"),
    ],
)
def test_bad_profile_arguments_raise_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call(FAMILIES["sdxl"])


def test_dynamic_axes_come_from_the_symbolic_dims():
    denoiser = FAMILIES["sd3"].components[tensors.DENOISER]
    axes = denoiser.dynamic_axes()
    assert axes[tensors.SAMPLE] == {
        0: tensors.BATCH,
        2: tensors.LATENT_HEIGHT,
        3: tensors.LATENT_WIDTH,
    }
    assert axes[tensors.POOLED_PROJECTIONS] == {0: tensors.BATCH}
    assert FAMILIES["sd3"].components[tensors.VAE_DECODER].dynamic_axes()[tensors.IMAGE] == {
        0: tensors.BATCH,
        2: tensors.HEIGHT,
        3: tensors.WIDTH,
    }


def test_a_small_checkpoint_gets_its_own_widths_and_a_size_range_scaled_to_it(tiny_pipes):
    pipe = tiny_pipes["sd21"]
    derived = family_for_pipeline("sd21", pipe)
    context = derived.components[tensors.DENOISER].tensor(tensors.ENCODER_HIDDEN_STATES).shape
    assert context == (tensors.BATCH, 77, pipe.text_encoder.config.hidden_size)
    # 64 px default, 2 UNet levels: multiples of 8 * 2; the public 256..1024 range scaled by 64/768
    assert (derived.default_size, derived.size_multiple) == ((64, 64), 16)
    assert (derived.min_size, derived.max_size) == (16, 80)
    assert derived.scheduler_config["prediction_type"] == "v_prediction"
    assert derived.to_dict() == type(derived).from_dict(derived.to_dict()).to_dict()


def test_the_tiny_tokenizer_encodes_any_text_without_unknown_tokens(tiny_pipes):
    pipe = tiny_pipes["sd21"]
    vocab, _ = tiny_clip_vocab()
    text = string.printable + " naïve café 東京 🙂"
    ids = pipe.tokenizer(text).input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert vocab["<|endoftext|>"] not in ids[1:-1]  # the unknown token is <|endoftext|>
    padded = tokenize(pipe.tokenizer, ["cat"], 77)[0]
    assert padded[-1] == 0  # OpenCLIP pads with "!" (id 0)


# --- export --------------------------------------------------------------------------------


def test_graph_inputs_and_outputs_carry_the_spec_names_dtypes_and_dims(exported):
    _, family, paths = exported
    assert set(paths) == set(family.components)
    for role, spec in family.components.items():
        io = graph_io(onnx.load(str(paths[role])))
        assert io["inputs"] == {t.name: (t.dtype, t.shape) for t in spec.inputs}, role
        assert io["outputs"] == {t.name: (t.dtype, t.shape) for t in spec.outputs}, role
        assert onnx.load(str(paths[role])).opset_import[0].version == 18


@pytest.mark.parametrize("batch", [1, 2 * K])
def test_onnx_runtime_matches_torch_for_every_component(exported, batch):
    pipe, family, paths = exported
    for role, spec in family.components.items():
        x = component_inputs(pipe, family, role, batch, seed=batch)
        with torch.no_grad():
            ref = wrap_component(pipe, spec)(*(torch.from_numpy(x[n]) for n in spec.input_names))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session(paths[role]).run(None, x)
        dims = spec.dims(batch, *family.default_size)
        for t, g, r in zip(spec.outputs, got, ref, strict=True):
            assert g.shape == t.resolve(dims), (role, t.name)
            assert rel_err(g, r.numpy()) <= RTOL, (role, t.name)


def test_spatial_axes_stay_dynamic_up_to_the_largest_size(exported):
    pipe, family, paths = exported
    size = family.max_size
    for role in (tensors.DENOISER, tensors.VAE_DECODER):
        spec = family.components[role]
        x = spec.sample_inputs(1, size, size, seed=3)
        with torch.no_grad():
            ref = wrap_component(pipe, spec)(*(torch.from_numpy(x[n]) for n in spec.input_names))
        (got,) = session(paths[role]).run(None, x)
        assert got.shape == spec.outputs[0].resolve(spec.dims(1, size, size))
        assert rel_err(got, ref.numpy()) <= RTOL, role


def test_spec_conditions_from_onnx_encoders_match_diffusers_encode_prompt(exported):
    pipe, family, paths = exported
    prompts = PROMPTS[:2]
    h, w = family.default_size
    text = {}
    for role in family.text_roles:
        tokenizer = pipe.tokenizer if role == tensors.TEXT_ENCODER else pipe.tokenizer_2
        ids = tokenize(tokenizer, prompts, family.tokenizer_max_length)
        out = session(paths[role]).run(None, {tensors.INPUT_IDS: ids})
        text[role] = dict(zip(family.components[role].output_names, out, strict=True))
    cond = denoiser_conditions(family, text, h, w)

    with torch.no_grad():
        if family.conditioning == "sd":
            ref = {tensors.ENCODER_HIDDEN_STATES: pipe.encode_prompt(prompts, "cpu", 1, False)[0]}
        elif family.conditioning == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
            time_ids = pipe._get_add_time_ids(
                (h, w), (0, 0), (h, w), torch.float32, pipe.text_encoder_2.config.projection_dim
            )
            ref = {
                tensors.ENCODER_HIDDEN_STATES: embeds,
                tensors.TEXT_EMBEDS: pooled,
                tensors.TIME_IDS: time_ids.repeat(len(prompts), 1),
            }
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, prompts, prompts, do_classifier_free_guidance=False
            )
            ref = {tensors.ENCODER_HIDDEN_STATES: embeds, tensors.POOLED_PROJECTIONS: pooled}
    assert set(cond) == set(ref) == set(family.components[tensors.DENOISER].input_names[2:])
    for name, r in ref.items():
        assert cond[name].shape == tuple(r.shape), name
        assert np.abs(cond[name] - r.numpy()).max() <= RTOL * np.abs(r.numpy()).max(), name


def test_onnx_components_with_the_spec_reproduce_the_diffusers_pipeline(exported):
    """CFG sampling with the ONNX denoiser and decoder and diffusers' own scheduler step."""
    pipe, family, paths = exported
    h, w = family.default_size
    steps, guidance = 4, family.guidance_scale
    prompt = PROMPTS[1]
    generator = torch.Generator().manual_seed(0)
    shape = (1, family.latent_channels, h // family.vae_scale_factor, w // family.vae_scale_factor)
    latents = torch.randn(shape, generator=generator)
    ref = pipe(
        prompt,
        height=h,
        width=w,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents,
        output_type="np",
    ).images  # (1, H, W, 3)

    text = {}
    for role in family.text_roles:
        tokenizer = pipe.tokenizer if role == tensors.TEXT_ENCODER else pipe.tokenizer_2
        ids = tokenize(tokenizer, ["", prompt], family.tokenizer_max_length)  # (uncond, cond)
        out = session(paths[role]).run(None, {tensors.INPUT_IDS: ids})
        text[role] = dict(zip(family.components[role].output_names, out, strict=True))
    cond = denoiser_conditions(family, text, h, w, empty_negative_row=0)  # SDXL zeroes it

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    denoiser = session(paths[tensors.DENOISER])
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x])
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        feed = dict(
            cond, **{tensors.SAMPLE: model_in.numpy(), tensors.TIMESTEP: np.full(2, float(t))}
        )
        feed[tensors.TIMESTEP] = feed[tensors.TIMESTEP].astype(np.float32)
        (out,) = denoiser.run(None, feed)
        uncond, text_cond = torch.from_numpy(out).chunk(2)
        x = scheduler.step(uncond + guidance * (text_cond - uncond), t, x).prev_sample
    (image,) = session(paths[tensors.VAE_DECODER]).run(None, {tensors.LATENT: x.numpy()})
    assert rel_err(image.transpose(0, 2, 3, 1), ref) <= RTOL


# --- export behaviour ----------------------------------------------------------------------


def test_existing_files_are_skipped_unless_forced(exported):
    pipe, family, paths = exported
    messages = []
    export_pipeline_to_onnx(
        pipe, family, paths[tensors.DENOISER].parents[1], progress=messages.append
    )
    assert len(messages) == len(family.components)
    assert all("skipped" in m for m in messages)


def test_an_existing_file_with_other_inputs_is_exported_again(exported, tmp_path):
    pipe, family, paths = exported
    stale = tmp_path / tensors.TEXT_ENCODER / "model.onnx"
    stale.parent.mkdir()
    stale.write_bytes(paths[tensors.VAE_DECODER].read_bytes())
    only_text = dataclasses.replace(
        family, components={tensors.TEXT_ENCODER: family.components[tensors.TEXT_ENCODER]}
    )
    messages = []
    export_pipeline_to_onnx(pipe, only_text, tmp_path, progress=messages.append)
    assert "re-exporting" in messages[0]
    assert list(graph_io(onnx.load(str(stale)))["inputs"]) == [tensors.INPUT_IDS]


def test_large_models_keep_their_weights_in_one_external_file(tiny_pipes, tmp_path):
    pipe = tiny_pipes["sd3"]
    family = at_precision(family_for_pipeline("sd3", pipe), "fp32")
    spec = family.components[tensors.VAE_DECODER]
    path = export_component(
        pipe, spec, tmp_path / "model.onnx", trace_size=(32, 32), external_data_threshold=0
    )
    assert (tmp_path / DATA_FILE).stat().st_size > path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DATA_FILE, "model.onnx"])
    x = spec.sample_inputs(1, *family.default_size)
    with torch.no_grad():
        ref = wrap_component(pipe, spec)(torch.from_numpy(x[tensors.LATENT]))
    assert rel_err(session(path).run(None, x)[0], ref.numpy()) <= RTOL


def test_a_spec_that_does_not_fit_the_pipeline_fails_naming_the_component(exported, tmp_path):
    pipe, family, _ = exported
    public = at_precision(FAMILIES[family.name], "fp32")  # full-size widths
    with pytest.raises(ExportError, match=tensors.TEXT_ENCODER):
        export_pipeline_to_onnx(pipe, public, tmp_path, progress=None, trace_size=(512, 512))


# --- fp16 exports ---------------------------------------------------------------------------

RTOL_FP16 = 1e-2  # about 20 fp16 roundings (module docstring)
FP16_FAMILIES = {"sd21": "sd21", "sdxl": "sdxl", "sd3": "sd3"}  # fp16 views of the public specs


def run_as_typed(path, inputs: dict) -> list[np.ndarray]:
    """Outputs of an ONNX file computed in the graph's own types: ONNX Runtime when its CPU
    provider has a kernel for every node in those types (it inserts float32 casts otherwise),
    else onnx.reference."""
    import tempfile

    from onnx.reference import ReferenceEvaluator

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(f"{tmp}/optimized.onnx", load_external_data=False)
    if not any(n.name.startswith("InsertedPrecisionFreeCast") for n in optimized.graph.node):
        return sess.run(None, inputs)
    with np.errstate(over="ignore"):  # float16 exp(-x) in Sigmoid overflows to inf: 1/(1+inf) = 0
        return ReferenceEvaluator(str(path)).run(None, inputs)


@pytest.fixture(scope="module", params=sorted(FP16_FAMILIES))
def exported_fp16(request, tiny_pipes, tmp_path_factory):
    """(pipeline, fp16 family view, fp32 family view, {role: onnx path}) for one tiny family."""
    pipe = tiny_pipes[request.param]
    family = family_for_pipeline(FP16_FAMILIES[request.param], pipe)
    fp16, fp32 = at_precision(family, "fp16"), at_precision(family, "fp32")
    out = tmp_path_factory.mktemp(f"{request.param}-fp16")
    return pipe, fp16, fp32, export_pipeline_to_onnx(pipe, fp16, out, progress=None)


def test_fp16_views_keep_timesteps_float32_and_sdxls_vae_fp32():
    for name in ("sd21", "sdxl", "sd3"):
        fp16 = at_precision(FAMILIES[name], "fp16")
        for role, spec in fp16.components.items():
            keep_fp32 = name == "sdxl" and role in (tensors.VAE_DECODER, tensors.VAE_ENCODER)
            assert spec.precision == ("fp32" if keep_fp32 else "fp16"), (name, role)
            for t in spec.inputs + spec.outputs:
                if t.dtype == "int64":
                    continue
                fp32 = keep_fp32 or t.name in FP32_TENSORS
                assert t.dtype == ("float32" if fp32 else "float16"), (name, role, t.name)
        assert at_precision(fp16, "fp16") == fp16  # applying it again changes nothing
        fp32_view = at_precision(FAMILIES[name], "fp32")
        assert {s.precision for s in fp32_view.components.values()} == {"fp32"}
        assert all(
            t.dtype in ("float32", "int64")
            for s in fp32_view.components.values()
            for t in s.inputs + s.outputs
        )
    with pytest.raises(ValueError, match="precision"):
        at_precision(FAMILIES["sd21"], "bf16")


def test_fp16_files_hold_fp16_weights_and_the_served_dtypes(exported_fp16):
    _, fp16, _, paths = exported_fp16
    for role, spec in fp16.components.items():
        model = onnx.load(str(paths[role]))
        weights = [i for i in model.graph.initializer if i.data_type in (1, 10)]  # float, float16
        fp16_bytes = sum(2 * int(np.prod(i.dims)) for i in weights if i.data_type == 10)
        fp32_bytes = sum(4 * int(np.prod(i.dims)) for i in weights if i.data_type == 1)
        if spec.precision == "fp16":  # all but a few small float32 constants
            assert fp16_bytes > 0.95 * (fp16_bytes + fp32_bytes), (role, fp16_bytes, fp32_bytes)
        else:  # SDXL's VAE
            assert fp16_bytes == 0, role
        assert weights_precision(model) == spec.precision, role
        io = graph_io(model)
        assert io["inputs"] == {t.name: (t.dtype, t.shape) for t in spec.inputs}, role
        assert io["outputs"] == {t.name: (t.dtype, t.shape) for t in spec.outputs}, role


@pytest.mark.parametrize("batch", [1, 2 * K])
def test_fp16_files_match_torch_fp32_within_fp16_error(exported_fp16, batch):
    pipe, fp16, fp32, paths = exported_fp16
    for role, spec in fp16.components.items():
        x = component_inputs(pipe, fp16, role, batch, seed=batch)
        # The fp32 model on the very values the fp16 file gets (rounded to float16 where the
        # file takes float16): the difference is the file's arithmetic, not input rounding.
        x32 = {n: v.astype(np.float32) if v.dtype == np.float16 else v for n, v in x.items()}
        with torch.no_grad():
            ref = wrap_component(pipe, fp32.components[role])(
                *(torch.from_numpy(x32[n]) for n in spec.input_names)
            )
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = run_as_typed(paths[role], x)
        for t, g, r in zip(spec.outputs, got, ref, strict=True):
            assert g.dtype == np.dtype(t.dtype), (role, t.name)
            assert np.isfinite(g).all(), (role, t.name)
            err = rel_err(g.astype(np.float32), r.numpy())
            assert err <= RTOL_FP16, (role, t.name, err)


def test_an_fp32_file_is_exported_again_when_fp16_is_asked(exported, tmp_path):
    pipe, family, paths = exported
    fp16 = at_precision(family_for_pipeline(family.name, pipe), "fp16")
    spec = fp16.components[tensors.DENOISER]
    assert not matches_spec(paths[tensors.DENOISER], spec)  # fp32 file, fp16 spec
    assert matches_spec(paths[tensors.DENOISER], family.components[tensors.DENOISER])


def softmax_input_dtypes(path) -> list[str]:
    """numpy dtype names of every Softmax's input, from ONNX's type inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    return [
        np.dtype(onnx.helper.tensor_dtype_to_np_dtype(types[n.input[0]])).name
        for n in model.graph.node
        if n.op_type == "Softmax"
    ]


def test_attention_marked_upcast_runs_in_float32_in_the_fp16_graph(exported_fp16):
    """SD2.1's UNet (upcast_attention) and every VAE mid-block (upcast_softmax) compute their
    attention scores and softmax in float32; SDXL's and SD3's denoisers (no flags) in float16."""
    pipe, fp16, _, paths = exported_fp16
    from diffusers.models.attention_processor import Attention

    for role in (tensors.DENOISER, tensors.VAE_DECODER):
        spec = fp16.components[role]
        module = getattr(pipe, spec.pipeline_attr)
        flags = {
            bool(m.upcast_attention or m.upcast_softmax)
            for m in module.modules()
            if isinstance(m, Attention)
        }
        dtypes = set(softmax_input_dtypes(paths[role]))
        if spec.precision == "fp32":
            assert dtypes == {"float32"}, role
        elif flags == {True}:
            assert dtypes == {"float32"}, (role, dtypes)
        else:
            assert flags == {False} and dtypes == {"float16"}, (role, flags, dtypes)
    denoiser = getattr(pipe, fp16.components[tensors.DENOISER].pipeline_attr)
    processors = {type(p).__name__ for p in denoiser.attn_processors.values()}
    assert "AttnProcessor" not in processors, "the export restores the pipeline's processors"
    assert {p.dtype for p in denoiser.parameters()} == {torch.float32}, "the pipeline stays fp32"


def test_upcast_attention_keeps_fp16_scores_from_overflowing(tiny_pipes, tmp_path):
    """Attention logits beyond float16's range (65504): SD2.1's upcast_attention computes them in
    float32, so the fp16 file stays finite; traced with the default SDPA processor the scores
    overflow to inf and the softmax gives NaN."""
    import copy

    from diffusers.models.attention_processor import Attention

    pipe = copy.copy(tiny_pipes["sd21"])
    pipe.unet = copy.deepcopy(tiny_pipes["sd21"].unet)
    for m in pipe.unet.modules():
        if isinstance(m, Attention):  # q and k stay within fp16, their products do not
            m.to_q.weight.data *= 200.0
            m.to_k.weight.data *= 200.0
    family = at_precision(family_for_pipeline("sd21", pipe), "fp16")
    spec = family.components[tensors.DENOISER]
    x = spec.sample_inputs(2, *family.default_size, seed=5)
    with torch.no_grad():
        scores = []
        hooks = [
            m.register_forward_hook(
                lambda mod, args, kwargs, out: scores.append(
                    float(
                        (
                            mod.to_q(args[0])
                            @ mod.to_k(
                                kwargs.get("encoder_hidden_states")
                                if kwargs.get("encoder_hidden_states") is not None
                                else args[0]
                            ).transpose(-1, -2)
                        )
                        .abs()
                        .max()
                        * mod.scale
                    )
                ),
                with_kwargs=True,
            )
            for m in pipe.unet.modules()
            if isinstance(m, Attention)
        ]
        wrap_component(pipe, at_precision(family, "fp32").components[tensors.DENOISER])(
            *(
                torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v)
                for v in x.values()
            )
        )
        for h in hooks:
            h.remove()
    assert max(scores) > 65504, "the test needs logits beyond float16's range"
    path = export_component(pipe, spec, tmp_path / "model.onnx", trace_size=(32, 32))
    (out,) = run_as_typed(path, x)
    assert np.isfinite(out).all()
