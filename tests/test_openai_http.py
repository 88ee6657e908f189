"""``driffusion http`` called as an application would: the official ``openai`` SDK against the real
command in a subprocess, in front of a real ``driffusion serve`` of the tiny pipeline (one server
for the module). Also curl-free raw HTTP (urllib) for what the SDK never sends: no key, a body past
the limit. Unit tests of the translation need no server.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai SDK is in the dev extra")

from PIL import Image  # noqa: E402

from driffusion.client import DriffusionClient, DriffusionError  # noqa: E402
from driffusion.client import openai_http as oh  # noqa: E402
from driffusion.model_repository.build import RepositorySettings, build_repository  # noqa: E402
from driffusion.model_repository.server import find_free_ports  # noqa: E402

KEY = "sk-test-0123456789abcdef"
OTHER_KEY = "sk-second-key"
MODEL = "driffusion"
FAST = {"steps": 2, "k": 2}  # the tiny model at 64x64, two steps: a request takes milliseconds


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "driffusion.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


class Process:
    """A ``driffusion`` command in its own session, its output collected, stopped by SIGTERM."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.lines: list[str] = []
        self.process = run_cli(*args, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        start = time.monotonic()
        while not condition():
            if self.process.poll() is not None or time.monotonic() - start > timeout_s:
                tail = "\n".join(self.lines[-30:])
                raise AssertionError(f"{what} not within {timeout_s} s; it said:\n{tail}")
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None):
    """(status, JSON body) of a raw HTTP call."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Http(Process):
    """``driffusion http`` on a free port."""

    def __init__(self, triton_url: str, *flags: str, env: dict[str, str] | None = None):
        (self.port,) = find_free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            "http", "--triton-url", triton_url, "--port", str(self.port), *flags, env=env
        )
        self.wait_for(self.up, 60, "driffusion http listening")

    def up(self) -> bool:
        try:
            get(f"{self.url}/health")
            return True
        except OSError:
            return False

    def sdk(self, api_key: str = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs
        )


@pytest.fixture(scope="module")
def repository(tiny_pipeline_dir, tmp_path_factory):
    settings = RepositorySettings(denoiser_instances=2, orchestrator_instances=2, max_k=4)
    out = tmp_path_factory.mktemp("openai") / "repo"
    return build_repository(tiny_pipeline_dir, out, settings, progress=None)


@pytest.fixture(scope="module")
def triton(repository):
    """``driffusion serve`` of the tiny pipeline; its gRPC url."""
    http, grpc, metrics = find_free_ports(3)
    serve = Process(
        "serve",
        "--repository",
        str(repository),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
    )
    url = f"127.0.0.1:{grpc}"
    try:
        with DriffusionClient(url) as c:
            serve.wait_for(lambda: c._readiness(2.0)[0] is None, 180, "driffusion serve ready")
        yield url
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def grpc(triton):
    with DriffusionClient(triton) as c:
        yield c


@pytest.fixture(scope="module")
def front(triton):
    """``driffusion http`` with two keys: one on the command line, one from the environment."""
    env = dict(os.environ, **{oh.API_KEYS_ENV: f" {OTHER_KEY} ,"})
    door = Http(triton, "--api-key", KEY, env=env)
    yield door
    assert door.stop() == 0, "\n".join(door.lines[-20:])


@pytest.fixture(scope="module")
def sdk(front):
    with front.sdk() as client:
        yield client


def generate(sdk, prompt: str = "a blue circle", *, n: int = 1, size: str = "64x64", **extra):
    return sdk.images.generate(
        model=MODEL,
        prompt=prompt,
        n=n,
        size=size,
        response_format="b64_json",
        extra_body={**FAST, **extra},
    )


def decode(item) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


# --- through the SDK -----------------------------------------------------------------------------


def test_the_sdk_gets_pngs_of_the_asked_size_equal_to_the_grpc_image(sdk, grpc):
    response = generate(sdk, size="64x64", seed=3, mode="sequential")
    assert abs(response.created - time.time()) < 120
    (item,) = response.data
    image = decode(item)
    assert image.shape == (64, 64, 3)
    direct = grpc.generate("a blue circle", seed=3, mode="sequential", **FAST)
    np.testing.assert_array_equal(image, direct.image)  # a translator: the same image, lossless
    assert response.driffusion["seeds"] == [3] and response.driffusion["requests"] == 1


def test_size_is_width_by_height(sdk):
    (item,) = generate(sdk, size="64x32", seed=1).data
    assert decode(item).shape == (32, 64, 3)


def test_n_images_equal_the_single_image_requests_of_seeds_seed_to_seed_plus_n_minus_1(sdk):
    response = generate(sdk, n=3, seed=5, negative_prompt="noise", guidance_scale=2.0)
    images = [decode(item) for item in response.data]
    assert len(images) == 3 and response.driffusion["seeds"] == [5, 6, 7]
    # n requests (no num_images on the server): the very images; one batched request: rows of
    # the same denoiser calls, within one uint8 level (equal on this CPU when last measured)
    bound = 1 if response.driffusion["batched"] else 0
    for i, image in enumerate(images):
        (single,) = generate(sdk, seed=5 + i, negative_prompt="noise", guidance_scale=2.0).data
        assert np.abs(image.astype(int) - decode(single).astype(int)).max() <= bound
    assert not np.array_equal(images[0], images[1])


def test_n_images_without_a_seed_start_at_the_servers_default_seed(sdk):
    first, second = (decode(item) for item in generate(sdk, n=2).data)
    np.testing.assert_array_equal(first, decode(generate(sdk).data[0]))  # no seed sent: default
    np.testing.assert_array_equal(second, decode(generate(sdk, seed=oh.DEFAULT_SEED + 1).data[0]))


def test_num_images_is_used_exactly_when_the_server_lists_it(sdk, triton):
    backend = oh.Backend(oh.HttpSettings(triton_url=triton))
    inputs = backend.inputs()
    backend.close()
    response = generate(sdk, n=2, seed=9)
    batched = oh.NUM_IMAGES in inputs and oh.CLIENT_SENDS_NUM_IMAGES
    assert response.driffusion["batched"] is batched
    assert response.driffusion["requests"] == (1 if batched else 2)


def test_num_images_and_n_requests_give_the_same_images(triton):
    backend = oh.Backend(oh.HttpSettings(triton_url=triton))
    if not backend.batches():
        pytest.skip("the served model has no num_images input (or the client cannot send it)")
    fallback = oh.Backend(oh.HttpSettings(triton_url=triton, use_num_images=False))
    t = oh.translate({"prompt": "a dot", "n": 3, "seed": 2, "steps": 2}, fallback.settings)
    deadline = time.monotonic() + 120
    one, many = backend.generate(t, deadline), fallback.generate(t, deadline)
    backend.close(), fallback.close()
    assert one.batched and not many.batched and one.seeds == many.seeds == [2, 3, 4]
    for a, b in zip(one.images, many.images, strict=True):
        # the bound the server states for batched rows (README, num_images)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_wrong_key_gets_401_in_openais_shape(front):
    with front.sdk(api_key="sk-wrong") as bad, pytest.raises(openai.AuthenticationError) as e:
        generate(bad)
    assert e.value.status_code == 401
    assert e.value.body["code"] == "invalid_api_key"
    assert set(e.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with front.sdk(api_key="sk-wrong") as bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_a_missing_key_gets_401_and_every_configured_key_works(front):
    body = json.dumps({"prompt": "x", **FAST}).encode()
    status, answer = get(f"{front.url}/v1/images/generations", data=body)
    assert status == 401 and "API key" in answer["error"]["message"]
    status, _ = get(f"{front.url}/v1/models")
    assert status == 401
    with front.sdk(api_key=OTHER_KEY) as other:  # the key from $DRIFFUSION_API_KEYS
        assert len(generate(other).data) == 1
    assert not any(KEY in line or OTHER_KEY in line for line in front.lines)


@pytest.mark.parametrize(
    ("size", "words"),
    [
        ("65x64", "size '65x64': width must be a multiple of"),  # the server's message
        ("64x96", "size '64x96': height must be"),  # past the tiny model's 80
        ("64", "size must be 'WIDTHxHEIGHT'"),  # the translation's own
        ("64x64x3", "size must be 'WIDTHxHEIGHT'"),
    ],
)
def test_a_bad_size_gets_400_naming_size(sdk, size, words):
    with pytest.raises(openai.BadRequestError) as e:
        generate(sdk, size=size)
    assert e.value.status_code == 400 and words in e.value.body["message"]
    assert e.value.param == "size" and e.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    "fields",
    [{"steps": 0}, {"k": 9}, {"mode": "fast"}, {"guidance_scale": -1.0}, {"seed": -1}],
    ids=lambda f: next(iter(f)),
)
def test_a_bad_field_gets_400_with_the_servers_message(sdk, grpc, fields):
    with pytest.raises(DriffusionError) as direct:
        grpc.generate("a blue circle", **{**FAST, **fields})
    assert direct.value.is_invalid_argument
    with pytest.raises(openai.BadRequestError) as e:
        generate(sdk, **fields)
    assert e.value.body["message"] == str(direct.value)
    assert e.value.param == next(iter(fields))


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        (dict(response_format="url"), "response_format", "use response_format='b64_json'"),
        (dict(n=0), "n", "n must be an integer in [1, 4]"),
        (dict(n=5), "n", "n must be an integer in [1, 4]"),
        (dict(prompt=""), "prompt", "prompt must not be empty"),  # the server's
        (dict(extra_body={"steps": "two"}), "steps", "steps must be Integral"),  # the client's
        (dict(extra_body={"stepz": 2}), "stepz", "Unrecognized request argument"),
        (dict(extra_body={"output_format": "jpeg"}), "output_format", "PNG"),
    ],
    ids=["url", "n0", "n5", "empty-prompt", "steps-type", "unknown", "jpeg"],
)
def test_what_the_translation_cannot_serve_gets_400_naming_the_field(sdk, kwargs, param, words):
    request = dict(model=MODEL, prompt="x", size="64x64", response_format="b64_json")
    request.update(kwargs)
    request["extra_body"] = {**FAST, **request.get("extra_body", {})}
    with pytest.raises(openai.BadRequestError) as e:
        sdk.images.generate(**request)
    assert words in e.value.body["message"] and e.value.param == param


def test_another_model_name_gets_404(sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.images.generate(model="dall-e-3", prompt="x", extra_body=FAST)
    assert e.value.body["code"] == "model_not_found"


def test_models_lists_the_served_model(sdk):
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    assert sdk.models.retrieve(MODEL).owned_by == oh.OWNED_BY
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-image-1")


def test_health_says_ready_without_a_key(front):
    assert get(f"{front.url}/health") == (200, {"status": "ready", "model": MODEL})


def test_a_declared_body_past_the_limit_gets_413_before_it_is_read(front):
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
    connection.putrequest("POST", "/v1/images/generations")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Content-Length", str(64 << 20))  # and not one byte of it is sent
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_bad_json_gets_400_and_an_unknown_path_404_in_openais_shape(front):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, answer = get(f"{front.url}/v1/images/generations", headers, b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, answer = get(f"{front.url}/v1/images/generations", headers, b"[1, 2]")
    assert status == 400 and "JSON object" in answer["error"]["message"]
    status, answer = get(f"{front.url}/v1/nothing", headers)
    assert status == 404 and set(answer["error"]) == {"message", "type", "param", "code"}


# --- limits and an absent Triton ----------------------------------------------------------------


def test_unreachable_triton_gets_503_and_health_says_why(tmp_path):
    (dead,) = find_free_ports(1)
    door = Http(f"127.0.0.1:{dead}", "--max-queue", "0")
    try:
        status, body = get(f"{door.url}/health")
        assert status == 503 and body["status"] == "unavailable" and "unreachable" in body["reason"]
        with door.sdk(api_key="unused") as client:
            with pytest.raises(openai.InternalServerError) as e:
                generate(client)
            assert e.value.status_code == 503 and e.value.body["code"] == "triton_unavailable"
            with pytest.raises(openai.InternalServerError):
                client.models.list()
        assert any("authentication: none" in line for line in door.lines)
    finally:
        assert door.stop() == 0


def test_past_the_concurrency_limit_429_past_the_timeout_504_past_the_body_limit_413(triton):
    door = Http(
        triton, "--max-concurrency", "1", "--max-queue", "0", "--timeout", "1", "--max-body-kb", "2"
    )
    try:
        slow: dict = {}

        def run_slow():  # about 2.4 s on 2 cores: past the 1 s timeout
            with door.sdk(api_key="unused") as client:
                try:
                    generate(client, steps=999, mode="sequential", k=1)
                except openai.APIStatusError as e:
                    slow["error"] = e

        thread = threading.Thread(target=run_slow)
        thread.start()
        time.sleep(0.25)  # the slow request holds the only slot
        refused = None
        with door.sdk(api_key="unused") as client:
            while thread.is_alive() and refused is None:
                try:
                    generate(client)
                except openai.RateLimitError as e:
                    refused = e
            thread.join()
            assert refused is not None and refused.status_code == 429
            assert refused.response.headers["retry-after"] == "1"
            assert slow["error"].status_code == 504 and slow["error"].body["code"] == "timeout"
            assert len(generate(client).data) == 1  # and the next request is served
            with pytest.raises(openai.APIStatusError) as e:
                generate(client, prompt="x" * 3000)
            assert e.value.status_code == 413 and "2048 bytes" in e.value.body["message"]
    finally:
        assert door.stop() == 0


# --- the translation and the door, without a server -----------------------------------------------


def test_translation_maps_openai_fields_and_passes_ours_through():
    settings = oh.HttpSettings()
    t = oh.translate(
        {"prompt": "p", "n": 2, "size": "96x64", "user": "u", "quality": "hd", "seed": 4, "k": 3},
        settings,
    )
    assert t.request == {"prompt": "p", "width": 96, "height": 64, "seed": 4, "k": 3}
    assert t.n == 2 and t.size == "96x64"
    assert oh.translate({"prompt": "p", "size": "auto", "seed": None}, settings).request == {
        "prompt": "p"
    }
    with pytest.raises(oh.ApiError, match="seed must be an integer"):
        oh.translate({"prompt": "p", "n": 2, "seed": "4"}, settings)


def test_every_scalar_input_of_the_served_api_is_a_field_of_ours():
    sendable = set(oh._GENERATE_PARAMETERS)
    expected = {f.name for f in oh.api.INPUTS if f.dims == (1,) and f.name in sendable}
    assert set(oh.EXTRA_FIELDS) == expected - {"prompt", "height", "width", oh.NUM_IMAGES} - {
        "strength",
        "preview",
    }


def test_keys_come_from_flags_and_the_environment():
    env = {oh.API_KEYS_ENV: "a, b,,a"}
    assert oh.api_keys_from(["c", " a "], env) == ("c", "a", "b")
    assert oh.api_keys_from([], {}) == ()


def test_the_gate_queues_then_refuses():
    import asyncio

    async def scenario():
        gate = oh.Gate(limit=1, queue=1)
        settings = oh.HttpSettings(timeout_s=5)
        far = time.monotonic() + 5
        order = []

        async def hold(name, seconds):
            async with gate.slot(far, settings):
                order.append(name)
                await asyncio.sleep(seconds)

        first = asyncio.create_task(hold("first", 0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(hold("second", 0))  # queued
        await asyncio.sleep(0.01)
        with pytest.raises(oh.ApiError) as e:
            await hold("third", 0)  # the queue is full
        assert e.value.status == 429
        await asyncio.gather(first, second)
        assert order == ["first", "second"]
        gate2 = oh.Gate(limit=1, queue=4)
        blocker = asyncio.create_task(hold_on(gate2, settings))
        await asyncio.sleep(0.01)
        with pytest.raises(oh.ApiError) as e:
            async with gate2.slot(time.monotonic() + 0.05, settings):
                pass
        assert e.value.status == 504
        await blocker

    async def hold_on(gate, settings):
        async with gate.slot(time.monotonic() + 5, settings):
            await asyncio.sleep(0.2)

    asyncio.run(scenario())


def test_the_docs_document_the_command_and_its_fields():
    section = (Path(__file__).resolve().parent.parent / "docs" / "http.md").read_text()
    for name in (*oh.EXTRA_FIELDS, "--api-key", oh.API_KEYS_ENV, "--max-concurrency", "429"):
        assert name in section, name
