"""The client and its CLI without a server: image helpers, request tensors, flags, errors.

Requests through a real server are tested end to end elsewhere; nothing here imitates Triton.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import deserialize_bytes_tensor

from driffusion import api
from driffusion.cli import build_parser, main
from driffusion.cli.main import request_inputs
from driffusion.cli.progress import progress
from driffusion.client import (
    DriffusionClient,
    DriffusionError,
    GenerateResult,
    build_inputs,
    max_abs_diff,
    psnr,
    save_png,
)

UNREACHABLE = "localhost:1"  # nothing listens on port 1

# One value of every input; the BYTES ones are not ASCII, to check the UTF-8 encoding.
EVERY_INPUT = {
    api.PROMPT.name: "a café at dawn ☕",
    api.NEGATIVE_PROMPT.name: "blurry, ぼやけた",
    api.SEED.name: 2**63 - 1,
    api.STEPS.name: 20,
    api.GUIDANCE.name: 7.5,
    api.MODE.name: "conservative",
    api.K.name: 3,
    api.K_SCHEDULE.name: "tapered",
    api.HEIGHT.name: 256,
    api.WIDTH.name: 384,
    api.FANOUT.name: "batch",
    api.NUM_IMAGES.name: 2,
    api.SCHEDULER.name: "dpmpp_2m_karras",
    api.INIT_IMAGE.name: np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3),
    api.STRENGTH.name: 0.5,
    api.PREVIEW.name: True,
}


def random_image(rng: np.random.Generator, shape=(16, 24, 3)) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


# --- image helpers ---------------------------------------------------------------------------


def test_psnr_is_infinite_for_equal_images():
    image = random_image(np.random.default_rng(0))
    assert psnr(image, image.copy()) == math.inf


def test_psnr_matches_its_definition_for_one_changed_pixel():
    a = np.zeros((10, 10, 3), np.uint8)
    b = a.copy()
    b[3, 4, 1] = 51
    mse = 51**2 / a.size
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)


def test_max_abs_diff_does_not_wrap_around_uint8():
    a, b = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)
    assert max_abs_diff(a, b) == max_abs_diff(b, a) == 255
    assert max_abs_diff(a, a) == 0


@pytest.mark.parametrize("helper", [psnr, max_abs_diff])
def test_image_comparisons_reject_images_of_different_shapes_or_dtypes(helper):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8 images of one shape"):
        helper(image, np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 images of one shape"):
        helper(image, image.astype(np.float32))


def test_save_png_round_trips_the_pixels_exactly(tmp_path):
    image = random_image(np.random.default_rng(1))
    path = save_png(image, tmp_path / "image.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), image)


def test_save_png_rejects_a_non_rgb_array(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        save_png(np.zeros((4, 4), np.uint8), tmp_path / "gray.png")


# --- request tensors -------------------------------------------------------------------------


def test_build_inputs_sends_every_input_with_the_api_name_dtype_and_shape():
    inputs = build_inputs(**EVERY_INPUT)
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
        (f.name, f.dtype, [16, 24, 3] if f is api.INIT_IMAGE else [1]) for f in api.INPUTS
    ]


def test_build_inputs_encodes_the_values_the_server_will_decode():
    for f, tensor in zip(api.INPUTS, build_inputs(**EVERY_INPUT), strict=True):
        raw = tensor._get_content()  # the bytes that go on the wire
        if f.dtype == "BYTES":
            (value,) = deserialize_bytes_tensor(raw)
            assert value.decode("utf-8") == EVERY_INPUT[f.name]
        elif f is api.INIT_IMAGE:
            assert raw == EVERY_INPUT[f.name].tobytes()
        else:
            (value,) = np.frombuffer(raw, dtype=api.NUMPY_DTYPES[f.dtype])
            assert value == np.array(EVERY_INPUT[f.name], dtype=api.NUMPY_DTYPES[f.dtype])


def test_build_inputs_leaves_out_inputs_that_are_none():
    inputs = build_inputs(**{f.name: None for f in api.INPUTS} | {api.PROMPT.name: "p"})
    assert [i.name() for i in inputs] == [api.PROMPT.name]


def test_build_inputs_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown input"):
        build_inputs(prompt="p", sampler="ddim")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (api.STEPS.name, 2.5),  # would truncate silently
        (api.SEED.name, "7"),
        (api.K.name, True),
        (api.GUIDANCE.name, "7.5"),
        (api.PROMPT.name, 3),
    ],
)
def test_build_inputs_rejects_values_of_the_wrong_kind(name, value):
    with pytest.raises(TypeError, match=name):
        build_inputs(**{name: value})


@pytest.mark.parametrize(("name", "value"), [(api.SEED.name, 2**63), (api.STEPS.name, 2**31)])
def test_build_inputs_rejects_integers_that_do_not_fit_the_dtype(name, value):
    with pytest.raises(ValueError, match=f"{name}={value} does not fit"):
        build_inputs(**{name: value})


def test_generate_takes_one_keyword_per_api_input():
    parameters = inspect.signature(DriffusionClient.generate).parameters
    assert [p for p in parameters if p not in ("self", "timeout_s")] == [f.name for f in api.INPUTS]


def test_generate_result_has_one_field_per_api_output():
    names = [f.name for f in dataclasses.fields(GenerateResult)]
    # the model's `image` output is `images`: (num_images, H, W, 3) whatever num_images is
    expected = ["images" if f is api.IMAGE else f.name for f in api.OUTPUTS]
    assert names[: len(api.OUTPUTS)] == expected


# --- errors ----------------------------------------------------------------------------------


def test_wait_ready_on_a_closed_port_raises_an_error_naming_the_url():
    with DriffusionClient(UNREACHABLE) as client:
        with pytest.raises(DriffusionError, match=UNREACHABLE) as info:
            client.wait_ready(timeout_s=1)
    assert "not reachable" in str(info.value) and not info.value.is_invalid_argument


def test_driffusion_error_knows_an_invalid_argument_status():
    assert DriffusionError("steps must be in [1, 1000]", "StatusCode.INVALID_ARGUMENT").status
    assert DriffusionError("x", "StatusCode.INVALID_ARGUMENT").is_invalid_argument
    assert not DriffusionError("x", "StatusCode.INTERNAL").is_invalid_argument
    assert str(DriffusionError("steps must be in [1, 1000]", "s")) == "steps must be in [1, 1000]"


# --- command line ----------------------------------------------------------------------------

GENERATE_FLAGS = [
    *("--prompt", EVERY_INPUT[api.PROMPT.name]),
    *("--negative-prompt", EVERY_INPUT[api.NEGATIVE_PROMPT.name]),
    *("--seed", "9223372036854775807", "--steps", "20", "--guidance-scale", "7.5"),
    *("--mode", "conservative", "--k", "3", "--k-schedule", "tapered"),
    *("--height", "256", "--width", "384", "--fanout", "batch"),
    *("--num-images", "2", "--scheduler", "dpmpp_2m_karras", "--strength", "0.5", "--preview"),
]


def test_generate_flags_parse_to_the_request_of_every_input(tmp_path):
    picture = save_png(EVERY_INPUT[api.INIT_IMAGE.name], tmp_path / "start.png")
    args = build_parser().parse_args(
        ["generate", *GENERATE_FLAGS, "--image", str(picture), "--out", str(tmp_path / "x.png")]
        + ["--url", "h:1", "--timeout", "30", "--wait", "5"]
    )
    request = request_inputs(args)
    image = request.pop(api.INIT_IMAGE.name)
    assert np.array_equal(image, EVERY_INPUT[api.INIT_IMAGE.name])  # read back from the file
    assert request == {k: v for k, v in EVERY_INPUT.items() if k != api.INIT_IMAGE.name}
    assert (args.url, args.timeout, args.wait, args.out.name) == ("h:1", 30.0, 5.0, "x.png")


def test_generate_sends_only_the_prompt_by_default(tmp_path):
    args = build_parser().parse_args(["generate", "--prompt", "p", "--out", "x.png"])
    assert request_inputs(args) == {api.PROMPT.name: "p"}
    assert (args.url, args.timeout) == ("localhost:8001", None)


def test_bench_compares_aggressive_k4_three_times_by_default():
    args = build_parser().parse_args(["bench", "--prompt", "p"])
    assert (args.mode, args.k, args.repeats, args.out_dir) == ("aggressive", 4, 3, None)
    assert request_inputs(args) == {
        api.PROMPT.name: "p",
        api.MODE.name: "aggressive",
        api.K.name: 4,
    }


def test_bench_accepts_its_documented_flags(tmp_path):
    args = build_parser().parse_args(
        ["bench", "--prompt", "p", "--url", "h:1", "--mode", "conservative", "--k", "2"]
        + ["--steps", "10", "--seed", "3", "--fanout", "batch", "--repeats", "5"]
        + ["--out-dir", str(tmp_path)]
    )
    assert (args.mode, args.k, args.steps, args.seed, args.fanout) == (
        "conservative",
        2,
        10,
        3,
        "batch",
    )
    assert (args.url, args.repeats, args.out_dir) == ("h:1", 5, tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--prompt", "p", "--mode", "sequential"],  # compared against itself
        ["bench", "--prompt", "p", "--repeats", "0"],
        ["generate", "--prompt", "p", "--out", "x.png", "--fanout", "threads"],
        ["generate", "--out", "x.png"],  # no prompt
    ],
)
def test_the_parser_rejects_invalid_flags(argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_help_renders_with_every_field_doc(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert all(f.doc.split(";")[0] in text for f in api.INPUTS if f.name not in ("mode", "k"))


def test_generate_without_a_server_exits_1_and_suggests_starting_one(tmp_path, capsys):
    argv = ["generate", "--prompt", "p", "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--url", UNREACHABLE, "--wait", "0.5"]) == 1
    err = capsys.readouterr().err
    assert UNREACHABLE in err and "driffusion serve" in err
    assert not (tmp_path / "x.png").exists()


def test_generate_exits_2_on_a_value_the_client_cannot_send(tmp_path, capsys):
    argv = ["generate", "--prompt", "p", "--out", str(tmp_path / "x.png"), "--seed", str(2**64)]
    assert main([*argv, "--url", UNREACHABLE]) == 2
    assert "seed" in capsys.readouterr().err


def test_progress_off_a_tty_prints_a_start_and_an_end_line(capsys):
    with progress("generating"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0] == "generating ..." and lines[1].startswith("generating: done in ")


def test_progress_reports_a_failed_request(capsys):
    with pytest.raises(DriffusionError), progress("generating"):
        raise DriffusionError("boom")
    assert "generating: failed in " in capsys.readouterr().err
