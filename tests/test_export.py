"""Family specs, tiny pipelines and ONNX export, checked against torch and diffusers.

Tolerance: relative error = max |onnx - torch| / max |torch| over the whole output, <= 1e-4 (fp32;
seen: about 1e-6).
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
    wrap_component,
)
from driffusion.export.tiny import build_tiny_pipeline, load_tiny_pipeline, tiny_clip_vocab
from driffusion.families import FAMILIES, get_family

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
    family = family_for_pipeline(request.param, pipe)
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
    family = family_for_pipeline("sd3", pipe)
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
    public = FAMILIES[family.name]  # full-size widths
    with pytest.raises(ExportError, match=tensors.TEXT_ENCODER):
        export_pipeline_to_onnx(pipe, public, tmp_path, progress=None, trace_size=(512, 512))
