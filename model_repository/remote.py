"""Remote denoisers over Triton's gRPC: the transport of ``driffusion.routing``.

``driffusion serve --remote-denoisers HOST:PORT,...`` gives the orchestrator (the BLS model) a
:class:`~driffusion.routing.DenoiserRouter` whose remote endpoints are :class:`RemoteDenoiser`\\ s:
``tritonclient.grpc.aio`` clients of the gRPC port of ``driffusion serve --role denoiser`` servers
(their front: size limits, health, admin rules as for any client). Only open APIs are used:
inference, model readiness and the model config.

- A call carries the shard's inputs as they are (the orchestrator already sends the served
  dtypes) and a gRPC deadline of the router's timeout, so a call given up on is cancelled on the
  remote server too.
- Errors are sorted: ``INVALID_ARGUMENT`` is the request's own (it would fail anywhere) and is
  raised as ``ModelCallError``; everything else (unreachable, reset, unavailable, internal,
  deadline) is the endpoint's: ``EndpointDown``, and the router sends the call elsewhere.
- A probe asks whether the remote ``denoiser`` is ready and reads its config: the instance count
  (``count`` per listed GPU, or ``count`` on the CPU) and the tensor contract, which must be this
  orchestrator's (names and data types of every input and output): a server of another model
  family or precision is refused before it gets a call.
- The gRPC channel belongs to the event loop it was made in: a client is made in the loop that
  uses it, again after a probe of a down endpoint (a fresh connection instead of a channel in
  gRPC's own reconnect backoff).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from driffusion.routing import DenoiserRouter, EndpointDown, parse_endpoints
from driffusion.service import ModelCallError, ServiceSettings
from driffusion.tensors import DENOISER

MAX_MESSAGE_BYTES = 2**31 - 1
# Reconnects stay quick once a server is back. No keepalive pings: a gRPC server refuses pings
# more often than every 5 minutes by default (GOAWAY "too_many_pings" after 3), which would fail a
# long call that is fine; a peer that stops answering is given up on at the call's deadline.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def served_contract(settings: ServiceSettings) -> dict[str, str]:
    """{tensor name: Triton config data type} of the denoiser this orchestrator calls."""
    spec = settings.family.components[DENOISER]
    return {
        t.name: "TYPE_" + np_to_triton_dtype(np.dtype(t.dtype))
        for t in (*spec.inputs, *spec.outputs)
    }


class RemoteDenoiser:
    """One remote denoiser server (``address``: host:port of its gRPC port)."""

    def __init__(self, address: str, contract: Mapping[str, str], model: str = DENOISER):
        self.address, self.model = address, model
        self.contract = dict(contract)
        self._client: grpcclient.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _connection(self) -> grpcclient.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = grpcclient.InferenceServerClient(self.address, channel_args=CHANNEL_ARGS)
            self._loop = loop
        return self._client

    async def infer(self, model, inputs, outputs, timeout_s):
        tensors = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensors.append(tensor.set_data_from_numpy(array))
        requested = [grpcclient.InferRequestedOutput(n) for n in outputs]
        try:
            result = await self._connection().infer(
                model, tensors, outputs=requested, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            if exc.status() == "StatusCode.INVALID_ARGUMENT":
                raise ModelCallError(f"model {model} at {self.address}: {exc.message()}") from None
            raise EndpointDown(_describe(exc)) from None
        except Exception as exc:  # the channel itself failed
            raise EndpointDown(f"{type(exc).__name__}: {exc}") from None
        return {n: np.array(result.as_numpy(n)) for n in outputs}  # writable, as torch wants

    async def probe(self, timeout_s: float) -> int:
        await self.close()  # a fresh connection
        client = self._connection()
        try:
            if not await client.is_model_ready(self.model, client_timeout=timeout_s):
                raise EndpointDown(f"model {self.model} is not ready there")
            answer = await client.get_model_config(
                self.model, as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise EndpointDown(_describe(exc)) from None
        config = answer["config"]
        served = {t["name"]: t["data_type"] for t in config.get("input", [])}
        served.update({t["name"]: t["data_type"] for t in config.get("output", [])})
        if served != self.contract:
            raise EndpointDown(
                f"its {self.model} is not this orchestrator's: tensors {served}, expected "
                f"{self.contract} (serve the same repository there)"
            )
        return instance_count(config)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.close()


def instance_count(config: Mapping) -> int:
    """Instances of a model config (JSON form): ``count`` per listed GPU, or ``count``."""
    total = 0
    for group in config.get("instance_group", []):
        count = int(group.get("count", 1))
        gpus = group.get("gpus") or []
        total += count * len(gpus) if group.get("kind") == "KIND_GPU" and gpus else count
    return total


def denoiser_router(
    remote_denoisers: str,
    settings: ServiceSettings,
    *,
    on_call: Callable[[str, float], object] | None = None,
    on_error: Callable[[str, str], object] | None = None,
    say: Callable[[str], object] | None = None,
    warn: Callable[[str], object] | None = None,
) -> DenoiserRouter:
    """The router of an orchestrator whose config lists ``remote_denoisers`` (HOST:PORT[/N],...):
    its local instances and those servers, per call timeout ``model_timeout_s``."""
    contract = served_contract(settings)
    remotes = [(s, RemoteDenoiser(s.address, contract)) for s in parse_endpoints(remote_denoisers)]
    return DenoiserRouter(
        settings.denoiser_instances,
        remotes,
        timeout_s=settings.model_timeout_s,
        on_call=on_call,
        on_error=on_error,
        say=say,
        warn=warn,
    )


def probe_now(router: DenoiserRouter) -> None:
    """Probe every remote endpoint once and wait for the answers (an orchestrator's start, outside
    any event loop); the connections made for it are closed (the serving loop makes its own)."""

    async def probe():
        await router.probe_all()
        await router.close()

    asyncio.run(probe())


def _describe(exc: InferenceServerException) -> str:
    status = (exc.status() or "").removeprefix("StatusCode.")
    return f"{status}: {exc.message()}" if status else str(exc.message())
