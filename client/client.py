"""A gRPC client of the served ``driffusion`` model, plus image helpers for comparing its outputs.

Every input and output name and dtype comes from :mod:`driffusion.api`; none is typed here.
"""

from __future__ import annotations

import math
import numbers
import queue
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from driffusion import api

_FIELDS = {f.name: f for f in api.INPUTS}
INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"  # a gRPC status as tritonclient spells it
DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
UNAVAILABLE = "StatusCode.UNAVAILABLE"
# Triton's python backend answers a request routed to a dead worker with this (and nothing ran).
UNHEALTHY = re.compile(r"Stub process '[^']*' is not healthy")
UNHEALTHY_RETRIES = 3
STREAM_MODEL = "driffusion_stream"  # the decoupled twin of the served model


class DriffusionError(RuntimeError):
    """A failed request: the server's message, and Triton's status in ``.status``."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status  # e.g. "StatusCode.INVALID_ARGUMENT"; None when not from the server

    @property
    def is_invalid_argument(self) -> bool:
        """True when the server rejected the request's inputs (Triton's INVALID_ARG)."""
        return self.status == INVALID_ARGUMENT


@dataclass
class GenerateResult:
    """The outputs of one request and what the client saw. ``images`` is the model's ``image``
    output: (num_images, H, W, 3) uint8 RGB, whatever num_images is."""

    images: np.ndarray  # (n, H, W, 3) uint8, RGB
    rounds: int  # serial denoiser rounds
    evaluations: int  # states evaluated
    text_ms: float  # server-side timings
    denoise_ms: float
    decode_ms: float
    host_ms: float  # the orchestrator's own time within denoise_ms
    latency_ms: float  # client-measured wall time of the request
    request: dict[str, Any] = field(default_factory=dict)  # the inputs sent, by name

    @property
    def image(self) -> np.ndarray:
        """The first image, (H, W, 3)."""
        return self.images[0]


@dataclass(frozen=True)
class Progress:
    """One streamed progress response (``driffusion_stream``)."""

    round: int  # 1-based
    rounds: int
    steps_done: int
    elapsed_ms: float  # since the server received the request
    preview: np.ndarray | None  # (n, h, w, 3) uint8 when previews were asked for


def build_inputs(**params: Any) -> list[grpcclient.InferInput]:
    """One ``InferInput`` per input of ``api.INPUTS`` whose value is not None: shape [1] for the
    scalars, (H, W, 3) for ``image`` (a uint8 RGB array or a PIL image).

    Keys are input names; values are Python scalars (``str`` or ``bytes`` for BYTES inputs).
    Raises ``ValueError`` for an unknown name and ``TypeError`` for a value of the wrong kind.
    """
    unknown = sorted(set(params) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown input(s) {unknown}; inputs are {list(_FIELDS)}")
    inputs = []
    for f in api.INPUTS:  # in the API's order
        value = params.get(f.name)
        if value is None:
            continue
        array = _image(value) if f is api.INIT_IMAGE else _array(f, value)
        tensor = grpcclient.InferInput(f.name, list(array.shape), f.dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _image(value: Any) -> np.ndarray:
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("RGB"))
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 3:
        raise TypeError("image must be an (H, W, 3) uint8 RGB array or a PIL image")
    return np.ascontiguousarray(value)


def _array(f: api.Field, value: Any) -> np.ndarray:
    """``value`` as a shape-[1] array of ``f``'s dtype; BYTES as an object array of UTF-8 bytes."""
    if f.dtype == "BYTES":
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes):
            raise TypeError(f"{f.name} must be str or bytes, got {type(value).__name__}")
        return np.array([value], dtype=api.NUMPY_DTYPES[f.dtype])
    if f.dtype == "BOOL":
        if not isinstance(value, bool):
            raise TypeError(f"{f.name} must be bool, got {value!r}")
        return np.array([value], dtype=np.bool_)
    kind = numbers.Integral if f.dtype.startswith(("INT", "UINT")) else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{f.name} must be {kind.__name__} ({f.dtype}), got {value!r}")
    dtype = api.NUMPY_DTYPES[f.dtype]
    if kind is numbers.Integral:
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ValueError(f"{f.name}={value} does not fit {f.dtype} [{info.min}, {info.max}]")
    return np.array([value], dtype=dtype)


class DriffusionClient:
    """Requests to the ``driffusion`` model of a Triton server over gRPC."""

    def __init__(
        self, url: str = "localhost:8001", model: str = "driffusion", verbose: bool = False
    ) -> None:
        self.url, self.model = url, model
        self._client = grpcclient.InferenceServerClient(url=url, verbose=verbose)

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Poll until the server is live and ready and the model is ready.

        Raises :class:`DriffusionError` naming the url and the last state seen after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            state, status = self._readiness(max(min(remaining, 2.0), 0.1))
            if state is None:
                return
            if remaining <= 0:
                raise DriffusionError(
                    f"Triton server at {self.url} not ready after {timeout_s:g} s: {state}",
                    status=status,
                )
            time.sleep(min(0.25, max(remaining, 0.0)))

    def _readiness(self, call_timeout_s: float) -> tuple[str | None, str | None]:
        """(None, None) when ready, else (what is not ready, gRPC status if a call failed)."""
        try:
            if not self._client.is_server_live(client_timeout=call_timeout_s):
                return "server not live", None
            if not self._client.is_server_ready(client_timeout=call_timeout_s):
                return "server live but not ready", None
            if not self._client.is_model_ready(self.model, client_timeout=call_timeout_s):
                return f"model {self.model!r} not ready", None
        except InferenceServerException as e:
            what = "not reachable" if e.status() in (UNAVAILABLE, DEADLINE_EXCEEDED) else "error"
            return f"{what} ({e.message()})", e.status()
        return None, None

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        mode: str | None = None,
        k: int | None = None,
        k_schedule: str | None = None,
        height: int | None = None,
        width: int | None = None,
        fanout: str | None = None,
        num_images: int | None = None,
        scheduler: str | None = None,
        image: np.ndarray | Image.Image | None = None,
        strength: float | None = None,
        preview: bool | None = None,
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """Generate ``num_images`` images (default 1); inputs left None are not sent (the
        server's defaults apply). ``image`` and ``strength``: img2img.

        ``timeout_s`` bounds the whole request (none by default). Raises :class:`DriffusionError`.
        """
        arguments = locals()  # the keyword names are the input names (a unit test checks it)
        request = {name: arguments[name] for name in _FIELDS if arguments[name] is not None}
        request.pop(api.PREVIEW.name, None)  # the plain model has nothing to preview
        inputs = build_inputs(**request)
        outputs = [grpcclient.InferRequestedOutput(f.name) for f in api.OUTPUTS]
        start = time.perf_counter()
        for attempt in range(UNHEALTHY_RETRIES + 1):
            left = None if timeout_s is None else timeout_s - (time.perf_counter() - start)
            try:
                response = self._client.infer(
                    self.model, inputs, outputs=outputs, client_timeout=left
                )
                break
            except InferenceServerException as e:
                message = e.message() or str(e)
                # A request that reached a dead worker did no work: the server replaces the
                # worker within seconds and another instance can take the request.
                if attempt < UNHEALTHY_RETRIES and UNHEALTHY.search(message):
                    continue
                if e.status() == DEADLINE_EXCEEDED:
                    message = f"no response within timeout_s={timeout_s:g} s ({message})"
                raise DriffusionError(message, status=e.status()) from e
        latency_ms = (time.perf_counter() - start) * 1e3
        return _result(response, self.model, latency_ms, request)

    def stream(
        self,
        prompt: str,
        *,
        on_progress: Callable[[Progress], object] | None = None,
        timeout_s: float | None = None,
        **fields: Any,
    ) -> GenerateResult:
        """``generate`` through the streaming model (``driffusion_stream``, gRPC streaming):
        ``on_progress`` gets a :class:`Progress` after every round (``preview=True`` adds a
        preview image of the current prediction to each); returns the final result."""
        request = {"prompt": prompt, **{n: v for n, v in fields.items() if v is not None}}
        inputs = build_inputs(**request)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(url=self.url)
        start = time.perf_counter()
        try:
            client.start_stream(
                callback=lambda result, error: responses.put((result, error)),
                stream_timeout=timeout_s,
            )
            client.async_stream_infer(STREAM_MODEL, inputs, enable_empty_final_response=True)
            final = None
            while True:
                result, error = responses.get(timeout=timeout_s)
                if error is not None:
                    raise DriffusionError(error.message() or str(error), status=error.status())
                response = result.get_response()
                if response.outputs and result.as_numpy(api.IMAGE.name) is not None:
                    final = result
                elif response.outputs and on_progress is not None:
                    on_progress(_progress(result))
                if response.parameters["triton_final_response"].bool_param:
                    break
        except queue.Empty:
            raise DriffusionError(f"no response within timeout_s={timeout_s:g} s") from None
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
        if final is None:
            raise DriffusionError(f"the stream of {STREAM_MODEL!r} ended without the images")
        latency_ms = (time.perf_counter() - start) * 1e3
        return _result(final, STREAM_MODEL, latency_ms, request)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DriffusionClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _result(response, model: str, latency_ms: float, request: dict) -> GenerateResult:
    values = {}
    for f in api.OUTPUTS:
        array = response.as_numpy(f.name)
        if array is None:
            raise DriffusionError(f"the response of {model!r} lacks output {f.name!r}")
        values[f.name] = array if f.dims != (1,) else array.reshape(-1)[0].item()
    values["images"] = values.pop(api.IMAGE.name)
    return GenerateResult(**values, latency_ms=latency_ms, request=request)


def _progress(result) -> Progress:
    def scalar(f):
        return result.as_numpy(f.name).reshape(-1)[0].item()

    return Progress(
        round=scalar(api.ROUND),
        rounds=scalar(api.ROUNDS),
        steps_done=scalar(api.STEPS_DONE),
        elapsed_ms=scalar(api.ELAPSED_MS),
        preview=result.as_numpy(api.PREVIEW_IMAGE.name),
    )


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB image as PNG; returns the path."""
    _check_image(image)
    path = Path(path)
    Image.fromarray(image).save(path, format="PNG")  # (H, W, 3) uint8 is RGB
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (``inf`` when they are equal)."""
    _check_pair(a, b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest absolute difference between two uint8 images, in 0..255."""
    _check_pair(a, b)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max(initial=0))


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.shape != b.shape:
        raise ValueError(
            f"need two uint8 images of one shape, got {a.shape} {a.dtype} and {b.shape} {b.dtype}"
        )
