"""The ``driffusion`` BLS model: moves tensors between Triton and ``driffusion.service``.

All logic (validation, tokenization, DRiffusion rounds, guidance) is in the plain module
``driffusion.service``; this file only adapts requests, responses and model calls.
A bad request gets INVALID_ARG with the field and the allowed range; a cancelled one CANCELLED;
a failing model call INTERNAL naming the model. The model itself never goes down.

Besides Triton's own metrics it exports counters of its own on the Prometheus endpoint
(``/metrics``, port 8002 by default), summed over the orchestrator instances:

- ``driffusion_requests_total{mode, outcome}``: outcome ``success``, ``invalid_argument``,
  ``cancelled`` or ``failed`` (mode ``unknown`` where the request did not parse);
- ``driffusion_steps_total{mode}``, ``driffusion_rounds_total{mode}`` and
  ``driffusion_evaluations_total{mode}`` of successful requests: the ideal speedup over a window
  is ``rate(steps) / rate(rounds)``, the extra device work ``rate(evaluations) / rate(steps)``;
- ``driffusion_request_duration_seconds{mode}`` (histogram) of successful requests;
- ``driffusion_model_call_retries_total{model}``: calls retried on another instance (a crashed or
  hung denoiser instance).
"""

import asyncio
import time
import traceback
from pathlib import Path

import triton_python_backend_utils as pb_utils

from driffusion import api
from driffusion.service import ModelCallError, Orchestrator, RequestCancelled

DURATION_BUCKETS_S = [0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64]
FAMILIES = {  # key: (Prometheus name, description, kind)
    "requests": ("driffusion_requests_total", "Requests by mode and outcome", "COUNTER"),
    "steps": ("driffusion_steps_total", "Sampling steps (sequential rounds)", "COUNTER"),
    "rounds": ("driffusion_rounds_total", "Serial denoiser rounds", "COUNTER"),
    "evaluations": ("driffusion_evaluations_total", "States evaluated", "COUNTER"),
    "duration": ("driffusion_request_duration_seconds", "Orchestrator time", "HISTOGRAM"),
    "retries": ("driffusion_model_call_retries_total", "Calls retried elsewhere", "COUNTER"),
}


class Metrics:
    """DRiffusion's Prometheus counters through Triton's custom metrics API."""

    def __init__(self):
        family = pb_utils.MetricFamily
        self.families = {
            key: family(name, text, getattr(family, kind))
            for key, (name, text, kind) in FAMILIES.items()
        }
        self._metrics = {}

    def _metric(self, name: str, **labels):
        key = (name, *sorted(labels.items()))
        if key not in self._metrics:
            extra = {"buckets": DURATION_BUCKETS_S} if name == "duration" else {}
            self._metrics[key] = self.families[name].Metric(labels=labels, **extra)
        return self._metrics[key]

    def request(self, mode: str, outcome: str) -> None:
        self._metric("requests", mode=mode, outcome=outcome).increment(1)

    def success(self, req, out, seconds: float) -> None:
        self.request(req.mode, "success")
        self._metric("steps", mode=req.mode).increment(req.steps)
        self._metric("rounds", mode=req.mode).increment(out.rounds)
        self._metric("evaluations", mode=req.mode).increment(out.evaluations)
        self._metric("duration", mode=req.mode).observe(seconds)

    def retry(self, model: str, reason: str) -> None:
        self._metric("retries", model=model).increment(1)


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        self.orchestrator = Orchestrator.load(folder)
        self.logger = pb_utils.Logger
        self.metrics = Metrics()
        self.orchestrator.on_retry = self.metrics.retry

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._handle(r) for r in requests)))

    async def _handle(self, request):
        error = pb_utils.TritonError
        try:
            values = {}
            for f in api.INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, f.name)
                values[f.name] = None if tensor is None else tensor.as_numpy()
            req = self.orchestrator.parse(values)
        except ValueError as exc:
            self.metrics.request("unknown", "invalid_argument")
            return pb_utils.InferenceResponse(error=error(str(exc), error.INVALID_ARG))
        start = time.perf_counter()
        try:
            out = await self.orchestrator.generate(req, self._infer, request.is_cancelled)
        except RequestCancelled as exc:
            self.metrics.request(req.mode, "cancelled")
            return pb_utils.InferenceResponse(error=error(str(exc), error.CANCELLED))
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
        )
        response = await request.async_exec()
        if response.has_error():
            message = response.error().message()
            # a crashed stub stays down in Triton 2.51: retry the call on another instance
            unhealthy = "is not healthy" in message
            if unhealthy:
                reason = message.rstrip(".")
                self.logger.log_error(f"{model}: {reason}; retrying on another instance")
            raise ModelCallError(f"model {model} failed: {message}", retryable=unhealthy)
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}
