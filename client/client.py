"""A gRPC client of the served ``driffusion`` model, plus image helpers for comparing its outputs.

Every input and output name and dtype comes from :mod:`driffusion.api`; none is typed here.
"""

from __future__ import annotations

import math
import numbers
import re
import time
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
    """The outputs of one request (named as in ``api.OUTPUTS``) and what the client saw."""

    image: np.ndarray  # (H, W, 3) uint8, RGB
    rounds: int  # serial denoiser rounds
    evaluations: int  # states evaluated
    text_ms: float  # server-side timings
    denoise_ms: float
    decode_ms: float
    host_ms: float  # the orchestrator's own time within denoise_ms
    latency_ms: float  # client-measured wall time of the request
    request: dict[str, Any] = field(default_factory=dict)  # the inputs sent, by name


def build_inputs(**params: Any) -> list[grpcclient.InferInput]:
    """One shape-[1] ``InferInput`` per input of ``api.INPUTS`` whose value is not None.

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
        tensor = grpcclient.InferInput(f.name, [1], f.dtype)
        tensor.set_data_from_numpy(_array(f, value))
        inputs.append(tensor)
    return inputs


def _array(f: api.Field, value: Any) -> np.ndarray:
    """``value`` as a shape-[1] array of ``f``'s dtype; BYTES as an object array of UTF-8 bytes."""
    if f.dtype == "BYTES":
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes):
            raise TypeError(f"{f.name} must be str or bytes, got {type(value).__name__}")
        return np.array([value], dtype=api.NUMPY_DTYPES[f.dtype])
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
        timeout_s: float | None = None,
    ) -> GenerateResult:
        """Generate one image; inputs left None are not sent (the server's defaults apply).

        ``timeout_s`` bounds the whole request (none by default). Raises :class:`DriffusionError`.
        """
        arguments = locals()  # the keyword names are the input names (a unit test checks it)
        request = {name: arguments[name] for name in _FIELDS if arguments[name] is not None}
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
        values = {}
        for f in api.OUTPUTS:
            array = response.as_numpy(f.name)
            if array is None:
                raise DriffusionError(f"the response of {self.model!r} lacks output {f.name!r}")
            values[f.name] = array if f.dims != (1,) else array.reshape(-1)[0].item()
        return GenerateResult(**values, latency_ms=latency_ms, request=request)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DriffusionClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
