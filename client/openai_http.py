"""``driffusion http``: OpenAI's Images API (``POST /v1/images/generations``) in front of Triton.

A thin translator onto the gRPC API of the served ``driffusion`` model: every image is made by
:meth:`DriffusionClient.generate` and every field is validated by the server (its
``INVALID_ARGUMENT`` message becomes the 400's message). This module only checks what the
translation itself needs (the JSON body, ``n``, ``size``, ``response_format``, ``model``), encodes
PNGs, and guards the door: Bearer keys, body size, concurrency and a per-request timeout.

Routes: ``POST /v1/images/generations``, ``GET /v1/models``, ``GET /v1/models/{id}`` (with a key
when keys are configured) and ``GET /health`` (open: for load balancers). Errors have OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.

``n`` images: when the server's model metadata lists the ``num_images`` input (and the installed
client can send it), one request carries all n; otherwise n requests are sent one after the other
with seeds ``seed, seed+1, ..., seed+n-1``: the images the server's ``num_images`` defines.

One ASGI stack: Starlette on uvicorn (the ``server`` extra).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import inspect
import io
import json
import logging
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tritonclient.utils import InferenceServerException

from driffusion import api

from .client import (
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    UNAVAILABLE,
    DriffusionClient,
    DriffusionError,
)

log = logging.getLogger("driffusion.http")

API_KEYS_ENV = "DRIFFUSION_API_KEYS"  # comma-separated keys, so that they need not be in `ps`
DEFAULT_MODEL = "driffusion"
DEFAULT_SEED = 0  # the server's default seed (api.parse_request): image i of n is seed + i
NUM_IMAGES = api.NUM_IMAGES.name  # the input n maps to
MAX_SIDE_DIGITS = 5  # "WxH": anything longer is not a size (the server checks the range)
OWNED_BY = "driffusion"

# OpenAI's Images API fields: what each becomes here.
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
# OpenAI fields that ask for nothing we would do differently: accepted and ignored.
IGNORED_FIELDS = ("user", "safety_identifier", "moderation", "quality", "style")
# OpenAI fields accepted only at the value that describes what we return anyway (null: absent).
ONLY_VALUES = {
    "output_format": ("png",),
    "background": ("auto", "opaque"),
    "stream": (False,),
    "partial_images": (0,),
}
# Request inputs that the translation sets itself (prompt, size, n).
_TRANSLATED = {"prompt", "height", "width", NUM_IMAGES}
# Inputs not offered here: img2img's (an image belongs to OpenAI's /v1/images/edits, not served)
# and the streaming model's preview switch.
NOT_OVER_HTTP = {"image", "strength", "preview"}
_GENERATE_PARAMETERS = set(inspect.signature(DriffusionClient.generate).parameters)
# Our own fields: every one-element input of the served API that the client can send.
EXTRA_FIELDS = tuple(
    f.name
    for f in api.INPUTS
    if f.name not in _TRANSLATED | NOT_OVER_HTTP
    and f.dims == (1,)
    and f.name in _GENERATE_PARAMETERS
)
CLIENT_SENDS_NUM_IMAGES = NUM_IMAGES in _GENERATE_PARAMETERS
_PARAM_OF = {"height": "size", "width": "size", NUM_IMAGES: "n"}  # server input -> HTTP field
_FIELD_IN_MESSAGE = re.compile(r"^(\w+)")
_SIZE = re.compile(rf"(\d{{1,{MAX_SIDE_DIGITS}}})x(\d{{1,{MAX_SIDE_DIGITS}}})")


# --- settings and errors -----------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSettings:
    """What ``driffusion http`` serves and its limits (the CLI's flags)."""

    triton_url: str = "localhost:8001"
    model: str = DEFAULT_MODEL  # the Triton model, and the one OpenAI model name served
    api_keys: tuple[str, ...] = ()  # none: no authentication
    max_body_bytes: int = 1 << 20  # 413 beyond
    max_concurrency: int = 4  # requests sent to Triton at once
    max_queue: int = 64  # requests waiting for one of those slots; 429 beyond
    timeout_s: float = 300.0  # per request, queueing included; the rest is the gRPC deadline
    max_n: int = 4  # images per request (as serve's --max-images default)
    metadata_ttl_s: float = 10.0  # how long the model's input list is trusted
    use_num_images: bool = True  # n as one request where the server lists num_images

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_concurrency", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number, got {self.timeout_s}")
        if any(not key or key != key.strip() for key in self.api_keys):
            raise ValueError("API keys must be non-empty and without surrounding whitespace")


def api_keys_from(flags: Iterable[str] = (), environ: Mapping[str, str] | None = None):
    """The keys of ``--api-key`` flags and of ``$DRIFFUSION_API_KEYS`` (comma-separated)."""
    environ = os.environ if environ is None else environ
    keys = [*flags, *environ.get(API_KEYS_ENV, "").split(",")]
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, self.type, self.param, self.code, self.headers
        )


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- the translation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Translated:
    """An Images API request as the gRPC request of one image, and how many images."""

    request: dict[str, Any]  # DriffusionClient.generate's keyword arguments
    n: int
    size: str | None  # as asked ("WxH"), for messages


def translate(body: Any, settings: HttpSettings) -> Translated:
    """Map an Images API body onto the request of ``DriffusionClient.generate``.

    Checks only what the mapping needs; the server validates the values. Raises :class:`ApiError`.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    body = {name: value for name, value in body.items() if value is not None}  # null: absent
    known = set(OPENAI_FIELDS) | set(IGNORED_FIELDS) | set(ONLY_VALUES) | set(EXTRA_FIELDS)
    for name in body:
        if name not in known:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {api.echo(name)}; driffusion's own "
                f"fields are {', '.join(EXTRA_FIELDS)}",
                param=name,
            )
    for name, allowed in ONLY_VALUES.items():
        if name in body and not _one_of(body[name], allowed):
            may = " or ".join(map(json.dumps, allowed))
            raise ApiError(
                400,
                f"{name} {_short(body[name])} is not supported; driffusion http returns opaque "
                f"PNG images in one response ({name} may be {may})",
                param=name,
            )
    model = body.get("model")
    if model is not None and model != settings.model:
        raise ApiError(
            404,
            f"The model {_short(model)} does not exist; this server serves {settings.model!r}",
            param="model",
            code="model_not_found",
        )
    response_format = body.get("response_format", "b64_json")
    if response_format != "b64_json":
        why = (
            "driffusion http keeps no images to link to; it returns them inline"
            if response_format == "url"
            else "the only format is b64_json"
        )
        raise ApiError(
            400,
            f"response_format {_short(response_format)} is not supported: {why}; "
            "use response_format='b64_json'",
            param="response_format",
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(
            400,
            "prompt is required: a string" if prompt is None else "prompt must be a string",
            param="prompt",
        )
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= settings.max_n:
        raise ApiError(
            400, f"n must be an integer in [1, {settings.max_n}], got {_short(n)}", param="n"
        )
    seed = body.get("seed")
    if n > 1 and seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed must be an integer, got {_short(seed)}", param="seed")
    request: dict[str, Any] = {"prompt": prompt}
    size = body.get("size")
    if size is not None and size != "auto":
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise ApiError(
                400,
                f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or 'auto' (the model's "
                f"default), got {_short(size)}",
                param="size",
            )
        request["width"], request["height"] = int(match[1]), int(match[2])
    for name in EXTRA_FIELDS:
        if name in body:
            request[name] = body[name]
    return Translated(request=request, n=n, size=size if size != "auto" else None)


def _one_of(value: Any, allowed: tuple) -> bool:
    return any(type(value) is type(a) and value == a for a in allowed)


def _short(value: Any) -> str:
    """A value for an error message, cut short (never a large value echoed back)."""
    if isinstance(value, str):
        return api.echo(value)
    text = json.dumps(value)
    return text if len(text) <= api.ECHO_CHARS else f"{text[: api.ECHO_CHARS]}..."


def invalid(message: str, size: str | None) -> ApiError:
    """The 400 of a field the server (or the client's type check) refused: its message, with
    ``param`` the HTTP field it names (``size`` for height and width, ``n`` for num_images)."""
    match = _FIELD_IN_MESSAGE.match(message)
    name = match[1] if match else None
    inputs = {f.name for f in api.INPUTS} | {NUM_IMAGES}
    param = _PARAM_OF.get(name, name) if name in inputs else None
    if param == "size" and size is not None:
        message = f"size {size!r}: {message}"
    return ApiError(400, message, param=param)


# --- the backend: DriffusionClient (gRPC) ---------------------------------------------------------


@dataclass
class Generation:
    """The images of one HTTP request and what the server said about them."""

    images: list[np.ndarray]  # (H, W, 3) uint8 each
    seeds: list[int | None]  # the seed of each image (None: the server's default)
    rounds: list[int] = field(default_factory=list)  # per gRPC request
    evaluations: list[int] = field(default_factory=list)
    batched: bool = False  # one request with num_images, or n requests
    grpc_ms: float = 0.0


class Backend:
    """Requests to Triton through :class:`DriffusionClient`: one client per concurrent request
    (tritonclient's are not meant to be shared across threads), and the model's metadata."""

    def __init__(self, settings: HttpSettings):
        self.settings = settings
        self._idle: list[DriffusionClient] = []
        self._pool_lock = threading.Lock()
        self._meta_lock = threading.Lock()
        self._meta_client = grpcclient.InferenceServerClient(url=settings.triton_url)
        self._inputs: frozenset[str] | None = None
        self._inputs_at = -math.inf

    # metadata and health (a client of their own, one call at a time)

    def readiness(self, timeout_s: float = 2.0) -> str | None:
        """None when Triton and the model are ready, else why not."""
        url, model = self.settings.triton_url, self.settings.model
        with self._meta_lock:
            try:
                c = self._meta_client
                if not c.is_server_live(client_timeout=timeout_s):
                    return f"Triton at {url} is not live"
                if not c.is_server_ready(client_timeout=timeout_s):
                    return f"Triton at {url} is live but not ready"
                if not c.is_model_ready(model, client_timeout=timeout_s):
                    return f"model {model!r} is not ready on Triton at {url}"
            except InferenceServerException as e:
                what = "unreachable" if e.status() in (UNAVAILABLE, DEADLINE_EXCEEDED) else "error"
                return f"Triton at {url}: {what} ({e.message()})"
        return None

    def inputs(self, timeout_s: float = 2.0) -> frozenset[str]:
        """The served model's input names (cached ``metadata_ttl_s``); raises ApiError 503."""
        with self._meta_lock:
            if time.monotonic() - self._inputs_at < self.settings.metadata_ttl_s:
                return self._inputs
            try:
                meta = self._meta_client.get_model_metadata(
                    self.settings.model, as_json=True, client_timeout=timeout_s
                )
            except InferenceServerException as e:
                raise unavailable(self.settings, e.message(), e.status()) from e
            self._inputs = frozenset(i["name"] for i in meta.get("inputs", ()))
            self._inputs_at = time.monotonic()
            return self._inputs

    def batches(self) -> bool:
        """Whether n images go as one request (the server lists ``num_images``)."""
        if not (self.settings.use_num_images and CLIENT_SENDS_NUM_IMAGES):
            return False
        try:
            return NUM_IMAGES in self.inputs()
        except ApiError:  # metadata unreachable: n requests give the same images
            return False

    # generation (blocking: run in a worker thread)

    def generate(self, t: Translated, deadline: float) -> Generation:
        """The n images of ``t``; raises :class:`ApiError`."""
        client = self._checkout()
        try:
            if t.n > 1 and self.batches():
                return self._batched(client, t, deadline)
            return self._one_by_one(client, t, deadline)
        finally:
            self._checkin(client)

    def _batched(self, client: DriffusionClient, t: Translated, deadline: float) -> Generation:
        result = self._call(client, {**t.request, NUM_IMAGES: t.n}, t.size, deadline)
        images = getattr(result, "images", None)
        images = np.asarray(result.image if images is None else images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[0] != t.n:
            raise ApiError(502, f"asked for {t.n} images, the server sent {images.shape[0]}")
        base = t.request.get("seed", DEFAULT_SEED)
        return Generation(
            images=list(images),
            seeds=[base + i for i in range(t.n)],
            rounds=[result.rounds],
            evaluations=[result.evaluations],
            batched=True,
            grpc_ms=result.latency_ms,
        )

    def _one_by_one(self, client: DriffusionClient, t: Translated, deadline: float) -> Generation:
        out = Generation(images=[], seeds=[])
        seed = t.request.get("seed")
        if t.n > 1 and seed is None:
            seed = DEFAULT_SEED
        for i in range(t.n):
            request = dict(t.request)
            if seed is not None:
                request["seed"] = seed + i  # the client refuses one past INT64 (a 400)
            result = self._call(client, request, t.size, deadline)
            out.images.append(result.image)
            out.seeds.append(request.get("seed"))
            out.rounds.append(result.rounds)
            out.evaluations.append(result.evaluations)
            out.grpc_ms += result.latency_ms
        return out

    def _call(self, client: DriffusionClient, request: dict, size: str | None, deadline: float):
        left = deadline - time.monotonic()
        if left <= 0:
            raise timed_out(self.settings)
        try:
            return client.generate(**request, timeout_s=left)
        except (TypeError, ValueError) as e:  # a value the client cannot send as its dtype
            raise invalid(str(e), size) from None
        except DriffusionError as e:
            if e.status == INVALID_ARGUMENT:
                raise invalid(str(e), size) from None
            if e.status == DEADLINE_EXCEEDED:
                raise timed_out(self.settings) from None
            if e.status == UNAVAILABLE:
                raise unavailable(self.settings, str(e), e.status) from None
            log.error("request failed on Triton (%s): %s", e.status, e)
            raise ApiError(
                502,
                f"the request failed on the Triton server ({e.status or 'no status'}); "
                "see the server's log",
                type="server_error",
            ) from None

    def _checkout(self) -> DriffusionClient:
        with self._pool_lock:
            if self._idle:
                return self._idle.pop()
        return DriffusionClient(self.settings.triton_url, self.settings.model)

    def _checkin(self, client: DriffusionClient) -> None:
        with self._pool_lock:
            self._idle.append(client)

    def close(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()
        with self._meta_lock:
            self._meta_client.close()


def unavailable(settings: HttpSettings, message: str, status: str | None) -> ApiError:
    log.warning("Triton at %s unavailable (%s): %s", settings.triton_url, status, message)
    return ApiError(
        503,
        f"the Triton server at {settings.triton_url} is unavailable; try again later",
        type="server_error",
        code="triton_unavailable",
        headers={"Retry-After": "5"},
    )


def timed_out(settings: HttpSettings) -> ApiError:
    return ApiError(
        504,
        f"the request took longer than this server's timeout of {settings.timeout_s:g} s "
        "(queueing included)",
        type="server_error",
        code="timeout",
    )


# --- the door: keys, body size, concurrency ------------------------------------------------------


class Gate:
    """At most ``limit`` requests at Triton at once; up to ``queue`` more wait (FIFO) for a slot,
    within their own timeout; beyond that, 429 at once."""

    def __init__(self, limit: int, queue: int):
        self.limit, self.queue = limit, queue
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(limit)

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float, settings: HttpSettings):
        if self._slots.locked() and self.waiting >= self.queue:
            raise ApiError(
                429,
                f"too many requests: {self.limit} running and {self.waiting} waiting "
                f"(--max-concurrency {self.limit}, --max-queue {self.queue}); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            raise timed_out(settings) from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


def authorize(request: Request, keys: tuple[bytes, ...]) -> None:
    """Pass a request that carries one of ``keys`` as ``Authorization: Bearer KEY``; compared in
    constant time against every key. Raises ApiError 401."""
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
            headers=challenge,
        )
    given = token.strip().encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:  # no early exit: the time does not say which key came close
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key", headers=challenge)


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body, read at most ``limit`` bytes far (413 beyond; 400 when not JSON)."""
    too_large = ApiError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large"
    )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send plain JSON")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


# --- the application ------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> str:
    """An (H, W, 3) uint8 RGB image as base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(settings: HttpSettings, backend: Backend | None = None) -> Starlette:
    """The ASGI application of ``driffusion http``."""
    backend = backend or Backend(settings)
    keys = tuple(k.encode("utf-8", "surrogateescape") for k in settings.api_keys)
    started = int(time.time())
    gate: Gate | None = None
    threads = anyio.CapacityLimiter(settings.max_concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal gate
        gate = Gate(settings.max_concurrency, settings.max_queue)
        yield
        await anyio.to_thread.run_sync(backend.close)

    def model_card() -> dict:
        return {"id": settings.model, "object": "model", "created": started, "owned_by": OWNED_BY}

    def render(t: Translated, deadline: float) -> tuple[Generation, list[dict]]:
        out = backend.generate(t, deadline)  # PNGs encoded in the worker thread, off the loop
        return out, [{"b64_json": encode_png(image)} for image in out.images]

    async def generations(request: Request) -> JSONResponse:
        deadline = time.monotonic() + settings.timeout_s
        authorize(request, keys)
        t = translate(await read_json(request, settings.max_body_bytes), settings)
        async with gate.slot(deadline, settings):
            start = time.perf_counter()
            out, data = await anyio.to_thread.run_sync(render, t, deadline, limiter=threads)
            elapsed_ms = (time.perf_counter() - start) * 1e3
        height, width, _ = out.images[0].shape
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": data,
                "output_format": "png",
                "size": f"{width}x{height}",
                "driffusion": {  # ours; the SDK keeps it as an extra attribute
                    "seeds": out.seeds,
                    "rounds": out.rounds,
                    "evaluations": out.evaluations,
                    "requests": len(out.rounds),
                    "batched": out.batched,
                    "latency_ms": round(elapsed_ms, 3),
                },
            }
        )

    async def models(request: Request) -> JSONResponse:
        authorize(request, keys)
        await anyio.to_thread.run_sync(backend.inputs)  # 503 when Triton cannot say
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> JSONResponse:
        authorize(request, keys)
        name = request.path_params["name"]
        if name != settings.model:
            message = f"The model {_short(name)} does not exist"
            raise ApiError(404, message, param="model", code="model_not_found")
        await anyio.to_thread.run_sync(backend.inputs)
        return JSONResponse(model_card())

    async def health(request: Request) -> JSONResponse:
        reason = await anyio.to_thread.run_sync(backend.readiness)
        body = {"status": "ready" if reason is None else "unavailable", "model": settings.model}
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if reason is None else 503)

    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None, None)

    async def on_crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error in driffusion http", "server_error")

    return Starlette(
        routes=[
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, 500: on_crash},
        lifespan=lifespan,
    )


def serve_http(
    settings: HttpSettings,
    address: str = "127.0.0.1",
    port: int = 8080,
    *,
    log_level: str = "info",
    access_log: bool = True,
    grace_s: int = 30,
) -> int:
    """Run ``driffusion http`` with uvicorn until SIGINT or SIGTERM; 0 when stopped so, 1 when it
    could not start. Requests in flight get ``grace_s`` to finish."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    logging_config = json.loads(json.dumps(LOGGING_CONFIG))
    logging_config["loggers"]["driffusion.http"] = {
        "handlers": ["default"],
        "level": log_level.upper(),
        "propagate": False,
    }
    config = uvicorn.Config(
        create_app(settings),
        host=address,
        port=port,
        http="h11",
        loop="asyncio",
        lifespan="on",
        log_config=logging_config,
        log_level=log_level,
        access_log=access_log,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=grace_s,
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again to the handler
    # it found: a no-op one here, so that a requested stop exits 0 (as `driffusion serve` does).
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when it cannot start (e.g. the port is taken); it said why
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
