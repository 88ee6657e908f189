"""driffusion.routing without Triton: fake transports, a clock the tests move, real asyncio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from driffusion.routing import (
    LOCAL,
    DenoiserRouter,
    EndpointDown,
    EndpointSpec,
    parse_endpoints,
)

OUT = ("out",)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Fake:
    """A remote endpoint: answers with its name, or fails / hangs as told; counts calls."""

    def __init__(self, name: str, instances: int = 4):
        self.name, self.instances = name, instances
        self.calls = self.probes = 0
        self.fail: Exception | None = None  # raised by infer
        self.hang = False
        self.probe_error: Exception | None = None
        self.gate: asyncio.Event | None = None  # infer waits for it when set

    async def infer(self, model, inputs, outputs, timeout_s):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        return {"out": np.array([self.name])}

    async def probe(self, timeout_s):
        self.probes += 1
        if self.probe_error is not None:
            raise self.probe_error
        return self.instances

    async def close(self):
        pass


def local_infer(log: list[str], gate: asyncio.Event | None = None):
    async def infer(model, inputs, outputs):
        log.append(LOCAL)
        if gate is not None:
            await gate.wait()
        return {"out": np.array([LOCAL])}

    return infer


async def settle(router):
    """Wait for the router's background probes."""
    while router._tasks:
        await asyncio.gather(*list(router._tasks))


def router_of(*fakes: Fake, local: int = 4, given=None, **kwargs):
    given = given or {}
    specs = [(EndpointSpec(f.name, given.get(f.name)), f) for f in fakes]
    events = {"calls": [], "errors": [], "said": []}
    router = DenoiserRouter(
        local,
        specs,
        timeout_s=kwargs.pop("timeout_s", 5.0),
        on_call=lambda e, s: events["calls"].append(e),
        on_error=lambda e, r: events["errors"].append((e, r)),
        say=events["said"].append,
        **kwargs,
    )
    router.events = events
    return router


# --- the endpoint list --------------------------------------------------------------------------


def test_endpoints_parse_with_and_without_an_instance_count():
    assert parse_endpoints("a:8001, b.svc:8001/4,[::1]:9000") == (
        EndpointSpec("a:8001"),
        EndpointSpec("b.svc:8001", 4),
        EndpointSpec("[::1]:9000"),
    )
    assert str(EndpointSpec("b:1", 4)) == "b:1/4"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a", "HOST:PORT"),
        ("a:0", "HOST:PORT"),
        ("a:70000", "HOST:PORT"),
        ("a:1/0", "N must be"),
        ("a:1/x", "N must be"),
        ("a:1,a:1/2", "listed twice"),
        ("a:1,", "HOST:PORT"),
        ("http://a:1", "HOST:PORT"),
    ],
)
def test_bad_endpoint_lists_are_refused_naming_the_entry(text, match):
    with pytest.raises(ValueError, match=match):
        parse_endpoints(text)


# --- capacity and routing -------------------------------------------------------------------------


def test_remote_endpoints_count_once_probed_and_a_given_count_wins():
    a, b = Fake("a:1", instances=2), Fake("b:1", instances=8)
    router = router_of(a, b, given={"b:1": 3})
    assert router.width() == 4  # only the local instances until the remotes answer
    asyncio.run(router.probe_all())
    assert router.width() == 4 + 2 + 3
    assert any("a:1 is up: 2 instances" in m for m in router.events["said"])


def test_a_round_fills_free_local_instances_first_then_the_freest_remote():
    a, b = Fake("a:1", instances=4), Fake("b:1", instances=2)
    router = router_of(a, b, local=4)

    async def run():
        await router.probe_all()
        gate = asyncio.Event()
        for f in (a, b):
            f.gate = gate
        log: list[str] = []
        call = router.bind(local_infer(log, gate), deadline=1e9)
        tasks = [asyncio.create_task(call("denoiser", {}, OUT)) for _ in range(router.width())]
        await asyncio.sleep(0)
        in_flight = {e.name: e.in_flight for e in router.endpoints}
        gate.set()
        outs = [str(o["out"][0]) for o in await asyncio.gather(*tasks)]
        return in_flight, outs

    in_flight, outs = asyncio.run(run())
    assert in_flight == {LOCAL: 4, "a:1": 4, "b:1": 2}
    assert outs[:4] == [LOCAL] * 4  # local first: no network hop
    assert sorted(outs[4:]) == ["a:1"] * 4 + ["b:1"] * 2
    assert all(e.in_flight == 0 for e in router.endpoints)
    assert sorted(router.events["calls"]) == sorted(outs)


def test_with_every_instance_busy_the_least_loaded_endpoint_gets_the_call():
    a = Fake("a:1", instances=4)
    router = router_of(a, local=2)
    asyncio.run(router.probe_all())
    router.local.in_flight, router.remotes[0].in_flight = 4, 4  # 2.0 vs 1.0 per instance
    assert router.pick().name == "a:1"
    router.remotes[0].in_flight = 8
    assert router.pick().name == LOCAL  # a tie goes to the local instances


# --- failover -----------------------------------------------------------------------------------


def test_a_failing_remote_is_marked_down_and_the_call_completes_elsewhere():
    a = Fake("a:1")
    clock = Clock()
    router = router_of(a, local=1, clock=clock)

    async def run():
        await router.probe_all()
        log: list[str] = []
        call = router.bind(local_infer(log), deadline=1e9)
        router.local.in_flight = 1  # the local instance is busy: the call goes to a:1 first
        a.fail = EndpointDown("UNAVAILABLE: connection refused")
        out = await call("denoiser", {}, OUT)
        router.local.in_flight = 0
        return out, log

    out, log = asyncio.run(run())
    assert out["out"][0] == LOCAL and log == [LOCAL] and a.calls == 1
    assert not router.remotes[0].up and router.width() == 1
    assert router.events["errors"] == [("a:1", "UNAVAILABLE: connection refused")]
    (line,) = [m for m in router.events["said"] if "failed" in m]
    assert "a:1 failed: UNAVAILABLE: connection refused; marked down" in line
    assert "probing it again in 0.5 s" in line


def test_a_down_endpoint_is_probed_with_backoff_and_used_again_once_back():
    a = Fake("a:1", instances=2)
    clock = Clock()
    router = router_of(a, local=1, clock=clock)

    async def run():
        await router.probe_all()
        e = router.remotes[0]
        router._mark_down(e, "gone")
        a.probe_error = EndpointDown("connection refused")
        waits = []
        for _ in range(7):
            router.maintain()  # not due yet: nothing starts
            await asyncio.sleep(0)
            probes = a.probes
            clock.now = e.retry_at
            router.maintain()
            await settle(router)
            assert a.probes == probes + 1
            waits.append(e.retry_at - clock.now)
        a.probe_error = None
        clock.now = e.retry_at
        router.maintain()
        await settle(router)
        return waits

    waits = asyncio.run(run())
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert router.remotes[0].up and router.width() == 3
    said = router.events["said"]
    assert sum("is not available: connection refused" in m for m in said) == 1  # not per probe
    assert said[-1].startswith("remote denoiser a:1 is up: 2 instances")


def test_a_remote_that_does_not_answer_in_time_fails_over():
    a = Fake("a:1")
    router = router_of(a, local=1, timeout_s=0.05)

    async def run():
        await router.probe_all()
        router.local.in_flight = 1
        a.hang = True
        out = await router.bind(local_infer([]), deadline=1e9)("denoiser", {}, OUT)
        router.local.in_flight = 0
        return out

    assert asyncio.run(run())["out"][0] == LOCAL
    assert router.events["errors"] == [("a:1", "no answer within 0.05 s")]
    assert not router.remotes[0].up


def test_the_requests_own_error_is_raised_and_the_endpoint_stays_up():
    a = Fake("a:1")
    router = router_of(a, local=1)

    async def run():
        await router.probe_all()
        router.local.in_flight = 1
        a.fail = RuntimeError("INVALID_ARGUMENT: sample dim 0 (batch) must be in [1, 8]")
        await router.bind(local_infer([]), deadline=1e9)("denoiser", {}, OUT)

    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        asyncio.run(run())
    assert router.remotes[0].up and router.remotes[0].in_flight == 0


def test_past_the_deadline_no_remote_call_is_made():
    a = Fake("a:1")
    clock = Clock()
    router = router_of(a, local=1, clock=clock)

    async def run():
        await router.probe_all()
        router.local.in_flight = 1
        log: list[str] = []
        await router.bind(local_infer(log), deadline=clock.now - 1)("denoiser", {}, OUT)
        return log

    assert asyncio.run(run()) == [LOCAL]  # the local infer raises the request's deadline error
    assert a.calls == 0 and router.remotes[0].up


def test_a_probe_that_fails_keeps_the_endpoint_down_with_the_reason():
    a, b = Fake("a:1"), Fake("b:1", instances=0)
    a.probe_error = EndpointDown("its denoiser is not this orchestrator's")
    router = router_of(a, b)
    asyncio.run(router.probe_all())
    assert router.width() == 4
    text = router.describe()
    assert "a:1: down (its denoiser is not this orchestrator's)" in text
    assert "b:1: down (it serves 0 denoiser instances)" in text
