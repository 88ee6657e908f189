"""driffusion's own Prometheus metrics: the one table the BLS model registers and the docs list.

Served through Triton's custom metrics API on its metrics endpoint (``/metrics``), summed over the
orchestrator instances. Triton's own ``nv_inference_request_success`` counts a python model's
error responses as successes, so these are the counters to alert on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str  # the Prometheus name
    kind: str  # COUNTER | GAUGE | HISTOGRAM (pb_utils.MetricFamily kinds)
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()  # HISTOGRAM: upper bounds in seconds (default: DURATION's)


REQUESTS = MetricSpec(
    "driffusion_requests_total",
    "COUNTER",
    ("mode", "outcome"),
    "requests; outcome success, invalid_argument, cancelled, deadline_exceeded or failed",
)
STEPS = MetricSpec(
    "driffusion_steps_total",
    "COUNTER",
    ("mode",),
    "sampling steps of successful requests (the sequential sampler's rounds)",
)
ROUNDS = MetricSpec(
    "driffusion_rounds_total", "COUNTER", ("mode",), "serial denoiser rounds actually run"
)
EVALUATIONS = MetricSpec("driffusion_evaluations_total", "COUNTER", ("mode",), "states evaluated")
DURATION = MetricSpec(
    "driffusion_request_duration_seconds",
    "HISTOGRAM",
    ("mode",),
    "histogram of the orchestrator's time per successful request",
)
RETRIES = MetricSpec(
    "driffusion_model_call_retries_total",
    "COUNTER",
    ("model",),
    "model calls retried on another instance (crashed or hung instance)",
)
# With remote denoisers (``driffusion serve --remote-denoisers``): per endpoint, ``local`` (this
# server's instances) or a remote HOST:PORT.
DENOISER_CALL_DURATION = MetricSpec(
    "driffusion_denoiser_call_duration_seconds",
    "HISTOGRAM",
    ("endpoint",),
    "denoiser calls that returned and their duration, by endpoint (with --remote-denoisers)",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
DENOISER_CALL_ERRORS = MetricSpec(
    "driffusion_denoiser_call_errors_total",
    "COUNTER",
    ("endpoint",),
    "denoiser calls that failed, by endpoint; a remote endpoint is then marked down and its calls "
    "go to the others (with --remote-denoisers)",
)
METRICS = (
    REQUESTS,
    STEPS,
    ROUNDS,
    EVALUATIONS,
    DURATION,
    RETRIES,
    DENOISER_CALL_DURATION,
    DENOISER_CALL_ERRORS,
)
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
OUTCOMES = ("success", "invalid_argument", "cancelled", "deadline_exceeded", "failed")
