"""The ``driffusion`` BLS model: moves tensors between Triton and ``driffusion.service``.

All logic (validation, tokenization, DRiffusion rounds, guidance) is in the plain module
``driffusion.service``; this file only adapts requests, responses and model calls:

- a bad request gets INVALID_ARG with the field and the allowed range, a cancelled one CANCELLED,
  one past its deadline DEADLINE_EXCEEDED (Triton 2.51 has no such code: UNAVAILABLE with a
  message that says so), a failing model call INTERNAL naming the model; the model keeps serving;
- every model call asks Triton for its outputs in host memory (``preferred_memory``): a TensorRT
  or torch engine on a GPU produces device memory, on which ``as_numpy()`` raises; a tensor that
  still arrives on a device is taken through DLPack;
- model calls run on an executor of this instance's own, sized for the widest round plus
  headroom for hung calls (the stub's ``async_exec`` uses asyncio's default pool of
  ``min(32, CPUs + 4)`` threads, which capped a round at 6 calls in flight on 2 cores);
- driffusion's Prometheus metrics (``driffusion.metrics``) are registered at start, at zero;
- with a ``remote_denoisers`` config parameter (``driffusion serve --remote-denoisers``), the
  denoiser calls are routed over the local instances and those servers
  (``driffusion.model_repository.remote``), probed once at start.
"""

import asyncio
import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from driffusion import api, metrics, routing
from driffusion.service import (
    DeadlineExceeded,
    ModelCallError,
    Orchestrator,
    RequestCancelled,
    executor_threads,
)


class Metrics:
    """DRiffusion's Prometheus counters through Triton's custom metrics API."""

    def __init__(self):
        family = pb_utils.MetricFamily
        self._families = {
            m.name: family(m.name, m.help, getattr(family, m.kind)) for m in metrics.METRICS
        }
        self._series = {}
        for mode in api.MODES:  # every series exists from the start, at zero
            for outcome in metrics.OUTCOMES:
                self._metric(metrics.REQUESTS, mode=mode, outcome=outcome)
            for spec in (metrics.STEPS, metrics.ROUNDS, metrics.EVALUATIONS, metrics.DURATION):
                self._metric(spec, mode=mode)
        self._metric(metrics.REQUESTS, mode="unknown", outcome="invalid_argument")

    def _metric(self, spec, **labels):
        key = (spec.name, *sorted(labels.items()))
        if key not in self._series:
            buckets = spec.buckets or metrics.DURATION_BUCKETS_S
            extra = {"buckets": list(buckets)} if spec.kind == "HISTOGRAM" else {}
            self._series[key] = self._families[spec.name].Metric(labels=labels, **extra)
        return self._series[key]

    def request(self, mode: str, outcome: str) -> None:
        self._metric(metrics.REQUESTS, mode=mode, outcome=outcome).increment(1)

    def success(self, req, out, seconds: float) -> None:
        self.request(req.mode, "success")
        self._metric(metrics.STEPS, mode=req.mode).increment(req.steps)
        self._metric(metrics.ROUNDS, mode=req.mode).increment(out.rounds)
        self._metric(metrics.EVALUATIONS, mode=req.mode).increment(out.evaluations)
        self._metric(metrics.DURATION, mode=req.mode).observe(seconds)

    def retry(self, model: str, reason: str) -> None:
        self._metric(metrics.RETRIES, model=model).increment(1)

    # -- per denoiser endpoint (remote denoisers) --
    def endpoints(self, names) -> None:
        for name in names:
            self._metric(metrics.DENOISER_CALL_DURATION, endpoint=name)
            self._metric(metrics.DENOISER_CALL_ERRORS, endpoint=name)

    def denoiser_call(self, endpoint: str, seconds: float) -> None:
        self._metric(metrics.DENOISER_CALL_DURATION, endpoint=endpoint).observe(seconds)

    def denoiser_error(self, endpoint: str, reason: str) -> None:
        self._metric(metrics.DENOISER_CALL_ERRORS, endpoint=endpoint).increment(1)


def host_memory():
    """Where every BLS response tensor must be put: host memory (CPU 0)."""
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


def to_numpy(tensor) -> np.ndarray:
    """A BLS output as numpy; a tensor left on a device goes through DLPack (torch copies it)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    import torch

    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        # driffusion_stream: a response per round, then the images (gRPC streaming clients)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.orchestrator = Orchestrator.load(folder)
        self.logger = pb_utils.Logger
        self.metrics = Metrics()
        self.orchestrator.on_retry = self.metrics.retry
        threads = executor_threads(self.orchestrator.settings)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="driffusion-bls")
        parameters = json.loads(args["model_config"]).get("parameters", {})
        remote = parameters.get(routing.PARAMETER, {}).get("string_value", "")
        if remote:
            self.orchestrator.denoiser_router = self._router(remote)

    def _router(self, remote_denoisers: str):
        from driffusion.model_repository.remote import denoiser_router, probe_now

        router = denoiser_router(
            remote_denoisers,
            self.orchestrator.settings,
            on_call=self.metrics.denoiser_call,
            on_error=self.metrics.denoiser_error,
            say=self.logger.log_info,
            warn=self.logger.log_warn,
        )
        self.metrics.endpoints(e.name for e in router.endpoints)
        probe_now(router)
        self.logger.log_info(f"denoiser endpoints: {router.describe()}")
        return router

    async def execute(self, requests):
        if not self.decoupled:
            return list(await asyncio.gather(*(self._handle(r) for r in requests)))
        await asyncio.gather(*(self._stream(r) for r in requests))
        return None

    async def _stream(self, request):
        """Progress responses after each round, then the images with the final flag."""
        sender = request.get_response_sender()
        received = time.monotonic()

        async def progress(p):
            values = {
                api.ROUND.name: p.round,
                api.ROUNDS.name: p.rounds,
                api.STEPS_DONE.name: p.steps_done,
                api.ELAPSED_MS.name: (time.monotonic() - received) * 1e3,
            }
            tensors = [
                pb_utils.Tensor(f.name, np.array([values[f.name]], dtype=api.NUMPY_DTYPES[f.dtype]))
                for f in (api.ROUND, api.ROUNDS, api.STEPS_DONE, api.ELAPSED_MS)
            ]
            if p.preview is not None:
                tensors.append(pb_utils.Tensor(api.PREVIEW_IMAGE.name, p.preview))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

        response = await self._handle(request, progress)
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    async def _handle(self, request, progress=None):
        error = pb_utils.TritonError
        received = time.monotonic()
        try:
            values = {}
            for f in api.INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, f.name)
                values[f.name] = None if tensor is None else tensor.as_numpy()
            req = self.orchestrator.parse(values)
        except ValueError as exc:
            self.metrics.request("unknown", "invalid_argument")
            return pb_utils.InferenceResponse(error=error(str(exc), error.INVALID_ARG))
        deadline = received + self.orchestrator.request_timeout_s(_client_timeout_s(request))
        start = time.perf_counter()
        try:
            out = await self.orchestrator.generate(
                req, self._infer, request.is_cancelled, deadline=deadline, progress=progress
            )
        except RequestCancelled as exc:
            self.metrics.request(req.mode, "cancelled")
            return pb_utils.InferenceResponse(error=error(str(exc), error.CANCELLED))
        except DeadlineExceeded as exc:
            self.metrics.request(req.mode, "deadline_exceeded")
            return pb_utils.InferenceResponse(error=error(str(exc), error.UNAVAILABLE))
        except Exception as exc:  # one request fails; the model keeps serving
            self.metrics.request(req.mode, "failed")
            self.logger.log_error(f"driffusion request failed: {traceback.format_exc()}")
            return pb_utils.InferenceResponse(error=error(f"{type(exc).__name__}: {exc}"))
        self.metrics.success(req, out, time.perf_counter() - start)
        tensors = [pb_utils.Tensor(name, array) for name, array in out.arrays().items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    async def _infer(self, model, inputs, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
            requested_output_names=list(outputs),
            preferred_memory=host_memory(),
        )
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self.pool, request.exec)
        if response.has_error():
            message = response.error().message()
            # An instance failed (a dead stub, a CUDA error, a hung call the callee gave up on):
            # another instance may succeed. Bad inputs are ours and would fail anywhere.
            retryable = _error_code(response.error()) != pb_utils.TritonError.INVALID_ARG
            if retryable:
                self.logger.log_error(f"{model}: {message.rstrip('.')}; retrying elsewhere")
            raise ModelCallError(f"model {model} failed: {message}", retryable=retryable)
        return {n: to_numpy(pb_utils.get_output_tensor_by_name(response, n)) for n in outputs}

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def _client_timeout_s(request):
    """The request's own timeout in seconds (KServe ``timeout`` parameter, gRPC deadline), or
    None where the client gave none or this Triton does not pass it on."""
    timeout = getattr(request, "timeout", None)
    micros = timeout() if callable(timeout) else 0
    return micros / 1e6 if micros else None


def _error_code(error):
    code = getattr(error, "code", None)
    return code() if callable(code) else None
