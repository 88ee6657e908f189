"""The served product end to end: a real tritonserver on the tiny pipeline's repository, spoken to
over real gRPC by the driffusion client. No part of Triton is mocked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from driffusion import count_rounds
from driffusion.client import DriffusionClient, DriffusionError, psnr
from driffusion.model_repository.server import (
    metric_sum,
)

STEPS = 20  # enough rounds to tell the modes apart, quick on 2 cores


@pytest.fixture(scope="module")
def server(tiny_repository, start_triton_server):
    return start_triton_server(tiny_repository)


@pytest.fixture(scope="module")
def client(server):
    with DriffusionClient(server.grpc_url) as c:
        c.wait_ready(timeout_s=60)
        yield c


@pytest.fixture(scope="module")
def sequential(client):
    return client.generate("a blue circle", steps=STEPS, seed=11, mode="sequential")


def test_the_image_comes_back_as_height_width_rgb_uint8(sequential):
    assert sequential.image.shape == (64, 64, 3) and sequential.image.dtype == np.uint8
    assert sequential.rounds == sequential.evaluations == STEPS
    assert min(sequential.text_ms, sequential.denoise_ms, sequential.decode_ms) > 0


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_k1_is_bit_identical_to_sequential(client, sequential, mode):
    out = client.generate("a blue circle", steps=STEPS, seed=11, mode=mode, k=1)
    assert np.array_equal(out.image, sequential.image)
    assert out.rounds == STEPS


@pytest.mark.parametrize(("mode", "k"), [("aggressive", 4), ("conservative", 4), ("aggressive", 3)])
def test_drafts_stay_close_to_sequential_in_the_rounds_of_the_formula(client, sequential, mode, k):
    out = client.generate("a blue circle", steps=STEPS, seed=11, mode=mode, k=k)
    assert (out.rounds, out.evaluations) == count_rounds(STEPS, mode, k)
    # measured on the tiny random pipeline: 45-60 dB; 35 dB leaves room for other seeds
    assert psnr(out.image, sequential.image) > 35


def test_fanout_and_batch_give_the_same_image(client):
    fan = client.generate("a green bar", steps=STEPS, seed=5, k=4, fanout="instances")
    batch = client.generate("a green bar", steps=STEPS, seed=5, k=4, fanout="batch")
    # ONNX Runtime's batched kernels round differently from batch-of-2 ones: allow 1 level.
    assert np.abs(fan.image.astype(int) - batch.image).max() <= 1
    assert fan.rounds == batch.rounds


def test_the_tapered_k_schedule_takes_fewer_rounds(client):
    fixed = client.generate("a dot", steps=50, seed=1, k=5)
    tapered = client.generate("a dot", steps=50, seed=1, k=5, k_schedule="tapered")
    assert tapered.rounds == count_rounds(50, "aggressive", 5)[0] + 1  # k=4 for the last 40%
    assert tapered.rounds > fixed.rounds


def test_the_ramp_k_schedule_runs_the_blocks_it_names(client):
    from driffusion import tapered

    ramp = client.generate("a dot", steps=50, seed=1, k=4, k_schedule="ramp")
    assert ramp.rounds == count_rounds(50, "aggressive", tapered(3, 6, switch=0.2))[0] == 12


BAD_INPUTS = [  # (inputs, text the INVALID_ARG message must contain)
    ({"steps": 0}, "steps must be in [1, 999], got 0"),  # DDIM, steps_offset=1: 999 at most
    ({"steps": 1000}, "steps must be in [1, 999], got 1000"),
    ({"k": 0}, "k must be in [1, 8 = min(steps=20, max_k=8)], got 0"),
    ({"k": 9}, "k must be in [1, 8 = min(steps=20, max_k=8)], got 9"),
    ({"k": 3, "steps": 2}, "k must be in [1, 2 = min(steps=2, max_k=8)], got 3"),
    ({"mode": "fast"}, "mode must be one of sequential, aggressive, conservative, got 'fast'"),
    ({"fanout": "gpus"}, "fanout must be one of instances, batch, got 'gpus'"),
    ({"k_schedule": "x"}, "k_schedule must be one of fixed, tapered, ramp, got 'x'"),
    ({"k": 7, "k_schedule": "ramp"}, "k must be in [1, 6] with k_schedule=ramp"),
    ({"height": 60}, "height must be a multiple of 16 in [16, 80], got 60"),
    ({"width": 4096}, "width must be in [16, 80], got 4096"),
    ({"guidance_scale": -1.0}, "guidance_scale must be in [0, 50.0], got -1.0"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be in [0, 50.0], got nan"),
    ({"seed": -5}, "seed must be in [0, 9223372036854775807], got -5"),
    ({"prompt": "   "}, "prompt must not be empty"),
    ({"prompt": "word " * 100}, "tokens for text_encoder; at most 75 allowed"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_gets_invalid_argument_naming_the_field(client, fields, message):
    params = {"prompt": "ok", "steps": STEPS, **fields}
    with pytest.raises(DriffusionError) as err:
        client.generate(params.pop("prompt"), **params)
    assert err.value.is_invalid_argument
    assert message in str(err.value)


def raw_infer(server, inputs):
    """Send hand-made tensors (what a broken client would), bypassing DriffusionClient."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    tensors = []
    for name, array, dtype in inputs:
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return c.infer("driffusion", tensors)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([("steps", np.array([20], np.int32), "INT32")], "prompt"),  # the required input missing
        (
            [
                ("prompt", np.array([b"a"], object), "BYTES"),
                ("steps", np.array([2.0], np.float32), "FP32"),
            ],
            "steps",
        ),  # wrong dtype
        ([("prompt", np.array([b"a", b"b"], object), "BYTES")], "prompt"),  # wrong shape
    ],
    ids=["missing prompt", "wrong dtype", "wrong shape"],
)
def test_malformed_tensors_are_rejected_and_the_server_serves_on(server, client, inputs, message):
    with pytest.raises(Exception) as err:
        raw_infer(server, inputs)
    assert "INVALID_ARG" in str(err.value) and message in str(err.value)
    assert client.generate("still fine", steps=2).image.shape == (64, 64, 3)


def test_after_bad_requests_the_next_valid_request_succeeds(client, sequential):
    with pytest.raises(DriffusionError):
        client.generate("x", steps=0)
    again = client.generate("a blue circle", steps=STEPS, seed=11, mode="sequential")
    assert np.array_equal(again.image, sequential.image)


def test_prometheus_counts_requests_rounds_steps_and_outcomes(server, client):
    before = server.metrics()
    results = [client.generate("a cat", steps=STEPS, seed=s, mode="aggressive") for s in (1, 2)]
    with pytest.raises(DriffusionError):
        client.generate("x", steps=0)
    after = server.metrics()

    def delta(name, **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    rounds, evaluations = count_rounds(STEPS, "aggressive", 4)
    assert [r.rounds for r in results] == [rounds, rounds]
    assert delta("driffusion_requests_total", mode="aggressive", outcome="success") == 2
    assert delta("driffusion_requests_total", outcome="invalid_argument") == 1
    assert delta("driffusion_steps_total", mode="aggressive") == 2 * STEPS
    assert delta("driffusion_rounds_total", mode="aggressive") == 2 * rounds
    assert delta("driffusion_evaluations_total", mode="aggressive") == 2 * evaluations
    assert delta("driffusion_request_duration_seconds_count", mode="aggressive") == 2
    assert delta("driffusion_request_duration_seconds_sum", mode="aggressive") > 0
    assert metric_sum(after, "nv_inference_request_success", model="driffusion") > 0  # Triton's own


def test_four_concurrent_clients_all_succeed_with_their_own_images(server):
    """Four clients at once, one per orchestrator instance. (How much they overlap is measured
    by benchmarks/bench_load.py; a test on a shared 2-core machine asserts no timing.)"""

    def one(seed):
        with DriffusionClient(server.grpc_url) as c:
            return c.generate("a cat", steps=4, seed=seed, mode="sequential")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(r.image.shape == (64, 64, 3) for r in results)
    assert len({r.image.tobytes() for r in results}) == 4  # four different seeds, four images
