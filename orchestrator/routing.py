"""Route a round's denoiser calls over endpoints: this server's own denoiser instances and remote
denoiser servers (``driffusion serve --role denoiser``), by free capacity, with failover.

Plain asyncio, tested without Triton: a remote endpoint is reached through an injected
:class:`Transport` (``driffusion.model_repository.remote`` speaks Triton's gRPC), the local one
through the orchestrator's own ``infer``.

- **Capacity.** Every endpoint has a number of instances: the local one ``denoiser_instances``, a
  remote one what its server's model config says (asked when it is probed) or what ``HOST:PORT/N``
  gives. :meth:`DenoiserRouter.width` is the instances of the endpoints that are up: the
  orchestrator splits a round into that many calls.
- **Routing.** Each call goes to an endpoint with a free instance (capacity minus the calls this
  process has in flight there): the local one first (no network hop), then the remote one with
  the most free instances. When none is free, to the least loaded one (Triton queues the call).
- **Failover.** A remote call that fails in a way that is the endpoint's (unreachable, reset, not
  ready, an internal error, no answer within ``timeout_s``) marks that endpoint down and the same
  call goes to another endpoint at once; the local endpoint is always there, so a request
  completes on what is left. Errors that are the request's own (bad inputs) are raised as they
  are: they would fail anywhere.
- **Retry later.** A down endpoint is probed in the background (readiness and its model config)
  after a backoff that doubles from ``backoff_s[0]`` to ``backoff_s[1]``; once a probe succeeds it
  takes calls again.

The router keeps no state per request: one router serves every request of an orchestrator
process, in that process's event loop. Its counts cover this process only; with several
orchestrator instances, each routes its own calls.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Infer = Callable[[str, Mapping[str, np.ndarray], tuple[str, ...]], Awaitable[dict[str, np.ndarray]]]
LOCAL = "local"  # the endpoint name of this server's own denoiser instances (metric label)
PARAMETER = "remote_denoisers"  # the orchestrator's config parameter that lists the endpoints
PROBE_TIMEOUT_S = 2.0
BACKOFF_S = (0.5, 10.0)  # first and longest wait before a down endpoint is probed again
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class EndpointSpec:
    """A remote denoiser server: ``address`` (``host:port`` of its gRPC port) and its instance
    count, or None to ask its model config."""

    address: str
    instances: int | None = None

    def __str__(self) -> str:
        return self.address if self.instances is None else f"{self.address}/{self.instances}"


def parse_endpoints(text: str) -> tuple[EndpointSpec, ...]:
    """``"HOST:PORT[/N],HOST:PORT[/N]..."`` -> endpoint specs; ``ValueError`` names a bad entry."""
    specs = []
    for entry in text.split(","):
        entry = entry.strip()
        address, slash, count = entry.partition("/")
        m = _ADDRESS.match(address)
        if not m or not 1 <= int(m.group("port")) <= 65535:
            raise ValueError(f"remote denoiser {entry!r}: expected HOST:PORT or HOST:PORT/N")
        instances = None
        if slash:
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"remote denoiser {entry!r}: N must be an integer >= 1")
            instances = int(count)
        specs.append(EndpointSpec(address, instances))
    if len({s.address for s in specs}) != len(specs):
        raise ValueError(f"remote denoisers: an address is listed twice in {text!r}")
    return tuple(specs)


class EndpointDown(Exception):
    """A remote endpoint failed in a way that is its own: the call goes elsewhere and the
    endpoint is probed again later."""


class Transport(Protocol):
    """How the router reaches one remote denoiser server."""

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...],
        timeout_s: float,
    ) -> dict[str, np.ndarray]:
        """One call, given up after ``timeout_s``; ``EndpointDown`` for the endpoint's faults."""
        ...

    async def probe(self, timeout_s: float) -> int:
        """The server's denoiser instances when it is ready to serve; else ``EndpointDown``."""
        ...

    async def close(self) -> None: ...


@dataclass
class Endpoint:
    """One endpoint's state (``transport`` None: the local instances)."""

    name: str
    capacity: int  # instances (0 for a remote one until a probe has said)
    transport: Transport | None = None
    given: int | None = None  # HOST:PORT/N: the capacity, whatever the server says
    up: bool = True
    in_flight: int = 0
    failures: int = 0  # consecutive failed calls or probes
    retry_at: float = 0.0  # clock() value from which a down endpoint is probed again
    probing: bool = False
    error: str = ""  # why it is down

    @property
    def local(self) -> bool:
        return self.transport is None

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight


class DenoiserRouter:
    """Denoiser calls over the local instances and remote servers (module docstring).

    Args:
        local_instances: this server's denoiser instances.
        remotes: (spec, transport) per remote server, in the listed order.
        timeout_s: a remote call not answered by then fails over (the orchestrator's
            ``model_timeout_s``; the local endpoint keeps the orchestrator's own timeout).
        probe_timeout_s: how long a probe of a down endpoint may take.
        backoff_s: (first, longest) wait before a down endpoint is probed again; doubles.
        on_call(endpoint, seconds): after every call that returned (metrics).
        on_error(endpoint, reason): after every call that failed (metrics).
        say(message): a remote endpoint came up (the server log).
        warn(message): a remote endpoint failed or is not available (default: ``say``).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        local_instances: int,
        remotes: Sequence[tuple[EndpointSpec, Transport]],
        *,
        timeout_s: float,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        backoff_s: tuple[float, float] = BACKOFF_S,
        on_call: Callable[[str, float], object] | None = None,
        on_error: Callable[[str, str], object] | None = None,
        say: Callable[[str], object] | None = None,
        warn: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if local_instances < 1:
            raise ValueError(f"local_instances must be >= 1, got {local_instances}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.local = Endpoint(LOCAL, local_instances)
        self.remotes = [
            Endpoint(spec.address, 0, transport, spec.instances, up=False)
            for spec, transport in remotes
        ]
        self.timeout_s, self.probe_timeout_s = timeout_s, probe_timeout_s
        self.backoff_s = backoff_s
        self.on_call, self.on_error = on_call, on_error
        self.say = say or (lambda _m: None)
        self.warn = warn or self.say
        self.clock = clock
        self._tasks: set[asyncio.Task] = set()  # probes running in the background

    @property
    def endpoints(self) -> list[Endpoint]:
        return [self.local, *self.remotes]

    def width(self) -> int:
        """Instances of the endpoints that are up: how many calls a round is split into."""
        return sum(e.capacity for e in self.endpoints if e.up)

    def describe(self) -> str:
        """One line: every endpoint, its capacity and state."""
        parts = []
        for e in self.endpoints:
            state = f"{e.capacity} instances" if e.up else f"down ({e.error or 'not probed'})"
            parts.append(f"{e.name}: {state}")
        return "; ".join(parts)

    # -- probing -------------------------------------------------------------------------------
    async def probe_all(self) -> None:
        """Probe every remote endpoint that is down, now, and wait for the answers (at start)."""
        await asyncio.gather(*(self._probe(e) for e in self.remotes if not e.up and not e.probing))

    def maintain(self) -> None:
        """Start a background probe of every down endpoint whose backoff has passed (called on
        every routed call; needs a running event loop)."""
        now = self.clock()
        for e in self.remotes:
            if not e.up and not e.probing and now >= e.retry_at:
                task = asyncio.get_running_loop().create_task(self._probe(e))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _probe(self, e: Endpoint) -> None:
        e.probing = True
        try:
            instances = await asyncio.wait_for(
                e.transport.probe(self.probe_timeout_s), self.probe_timeout_s
            )
            if instances < 1:
                raise EndpointDown(f"it serves {instances} denoiser instances")
        except Exception as exc:  # any failure of a probe keeps the endpoint down
            reason = _reason(exc, f"no answer within {self.probe_timeout_s:g} s")
            first = e.failures == 0 or reason != e.error
            wait = self._back_off(e, reason)
            if first:  # one line per new reason, not one per probe
                self.warn(
                    f"remote denoiser {e.name} is not available: {reason}; probing again "
                    f"with backoff (next in {wait:g} s, then up to every {self.backoff_s[1]:g} s)"
                )
        else:
            e.capacity = e.given or instances
            e.up, e.failures, e.error = True, 0, ""
            self.say(
                f"remote denoiser {e.name} is up: {e.capacity} instances; fan-out width now "
                f"{self.width()}"
            )
        finally:
            e.probing = False

    def _back_off(self, e: Endpoint, reason: str) -> float:
        e.failures += 1
        wait = min(self.backoff_s[1], self.backoff_s[0] * 2 ** (e.failures - 1))
        e.retry_at, e.error = self.clock() + wait, reason
        return wait

    def _mark_down(self, e: Endpoint, reason: str) -> None:
        if not e.up:
            return  # another call in flight there already did
        e.up = False
        wait = self._back_off(e, reason)
        self.warn(
            f"remote denoiser {e.name} failed: {reason}; marked down, its calls go to the other "
            f"endpoints (fan-out width now {self.width()}); probing it again in {wait:g} s"
        )

    # -- calls ---------------------------------------------------------------------------------
    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint:
        """The endpoint for the next call: a free local instance, else the up remote endpoint
        with the most free instances, else the least loaded up endpoint. The local endpoint is
        never excluded."""
        candidates = [e for e in self.endpoints if e.up and (e.local or e not in exclude)]
        free = [e for e in candidates if e.free > 0]
        if free:
            return max(free, key=lambda e: (e.local, e.free))  # max keeps the first of ties
        return min(candidates, key=lambda e: (e.in_flight / e.capacity, not e.local))

    def bind(self, local: Infer, deadline: float) -> Infer:
        """``infer`` for one request's denoiser calls: routed, local calls made through
        ``local`` (which keeps the orchestrator's own timeout, retries and deadline), remote
        calls given up after ``timeout_s`` or at ``deadline`` (a ``clock()`` value)."""

        async def call(model, inputs, outputs):
            self.maintain()
            tried: list[Endpoint] = []
            while True:
                e = self.pick(tried)
                left = deadline - self.clock()
                if not e.local and left <= 0:
                    e = self.local  # it raises the request's deadline error
                start = self.clock()
                e.in_flight += 1
                try:
                    if e.local:
                        out = await local(model, inputs, outputs)
                    else:
                        timeout = min(self.timeout_s, left)
                        out = await asyncio.wait_for(
                            e.transport.infer(model, inputs, outputs, timeout), timeout
                        )
                except (EndpointDown, asyncio.TimeoutError) as exc:
                    if e.local:
                        self._error(e, exc)
                        raise
                    if isinstance(exc, asyncio.TimeoutError) and timeout < self.timeout_s:
                        continue  # the request's deadline, not the endpoint's fault: local raises
                    reason = _reason(exc, f"no answer within {timeout:g} s")
                    self._error(e, reason)
                    self._mark_down(e, reason)
                    tried.append(e)
                    continue
                except Exception as exc:  # the request's own error, or the local endpoint's
                    self._error(e, exc)
                    raise
                finally:
                    e.in_flight -= 1
                if self.on_call is not None:
                    self.on_call(e.name, self.clock() - start)
                return out

        return call

    def _error(self, e: Endpoint, exc: BaseException | str) -> None:
        if self.on_error is not None:
            self.on_error(e.name, exc if isinstance(exc, str) else _reason(exc, ""))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for e in self.remotes:
            await e.transport.close()


def _reason(exc: BaseException, timeout_text: str) -> str:
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        return timeout_text
    return str(exc) or type(exc).__name__
