"""Keeps a Triton server at full capacity: dead workers are noticed and replaced, and the health
signal says when the server cannot serve at full capacity.

Triton 2.51 neither restarts a python-backend worker (stub) that died, nor turns its readiness
false: a dead instance keeps being handed requests (each fails after about a second), and after
some 500 failures its queue blocks for good. The supervisor watches the server's process group:

- every worker of a python-backend model that exists after a (re)load is remembered by pid; when
  one exits, is killed, or is stopped (a stopped worker takes requests and never answers: it is
  killed), its model is **reloaded** in place: fresh workers start while the old ones keep serving,
  and Triton swaps to the new version when it is ready (``TritonServer.reload``);
- a worker whose shared-memory region grew past ``shm_limit_bytes`` (large requests make the
  python backend grow it, and it never shrinks) is reloaded the same way, giving the memory back;
- the workers a reload replaced normally exit within seconds; one that lingers past
  ``retire_after_s`` is killed (in Triton 2.51 the unload of a version whose worker died while
  requests were queued on it can hang for good, keeping its live workers and their memory);
- when tritonserver itself exits, or a reload fails, the whole server is restarted.

``readiness()`` is False from the moment a worker is found dead until its replacement serves (and
while Triton itself is not ready): the front answers ``/v2/health/ready`` and gRPC ServerReady
with it, so compose and Kubernetes health checks see it. Every event is logged with a timestamp
(``events``), which the recovery benchmark reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .server import Stub, TritonServer

Say = Callable[[str], object]


@dataclass
class Event:
    at: float  # time.monotonic()
    kind: str  # dead | grown | reloading | reloaded | reload_failed | exited | restarted | ready
    model: str | None
    text: str


@dataclass
class _State:
    watched: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> instance -> pid
    recovering: dict[str, str] = field(default_factory=dict)  # model -> why
    retired: dict[int, float] = field(default_factory=dict)  # replaced worker pid -> kill time
    restarting: str | None = None  # why the whole server is restarting


class Supervisor:
    """Runs ``server`` and keeps it at full capacity (module docstring); a context manager.

    Args:
        server: a TritonServer, not started.
        poll_s: how often the worker processes are looked at.
        shm_limit_bytes: reload a model whose worker's shared-memory region grew past this
            (default: 4 x the server's default region size).
        say: progress and event lines (``[supervisor] ...``).
    """

    def __init__(
        self,
        server: TritonServer,
        *,
        poll_s: float = 0.25,
        shm_limit_bytes: int | None = None,
        retire_after_s: float = 15.0,
        say: Say = print,
    ) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        self.server = server
        self.poll_s = poll_s
        self.shm_limit_bytes = shm_limit_bytes or 4 * server.shm_default_byte_size
        self.retire_after_s = retire_after_s
        self.say = say
        self.events: list[Event] = []
        self._state = _State()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reloads: dict[str, threading.Thread] = {}

    # -- health ------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): ready when every watched worker serves, no model is being recovered
        and Triton itself is ready."""
        with self._lock:
            if self._state.restarting:
                return False, f"restarting the server: {self._state.restarting}"
            if self._state.recovering:
                why = "; ".join(f"{m}: {w}" for m, w in sorted(self._state.recovering.items()))
                return False, f"recovering {why}"
        if self.server.returncode is not None or self.server.pid is None:
            return False, "tritonserver is not running"
        if not self._triton_ready():
            return False, "tritonserver is not ready"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        """(live, why not): the supervisor runs and is not stuck restarting for good."""
        if self._thread is None or not self._thread.is_alive():
            return False, "the supervisor is not running"
        return True, "live"

    def _triton_ready(self) -> bool:
        url = f"http://{self.server.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Supervisor:
        self.server.start()
        self._watch_all()
        self._event("ready", None, "serving; watching every worker")
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for thread in list(self._reloads.values()):
            thread.join(timeout=1)
        self.server.stop()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the watch ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check()
            except Exception as exc:  # the watch must go on
                self._event("error", None, f"check failed: {type(exc).__name__}: {exc}")

    def _check(self) -> None:
        code = self.server.returncode
        if code is not None:
            self._restart(f"tritonserver exited with code {code}")
            return
        stubs = {s.pid: s for s in self.server.stubs()}
        self._kill_lingering(stubs)
        with self._lock:
            watched = {m: dict(i) for m, i in self._state.watched.items()}
            recovering = set(self._state.recovering)
        for model, instances in watched.items():
            if model in recovering:
                continue
            for instance, pid in instances.items():
                stub = stubs.get(pid)
                if stub is None or not stub.serving:
                    state = "gone" if stub is None else f"state {stub.state}"
                    why = f"worker {instance} (pid {pid}) is dead ({state})"
                    self._event("dead", model, why)
                    if stub is not None:  # stopped: it would hold requests forever
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self._recover(model, why)
                    break
                size = _region_size(stub)
                if size > self.shm_limit_bytes:
                    why = (
                        f"worker {instance} shared memory grew to {size / 2**20:.0f} MiB "
                        f"(limit {self.shm_limit_bytes / 2**20:.0f} MiB)"
                    )
                    self._event("grown", model, why)
                    self._recover(model, why)
                    break

    def _kill_lingering(self, stubs: dict[int, Stub]) -> None:
        now = time.monotonic()
        with self._lock:
            due = [pid for pid, at in self._state.retired.items() if at <= now or pid not in stubs]
            for pid in due:
                self._state.retired.pop(pid)
        for pid in due:
            if pid in stubs:
                self._event("lingering", stubs[pid].model, f"killing replaced worker pid {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _recover(self, model: str, why: str) -> None:
        with self._lock:
            if model in self._state.recovering:
                return
            self._state.recovering[model] = why
        thread = threading.Thread(target=self._reload, args=(model,), daemon=True)
        self._reloads[model] = thread
        thread.start()

    def _reload(self, model: str) -> None:
        before = {s.pid for s in self.server.stubs() if s.model == model}
        self._event("reloading", model, "starting fresh workers")
        try:
            seconds = self.server.reload(model)
        except Exception as exc:
            self._event("reload_failed", model, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._state.recovering.pop(model, None)
            if not self._stop.is_set():
                self._restart(f"reloading {model} failed")
            return
        fresh = {s.instance: s.pid for s in self.server.stubs() if s.model == model}
        fresh = {i: p for i, p in fresh.items() if p not in before}
        with self._lock:
            if fresh:
                self._state.watched[model] = fresh
            deadline = time.monotonic() + self.retire_after_s
            self._state.retired.update({pid: deadline for pid in before})
            self._state.recovering.pop(model, None)
        self._event("reloaded", model, f"{len(fresh)} fresh worker(s) serving in {seconds:.1f} s")

    def _restart(self, why: str) -> None:
        with self._lock:
            self._state.restarting = why
        self._event("exited", None, f"{why}; restarting tritonserver")
        start = time.monotonic()
        try:
            self.server.stop()
            self.server.start()
        except Exception as exc:
            self._event("error", None, f"restart failed: {type(exc).__name__}: {exc}; retrying")
            time.sleep(1.0)
            return  # the next check sees the server down and tries again
        self._watch_all()
        with self._lock:
            self._state.restarting = None
            self._state.recovering.clear()
        self._event(
            "restarted", None, f"tritonserver serving again in {time.monotonic() - start:.1f} s"
        )

    def _watch_all(self) -> None:
        watched: dict[str, dict[str, int]] = {}
        for stub in self.server.stubs():
            if stub.serving:
                watched.setdefault(stub.model, {})[stub.instance] = stub.pid
        with self._lock:
            self._state.watched = watched

    def _event(self, kind: str, model: str | None, text: str) -> None:
        event = Event(time.monotonic(), kind, model, text)
        self.events.append(event)
        where = f"{model}: " if model else ""
        self.say(f"[supervisor] {where}{text}")


def _region_size(stub: Stub) -> int:
    try:
        return (Path("/dev/shm") / stub.region).stat().st_size
    except OSError:
        return 0
