"""A front for Triton: bounded requests and driffusion's own health signal on the public ports.

Triton 2.51 cannot cap an HTTP body, a gzip inflation or a gRPC message (its gRPC limit is
hard-coded at 2 GiB), a big request grows the python backend's ``/dev/shm`` region for good, and
its readiness stays true when a worker process dies. So ``driffusion serve`` runs Triton on
loopback ports and puts a ``Front`` on the public ones:

    with Front("127.0.0.1:18000", "127.0.0.1:18001", http_port=8000, grpc_port=8001,
               readiness=lambda: (True, "")) as front:
        ...

- HTTP/1.1 (asyncio + h11): a reverse proxy for every method and path. A request body is read
  whole before anything reaches Triton and never held beyond ``max_request_bytes``: a larger
  ``Content-Length``, a chunked body that grows past it and a ``gzip``/``deflate`` body whose
  *inflated* size would pass it are refused with 413 (inflated incrementally with a cap; Triton
  then gets the inflated body without ``Content-Encoding``); headers past ``max_header_bytes``
  get 431. The response is streamed back.
- gRPC (grpc.aio, raw bytes): every method of ``inference.GRPCInferenceService`` is forwarded
  with its metadata, deadline and cancellation (a client that cancels cancels the upstream call,
  which a python model sees as ``request.is_cancelled()``); status, details and metadata come
  back unchanged. ``grpc.max_receive_message_length`` is ``max_request_bytes``; gRPC core checks
  a compressed message's decompressed size against it too (RESOURCE_EXHAUSTED).
- Health: ``GET /v2/health/ready`` and ``/v2/health/live``, gRPC ``ServerReady``,
  ``ServerLive`` and ``grpc.health.v1.Health/Check`` are answered here: ready when the
  ``readiness`` callable says so *and* Triton does (503 with ``{"error": reason}`` over HTTP).
- ``POST /v2/models/<m>[/versions/<v>]/infer`` for the models in ``cancel_on_disconnect`` is
  translated to a gRPC ``ModelInfer`` call (KServe JSON and the binary-data extension), so that
  an HTTP client that disconnects cancels its request: Triton 2.51 does not cancel on an HTTP
  disconnect, but does on a cancelled gRPC call.

The front runs its own asyncio loop in a background thread; ``start()`` returns once it listens.
What it adds per call, measured on a 2-core box against a tiny python model (medians): HTTP
passthrough 0.5 ms, HTTP /infer over gRPC 0.9 ms, gRPC 0.8 ms, of which grpc.aio itself (a bare
grpc.aio proxy) accounts for all but about 0.1 ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import h11
import numpy as np
from tritonclient.grpc import service_pb2

_log = logging.getLogger(__name__)
MiB = 1024 * 1024
_READ = 64 * 1024
_SERVICE = "/inference.GRPCInferenceService/"
_SERVER_READY = _SERVICE + "ServerReady"
_SERVER_LIVE = _SERVICE + "ServerLive"
_MODEL_INFER = _SERVICE + "ModelInfer"
# Triton's python backend answers a request routed to a dead worker with this, before any of the
# request ran: the front sends it again (the supervisor of ``driffusion serve`` replaces the
# worker, and another instance can take it meanwhile), so no client sees that error.
_UNHEALTHY = re.compile(r"Stub process '[^']*' is not healthy")
_UNHEALTHY_RETRIES = 4


async def _infer_with_retries(call_once):
    """``await call_once()`` again while it fails on a dead worker (``_UNHEALTHY``)."""
    for attempt in range(_UNHEALTHY_RETRIES + 1):
        try:
            return await call_once()
        except grpc.aio.AioRpcError as exc:
            unhealthy = exc.code() == grpc.StatusCode.INTERNAL and _UNHEALTHY.search(
                exc.details() or ""
            )
            if not unhealthy or attempt == _UNHEALTHY_RETRIES:
                raise


_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# grpc.health.v1.HealthCheckResponse{status}: field 1, varint; SERVING = 1, NOT_SERVING = 2.
_HEALTH_SERVING, _HEALTH_NOT_SERVING = b"\x08\x01", b"\x08\x02"
# Per connection, not end to end: never forwarded (RFC 9110 7.6.1), plus what the front
# recomputes (framing) or answers itself (Expect).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"content-length",
    }
)
# gRPC metadata that the transport sets itself.
_RESERVED_METADATA = ("grpc-", ":")
_RESERVED_METADATA_KEYS = frozenset({"user-agent", "content-type", "te", "host"})

Health = Callable[[], "tuple[bool, str] | bool"]


@dataclass(frozen=True)
class FrontLimits:
    """What one request may hold.

    max_request_bytes: the largest HTTP request body or gRPC message accepted, measured after
        decompression (and before it: a compressed body is not allowed to be larger either).
    max_header_bytes: HTTP request line plus header fields; gRPC metadata
        (``grpc.max_metadata_size``).
    max_concurrent_streams: gRPC streams (calls) in flight per client connection.
    idle_timeout_s: an HTTP connection that sends nothing for this long while the front waits
        for it (between requests, or inside one) is closed.
    """

    max_request_bytes: int = 8 * MiB
    max_header_bytes: int = 64 * 1024
    max_concurrent_streams: int = 64
    idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_header_bytes", "max_concurrent_streams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.max_request_bytes > 2**31 - 1:  # gRPC's own ceiling (a C int)
            raise ValueError(f"max_request_bytes: at most 2**31 - 1, got {self.max_request_bytes}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes: at least 1024, got {self.max_header_bytes}")
        timeout = self.idle_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"idle_timeout_s: expected a positive number, got {timeout!r}")


def _host_port(address: str, field: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{field}: expected 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


async def _check(probe: Health | None, what: str) -> tuple[bool, str]:
    """(ok, reason) from a readiness or liveness callable, run off the event loop."""
    if probe is None:
        return True, ""
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, probe)
    except Exception as exc:  # a broken probe means "not ready", with the reason
        return False, f"{what} check failed: {type(exc).__name__}: {exc}"
    ok, reason = (result, "") if isinstance(result, bool) else result
    return bool(ok), str(reason or "")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class Front:
    """HTTP and gRPC front of a Triton server; a context manager.

    Args:
        upstream_http, upstream_grpc: Triton's own endpoints, ``"127.0.0.1:PORT"``; ``None``
            leaves that protocol out.
        address: where the front listens.
        http_port, grpc_port: public ports; 0 picks a free one (``http_port``/``grpc_port``
            tell which once started).
        limits: ``FrontLimits``.
        readiness, liveness: callables returning ``(ok, reason)`` (or a bool), called on every
            health request from a worker thread; ``None`` counts as ok.
        cancel_on_disconnect: models whose HTTP ``/infer`` goes to Triton as a gRPC call so that
            a client that disconnects cancels it (see the module docstring).
    """

    def __init__(
        self,
        upstream_http: str | None,
        upstream_grpc: str | None,
        *,
        address: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        limits: FrontLimits = FrontLimits(),  # noqa: B008 (frozen)
        readiness: Health | None = None,
        liveness: Health | None = None,
        cancel_on_disconnect: Sequence[str] = ("driffusion",),
    ) -> None:
        if not isinstance(limits, FrontLimits):
            raise ValueError(f"limits: expected FrontLimits, got {type(limits).__name__}")
        if upstream_http is None and upstream_grpc is None:
            raise ValueError("upstream_http, upstream_grpc: at least one is needed")
        self._up_http = (
            None if upstream_http is None else _host_port(upstream_http, "upstream_http")
        )
        self._up_grpc = upstream_grpc
        if upstream_grpc is not None:
            _host_port(upstream_grpc, "upstream_grpc")
        for name, port in (("http_port", http_port), ("grpc_port", grpc_port)):
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"{name}: expected 0..65535, got {port!r}")
        self.address = address
        self.limits = limits
        self.readiness, self.liveness = readiness, liveness
        # Without a gRPC upstream there is nothing to translate to: plain proxying.
        self.cancel_on_disconnect = frozenset(cancel_on_disconnect if upstream_grpc else ())
        self._want_http_port, self._want_grpc_port = http_port, grpc_port
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._http_server: asyncio.base_events.Server | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._pool: _UpstreamPool | None = None
        self._connections: dict[asyncio.Task, _HttpConnection] = {}
        self._closing = False

    # -- addresses -------------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.address, self.address)

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP front (for ``tritonclient.http``)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC front (for ``tritonclient.grpc``)."""
        return f"{self._client_host}:{self.grpc_port}"

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Front:
        """Listen on both ports; return once listening (raise ``OSError`` if a port is taken)."""
        if self._thread is not None:
            raise RuntimeError("front already started")
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="driffusion-front", daemon=True
        )
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop listening and close idle connections; requests in flight get ``grace_s`` to
        finish, then they are cancelled (their upstream calls too); idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already gone
            asyncio.run_coroutine_threadsafe(self._close(grace_s), loop).result(grace_s + 10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = None

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, started: concurrent.futures.Future) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:
                loop.run_until_complete(self._close(0))
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _open(self) -> None:
        limits = self.limits
        if self._up_grpc is not None:
            # Upstream: no size limit of our own (responses come from our models; requests were
            # bounded on the way in).
            self._channel = grpc.aio.insecure_channel(
                self._up_grpc,
                options=[
                    ("grpc.max_receive_message_length", -1),
                    ("grpc.max_send_message_length", -1),
                ],
            )
        if self._up_http is not None:
            self._pool = _UpstreamPool(*self._up_http)
            self._http_server = await asyncio.start_server(
                self._serve_http_connection,
                self.address,
                self._want_http_port,
                reuse_address=True,
            )
            self.http_port = self._http_server.sockets[0].getsockname()[1]
        if self._up_grpc is not None:
            self._grpc_server = grpc.aio.server(
                handlers=[_GrpcProxy(self)],
                options=[
                    ("grpc.max_receive_message_length", limits.max_request_bytes),
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_metadata_size", limits.max_header_bytes),  # soft: may refuse
                    ("grpc.absolute_max_metadata_size", limits.max_header_bytes),  # hard: does
                    ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
                    ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
                ],
            )
            where = f"{self.address}:{self._want_grpc_port}"
            try:
                port = self._grpc_server.add_insecure_port(where)
            except RuntimeError as exc:  # grpc's way of saying the port is taken
                raise OSError(f"grpc_port: cannot listen on {where}: {exc}") from None
            self.grpc_port = port
            await self._grpc_server.start()

    async def _close(self, grace_s: float) -> None:
        """Stop listening; requests in flight get ``grace_s`` to finish (both protocols at
        once), idle connections are closed at once."""
        self._closing = True
        if self._http_server is not None:
            self._http_server.close()
        for task, connection in list(self._connections.items()):
            if not connection.busy:
                task.cancel()
        grpc_stopped = self._grpc_server.stop(grace_s) if self._grpc_server is not None else None
        if self._connections:
            _, late = await asyncio.wait(list(self._connections), timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        if grpc_stopped is not None:
            await grpc_stopped
        if self._channel is not None:
            await self._channel.close()
        if self._pool is not None:
            self._pool.close()

    # -- HTTP ------------------------------------------------------------------------------------
    async def _serve_http_connection(self, reader, writer) -> None:
        task = asyncio.current_task()
        connection = self._connections[task] = _HttpConnection(self, reader, writer)
        try:
            await connection.serve()
        except (ConnectionError, asyncio.CancelledError, asyncio.TimeoutError):
            pass  # the client went away, or the front stops, or an idle connection timed out
        except Exception:
            _log.exception("HTTP connection failed")
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def health(self, which: str) -> tuple[bool, str]:
        """(ok, reason) of ``which`` ("ready" or "live"): our callable and Triton's answer."""
        probe = self.readiness if which == "ready" else self.liveness
        ok, reason = await _check(probe, "readiness" if which == "ready" else "liveness")
        if not ok:
            return False, reason or f"not {which}"
        if self._pool is not None:
            try:
                status = await self._pool.status(b"GET", f"/v2/health/{which}".encode())
            except (OSError, asyncio.TimeoutError) as exc:
                return False, f"triton unreachable: {exc}"
            return status == 200, "" if status == 200 else f"triton is not {which} (HTTP {status})"
        method = _SERVER_READY if which == "ready" else _SERVER_LIVE
        try:
            raw = await self._channel.unary_unary(method)(b"", timeout=5)
        except grpc.aio.AioRpcError as exc:
            return False, f"triton unreachable: {exc.code().name} {_short(exc.details() or '')}"
        response_type = (
            service_pb2.ServerReadyResponse if which == "ready" else service_pb2.ServerLiveResponse
        )
        ok = getattr(response_type.FromString(raw), which)
        return ok, "" if ok else f"triton is not {which}"


# --- HTTP --------------------------------------------------------------------------------------


class _Refuse(Exception):
    """An HTTP error answer from the front: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _ClientGone(Exception):
    """The HTTP client closed its connection while its request was being served."""


def _json_body(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Inflater:
    """Incremental gzip / zlib ("deflate") decoding that stops past ``limit`` output bytes."""

    def __init__(self, encoding: str, limit: int) -> None:
        self._d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        self.encoding, self.limit = encoding, limit
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, data: bytes) -> None:
        while data:
            if self._d.eof:
                raise _Refuse(400, f"data after the end of the {self.encoding} stream")
            try:
                out = self._d.decompress(data, self.limit - self.size + 1)
            except zlib.error as exc:
                raise _Refuse(400, f"invalid {self.encoding} body: {exc}") from None
            self.size += len(out)
            if self.size > self.limit:
                raise _Refuse(413, _too_large(self.limit, inflated=True))
            self.parts.append(out)
            data = self._d.unconsumed_tail or self._d.unused_data

    def finish(self) -> bytes:
        if not self._d.eof:
            raise _Refuse(400, f"truncated {self.encoding} body")
        return b"".join(self.parts)


def _too_large(limit: int, inflated: bool = False) -> str:
    what = "inflated request body" if inflated else "request body"
    return f"{what} exceeds max_request_bytes={limit}"


_INFER_PATH = re.compile(rb"^/v2/models/([^/?]+)(?:/versions/([0-9]+))?/infer$")


class _HttpConnection:
    """One client connection: requests in, answers out, one at a time (HTTP/1.1 keep-alive)."""

    def __init__(self, front: Front, reader, writer) -> None:
        self.front, self.limits = front, front.limits
        self.reader, self.writer = reader, writer
        self.busy = False  # a request is being read or answered
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )

    async def serve(self) -> None:
        while True:
            try:
                event = await self._next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                assert isinstance(event, h11.Request), event
                self.busy = True
                self._check_header_size(event)
                body = await self._read_body(event)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                message = (
                    f"request header fields exceed max_header_bytes={self.limits.max_header_bytes}"
                    if status == 431
                    else f"malformed HTTP request: {exc}"
                )
                await self._refuse_and_close(_Refuse(status, message))
                return
            except _Refuse as refusal:
                await self._refuse_and_close(refusal)
                return
            try:
                await self._watching_disconnect(self._answer(event, body))
            except _ClientGone:
                return
            except _Refuse as refusal:  # before any response byte went out
                await self._refuse_and_close(refusal)
                return
            except (OSError, h11.ProtocolError) as exc:  # Triton's connection broke
                await self._refuse_and_close(_Refuse(502, f"triton connection failed: {exc}"))
                return
            self.busy = False
            if self.front._closing or h11.MUST_CLOSE in (
                self.conn.our_state,
                self.conn.their_state,
            ):
                return
            self.conn.start_next_cycle()

    # -- reading ---------------------------------------------------------------------------------
    async def _next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(_READ), self.limits.idle_timeout_s)
            self.conn.receive_data(data)

    def _check_header_size(self, request: h11.Request) -> None:
        size = len(request.method) + len(request.target) + 12
        size += sum(len(name) + len(value) + 4 for name, value in request.headers)
        if size > self.limits.max_header_bytes:
            raise _Refuse(
                431, f"request header fields exceed max_header_bytes={self.limits.max_header_bytes}"
            )

    async def _read_body(self, request: h11.Request) -> bytes:
        """The whole body, inflated, within the limit; 413 as soon as it cannot fit."""
        limit = self.limits.max_request_bytes
        length = _header(request, b"content-length")
        if length is not None and int(length) > limit:  # h11 checked it is a number
            raise _Refuse(413, _too_large(limit))
        encodings = [v.strip().lower() for n, v in request.headers if n == b"content-encoding"]
        inflater = None
        if any(e in (b"gzip", b"x-gzip", b"deflate") for e in encodings):
            if len(encodings) != 1:
                raise _Refuse(415, "several Content-Encoding headers; send one of gzip, deflate")
            name = "deflate" if encodings[0] == b"deflate" else "gzip"
            inflater = _Inflater(name, limit)
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        parts, size = [], 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.EndOfMessage):
                break
            data = bytes(event.data)
            size += len(data)
            if size > limit:
                raise _Refuse(413, _too_large(limit))
            if inflater is not None:
                inflater.feed(data)
            else:
                parts.append(data)
        return inflater.finish() if inflater is not None else b"".join(parts)

    async def _watching_disconnect(self, work) -> None:
        """Run ``work`` (the answer to one request) and cancel it if the client goes away.

        The client's socket is watched with one read: EOF means it has gone (``_ClientGone``);
        bytes (a pipelined next request) are handed to h11 for later and the watch ends.
        """
        work = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(self.reader.read(_READ))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                data = watch.result()
                if not data:
                    raise _ClientGone
                self.conn.receive_data(data)
            await work
        finally:
            for task in (watch, work):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    # -- writing ---------------------------------------------------------------------------------
    async def _send(self, event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _send_simple(self, status: int, body: bytes, *, close: bool = False) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if close:
            headers.append((b"connection", b"close"))
        await self._send(h11.Response(status_code=status, headers=headers))
        if body:
            await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def _refuse_and_close(self, refusal: _Refuse) -> None:
        """Answer ``refusal`` when a response can still start, then close without a reset: stop
        writing and drain what the client still sends, for a moment, before closing."""
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(Exception):
                await self._send_simple(
                    refusal.status, _json_body({"error": refusal.message}), close=True
                )
        with contextlib.suppress(Exception):
            self.writer.write_eof()
            await asyncio.wait_for(self._drain_input(), 1.0)

    async def _drain_input(self) -> None:
        while await self.reader.read(_READ):
            pass

    # -- answering -------------------------------------------------------------------------------
    async def _answer(self, request: h11.Request, body: bytes) -> None:
        path = request.target.split(b"?", 1)[0]
        if request.method == b"GET" and path in (b"/v2/health/ready", b"/v2/health/live"):
            ok, reason = await self.front.health(path.rsplit(b"/", 1)[1].decode())
            if ok:
                await self._send_simple(200, b"")
            else:
                await self._send_simple(503, _json_body({"error": reason}))
            return
        if request.method == b"POST" and self.front.cancel_on_disconnect:
            match = _INFER_PATH.match(path)
            if match and match.group(1).decode("latin-1") in self.front.cancel_on_disconnect:
                await self._infer_over_grpc(request, body, match)
                return
        await self._proxy(request, body)

    async def _proxy(self, request: h11.Request, body: bytes) -> None:
        headers = [(n, v) for n, v in request.headers if n not in _HOP_BY_HOP]
        if _header(request, b"content-encoding") is not None:
            encoding = _header(request, b"content-encoding").strip().lower()
            if encoding in (b"gzip", b"x-gzip", b"deflate"):
                headers = [(n, v) for n, v in headers if n != b"content-encoding"]
        has_body = (
            body or _header(request, b"content-length") or _header(request, b"transfer-encoding")
        )
        if has_body:
            headers.append((b"content-length", b"%d" % len(body)))
        upstream = await self.front._pool.send(request.method, request.target, headers, body)
        try:
            response = upstream.response
            out = [
                (n, v)
                for n, v in response.headers
                if n not in _HOP_BY_HOP or n == b"content-length"
            ]
            await self._send(h11.Response(status_code=response.status_code, headers=out))
            async for chunk in upstream.body():
                await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
        finally:
            upstream.release()

    async def _infer_over_grpc(self, request: h11.Request, body: bytes, match) -> None:
        status, headers, payload = await _kserve_infer(self.front, request, body, match)
        headers.append((b"content-length", b"%d" % len(payload)))
        await self._send(h11.Response(status_code=status, headers=headers))
        await self._send(h11.Data(data=payload))
        await self._send(h11.EndOfMessage())


def _header(request, name: bytes) -> bytes | None:
    for n, v in request.headers:
        if n == name:
            return v
    return None


class _UpstreamResponse:
    def __init__(self, pool: _UpstreamPool, conn: _UpstreamConnection, response) -> None:
        self.pool, self.conn, self.response = pool, conn, response
        self._done = False

    async def body(self):
        while True:
            event = await self.conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                self._done = True
                return
            if not isinstance(event, h11.Data):
                raise ConnectionError(f"triton ended its response early: {event!r}")
            yield bytes(event.data)

    def release(self) -> None:
        self.pool.release(self.conn, reusable=self._done)


class _UpstreamConnection:
    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, *events) -> None:
        for event in events:
            self.writer.write(self.h11.send(event))
        await self.writer.drain()

    async def next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.reader.read(_READ))

    def close(self) -> None:
        self.writer.close()


class _UpstreamPool:
    """Keep-alive connections to Triton's HTTP endpoint."""

    def __init__(self, host: str, port: int, max_idle: int = 32) -> None:
        self.host, self.port, self.max_idle = host, port, max_idle
        self._idle: list[_UpstreamConnection] = []

    async def send(self, method: bytes, target: bytes, headers, body: bytes) -> _UpstreamResponse:
        """Send one request; its response headers are in, the body is to be read."""
        host = f"{self.host}:{self.port}".encode()
        headers = [(b"host", host), *[(n, v) for n, v in headers if n != b"host"]]
        events = [h11.Request(method=method, target=target, headers=headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        while True:
            reused = bool(self._idle)
            try:
                conn = self._idle.pop() if reused else await self._connect()
            except OSError as exc:
                raise _Refuse(502, f"triton unreachable: {exc}") from None
            try:
                await conn.send(*events)
                event = await conn.next_event()
                while isinstance(event, h11.InformationalResponse):  # 1xx: not the answer
                    event = await conn.next_event()
            except (OSError, h11.ProtocolError) as exc:
                conn.close()
                if reused:  # Triton closed an idle connection: try again on another one
                    continue
                raise _Refuse(502, f"triton unreachable: {exc}") from None
            except BaseException:
                conn.close()
                raise
            if isinstance(event, h11.ConnectionClosed):
                conn.close()
                if reused:
                    continue
                raise _Refuse(502, "triton closed the connection")
            return _UpstreamResponse(self, conn, event)

    async def status(self, method: bytes, target: bytes) -> int:
        try:
            upstream = await asyncio.wait_for(self.send(method, target, [], b""), 5)
        except _Refuse as exc:
            raise OSError(exc.message) from None
        try:
            async for _ in upstream.body():
                pass
        finally:
            upstream.release()
        return upstream.response.status_code

    async def _connect(self) -> _UpstreamConnection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _UpstreamConnection(reader, writer)

    def release(self, conn: _UpstreamConnection, reusable: bool) -> None:
        state = conn.h11
        if (
            reusable
            and state.our_state is h11.DONE
            and state.their_state is h11.DONE
            and len(self._idle) < self.max_idle
        ):
            state.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


# --- gRPC --------------------------------------------------------------------------------------


def _forwardable(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[tuple, ...]:
    """Application metadata: without what gRPC itself sets (reserved keys)."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not key.startswith(_RESERVED_METADATA) and key not in _RESERVED_METADATA_KEYS
    )


class _GrpcProxy(grpc.GenericRpcHandler):
    """Every method of ``inference.GRPCInferenceService`` (as tritonclient's descriptor lists
    them) forwarded as raw bytes; the health methods answered by the front."""

    def __init__(self, front: Front) -> None:
        self.front = front
        service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        self.handlers = {}
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.client_streaming and method.server_streaming:  # ModelStreamInfer
                handler = grpc.stream_stream_rpc_method_handler(self._stream(path))
            elif not (method.client_streaming or method.server_streaming):
                handler = grpc.unary_unary_rpc_method_handler(self._unary(path))
            else:  # none in the protocol
                continue
            self.handlers[path] = handler
        for path in (_SERVER_READY, _SERVER_LIVE, _HEALTH_CHECK):
            self.handlers[path] = grpc.unary_unary_rpc_method_handler(self._health(path))

    def service(self, details):
        return self.handlers.get(details.method)  # None: UNIMPLEMENTED

    def _upstream_kwargs(self, context) -> dict:
        remaining = context.time_remaining()  # no deadline reads as about 2**63 ns here
        return {
            "metadata": _forwardable(context.invocation_metadata()),
            "timeout": remaining if remaining is not None and remaining < 1e9 else None,
        }

    def _unary(self, method: str):
        upstream = self.front._channel.unary_unary(method)

        async def handler(request: bytes, context):
            calls = []

            async def once():
                calls.append(upstream(request, **self._upstream_kwargs(context)))
                return await calls[-1]

            try:
                if method == _MODEL_INFER:
                    response = await _infer_with_retries(once)
                else:
                    response = await once()
            except grpc.aio.AioRpcError as exc:
                await _abort_like(context, exc)
            finally:
                calls[-1].cancel()  # a no-op once done; cancels upstream if the client left
            call = calls[-1]
            await context.send_initial_metadata(_forwardable(await call.initial_metadata()))
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
            return response

        return handler

    def _stream(self, method: str):
        upstream = self.front._channel.stream_stream(method)

        async def handler(request_iterator, context):
            call = upstream(request_iterator, **self._upstream_kwargs(context))
            try:
                await context.send_initial_metadata(_forwardable(await call.initial_metadata()))
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                await _abort_like(context, exc)
            finally:
                call.cancel()
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))

        return handler

    def _health(self, method: str):
        async def handler(request: bytes, context):
            which = "live" if method == _SERVER_LIVE else "ready"
            ok, reason = await self.front.health(which)
            if reason:
                reason_ascii = _short(reason).encode("ascii", "replace").decode()
                context.set_trailing_metadata((("driffusion-health-reason", reason_ascii),))
            if method == _HEALTH_CHECK:
                return _HEALTH_SERVING if ok else _HEALTH_NOT_SERVING
            if which == "live":
                return service_pb2.ServerLiveResponse(live=ok).SerializeToString()
            return service_pb2.ServerReadyResponse(ready=ok).SerializeToString()

        return handler


async def _abort_like(context, exc: grpc.aio.AioRpcError):
    """End the client's call with the upstream call's status, details and metadata."""
    with contextlib.suppress(Exception):  # initial metadata may already have gone out
        await context.send_initial_metadata(_forwardable(exc.initial_metadata()))
    await context.abort(
        exc.code(), exc.details() or "", trailing_metadata=_forwardable(exc.trailing_metadata())
    )


# --- HTTP infer over gRPC ------------------------------------------------------------------------
# KServe v2 HTTP/JSON (with Triton's binary-data extension) <-> ModelInfer, laid out as Triton's
# HTTP endpoint lays it out (http_server.cc, FinalizeResponse): "id", "model_name",
# "model_version", "parameters", "outputs"; each output "name", "datatype", "shape", then
# "data" (JSON) or "parameters": {"binary_data_size"} with the bytes after the JSON header.

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# Triton's gRPC status of an error -> the HTTP status its HTTP endpoint gives the same error.
_HTTP_STATUS = {
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
# HTTP headers that describe the HTTP message itself; the others travel to Triton as gRPC
# metadata ``triton-grpc-protocol-<name>``, which is how Triton's gRPC endpoint reads the
# headers of a restricted API (``--grpc-restricted-protocol``).
_NOT_METADATA = _HOP_BY_HOP | {
    b"host",
    b"content-type",
    b"content-encoding",
    b"accept",
    b"accept-encoding",
    b"user-agent",
    b"inference-header-content-length",
}


_RESTRICTED = re.compile(
    r"^This protocol is restricted, expecting header 'triton-grpc-protocol-(.*)'$"
)


class _BadRequest(Exception):
    """A request Triton's HTTP endpoint would refuse, with the status it would give: 400, or
    500 where it fails to read the JSON (TritonJson errors are INTERNAL there)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def _kserve_infer(front: Front, request, body: bytes, match):
    """(status, headers, body) of an HTTP ``/infer`` answered through a gRPC ModelInfer."""
    model, version = match.group(1).decode("latin-1"), (match.group(2) or b"").decode()
    try:
        message, binary_outputs, binary_default = _grpc_request(request, body, model, version)
    except _BadRequest as exc:
        return _json_answer(exc.status, str(exc))
    metadata = tuple(
        (f"triton-grpc-protocol-{name.decode()}", value.decode())
        for name, value in request.headers
        if name not in _NOT_METADATA and value.isascii()
    )
    calls = []

    async def once():
        calls.append(front._channel.unary_unary(_MODEL_INFER)(message, metadata=metadata))
        return await calls[-1]

    try:
        raw = await _infer_with_retries(once)  # cancelled with this task if the client leaves
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        restricted = _RESTRICTED.match(details)
        if exc.code() == grpc.StatusCode.UNAVAILABLE and restricted:  # as Triton's HTTP says it
            return _json_answer(403, f"This API is restricted, expecting header '{restricted[1]}'")
        return _json_answer(_HTTP_STATUS.get(exc.code(), 400), details)
    finally:
        calls[-1].cancel()
    try:
        response = service_pb2.ModelInferResponse.FromString(raw)
        return _http_response(response, binary_outputs, binary_default)
    except _BadRequest as exc:
        return _json_answer(exc.status, str(exc))


def _json_answer(status: int, message: str):
    return status, [(b"content-type", b"application/json")], _json_body({"error": message})


def _grpc_request(request, body: bytes, model: str, version: str):
    """The serialized ModelInferRequest of a KServe HTTP body; which outputs go back binary."""
    header_length = _header(request, b"inference-header-content-length")
    if header_length is not None:
        if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
            raise _BadRequest(
                f"inference header size should be in range (0, {len(body)}], got: "
                f"{_short(header_length.decode('latin-1'), 20)}"
            )
        head, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as exc:
        message = f"failed to parse the request JSON buffer: {_short(str(exc))}"
        raise _BadRequest(message, 500) from None
    doc = _typed(doc, dict, "request")
    message = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    if "id" in doc:
        message.id = _member(doc, "id", str)
    binary_default = False
    for key, value in _member(doc, "parameters", dict, {}).items():
        if key == "binary_data_output":
            binary_default = _typed(value, bool, key)
            continue
        if key in ("timeout", "priority"):
            _typed(value, _UInt, key)
        elif key in ("sequence_start", "sequence_end"):
            _typed(value, bool, key)
        elif key == "sequence_id" and not isinstance(value, str):
            _typed(value, _UInt, key)
        elif key.startswith("triton_"):
            raise _BadRequest(
                "parameter keys starting with 'triton_' are reserved for Triton usage and "
                "should not be specified."
            )
        _set_parameter(message.parameters[key], value, key)
    offset = 0
    for item in _member(doc, "inputs", list):
        item = _typed(item, dict, "inputs")
        tensor = message.inputs.add()
        tensor.name = _member(item, "name", str)
        tensor.datatype = _member(item, "datatype", str)
        tensor.shape.extend(_typed(v, _UInt, "shape") for v in _member(item, "shape", list))
        parameters = _member(item, "parameters", dict, {})
        given = [k for k in ("binary_data_size", "shared_memory_region") if k in parameters]
        if "data" in item:
            given.insert(0, "data")
        if len(given) != 1:
            raise _BadRequest(
                "Input must set only one of the following fields: 'data', 'binary_data_size' in "
                "'parameters', 'shared_memory_region' in 'parameters'. But"
                + (" set " + " ".join(f"'{k}'" for k in given) if given else "no field is set")
            )
        size = None
        for key, value in parameters.items():
            if key == "binary_data_size":
                size = _typed(value, _UInt, "binary_data_size")
            else:
                _set_parameter(tensor.parameters[key], value, key)
        if size is not None:
            if offset + size > len(binary):
                raise _BadRequest(f"unexpected size {size} for input '{tensor.name}'")
            message.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
        elif "data" in item:
            message.raw_input_contents.append(_raw(item["data"], tensor))
    if offset != len(binary):
        raise _BadRequest(f"unexpected additional input data for model '{model}'")
    binary_outputs = {}
    for item in _member(doc, "outputs", list, []):
        item = _typed(item, dict, "outputs")
        tensor = message.outputs.add()
        tensor.name = _member(item, "name", str)
        binary_outputs[tensor.name] = False
        for key, value in _member(item, "parameters", dict, {}).items():
            if key == "binary_data":
                binary_outputs[tensor.name] = _typed(value, bool, "binary_data")
            else:
                _set_parameter(tensor.parameters[key], value, key)
    return message.SerializeToString(), binary_outputs, binary_default


class _UInt:
    """Marks a JSON unsigned integer for ``_typed``."""


_JSON_KIND = {
    str: "string",
    list: "array",
    dict: "object",
    bool: "boolean",
    int: "signed-integer",
    _UInt: "unsigned-integer",
    float: "number",
}
_NO_DEFAULT = object()


def _member(obj: dict, key: str, kind: type, default=_NO_DEFAULT):
    """``obj[key]`` of type ``kind``; refused as Triton's TritonJson refuses it."""
    if key not in obj:
        if default is not _NO_DEFAULT:
            return default
        message = f"Unable to parse '{key}': attempt to access non-existing object member '{key}'"
        raise _BadRequest(message, 500)
    return _typed(obj[key], kind, key)


def _typed(value, kind: type, field: str, prefix: str = ""):
    """``value`` if it is a JSON ``kind``; refused as TritonJson refuses it."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind in (int, _UInt):
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (value >= 0 if kind is _UInt else True)
    else:
        ok = isinstance(value, kind)
    if not ok:
        name = _JSON_KIND[kind]
        as_name = "double" if kind is float else name
        prefix = prefix or f"Unable to parse '{field}'"
        raise _BadRequest(f"{prefix}: attempt to access JSON non-{name} as {as_name}", 500)
    return value


def _set_parameter(parameter, value, key: str) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        parameter.int64_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        parameter.uint64_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise _BadRequest(
            f"parameter '{_short(key, 60)}' has invalid type. It should be either 'int', 'bool', "
            "or 'string'."
        )


def _flatten(data) -> list:
    """Nested JSON lists in row-major order (iterative: no recursion limit to hit)."""
    out, stack = [], [iter(_typed(data, list, "data"))]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _raw(data, tensor) -> bytes:
    """A JSON ``data`` array as the tensor's raw bytes (BYTES: 4-byte little-endian lengths)."""
    values = _flatten(data)
    count = 1
    for dim in tensor.shape:
        count *= dim
    if len(values) != count:
        message = "Unable to parse 'data': Shape does not match true shape of 'data' field"
        raise _BadRequest(message, 500)
    if tensor.datatype == "BYTES":
        parts = []
        for value in values:
            text = _typed(value, str, "data", "Unable to parse JSON bytes array")
            encoded = text.encode("utf-8", "surrogateescape")
            parts += [struct.pack("<I", len(encoded)), encoded]
        return b"".join(parts)
    if tensor.datatype not in _NUMPY:
        raise _BadRequest(f"invalid datatype for input {tensor.name}")
    datatype = tensor.datatype
    kind = bool if datatype == "BOOL" else _UInt if datatype[0] == "U" else int
    kind = float if datatype[0] == "F" else kind
    for value in values:
        _typed(value, kind, "data")
    if kind in (int, _UInt):  # Triton's HTTP endpoint wraps these silently (2**32 + 4 -> 4)
        info = np.iinfo(_NUMPY[datatype])
        for value in values:
            if not info.min <= value <= info.max:
                raise _BadRequest(
                    f"input '{_short(tensor.name, 60)}': {_short(str(value), 30)} is out of "
                    f"range for {datatype} [{info.min}, {info.max}]"
                )
    try:
        dtype = np.dtype(_NUMPY[tensor.datatype]).newbyteorder("<")
        return np.asarray(values, dtype=dtype).tobytes()
    except (OverflowError, ValueError) as exc:
        raise _BadRequest(f"Unable to parse 'data': {exc}", 500) from None


def _parameter_value(parameter):
    return getattr(parameter, parameter.WhichOneof("parameter_choice"))


def _json_data(raw: bytes, datatype: str, name: str) -> list:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            values.append(raw[offset : offset + length].decode("utf-8", "surrogateescape"))
            offset += length
        return values
    if datatype in ("FP16", "BF16") or datatype not in _NUMPY:
        raise _BadRequest(
            f"sending {datatype} data via JSON is not supported. Please use the binary data "
            "format for output"
        )
    return np.frombuffer(raw, dtype=np.dtype(_NUMPY[datatype]).newbyteorder("<")).tolist()


def _http_response(message, binary_outputs: dict[str, bool], binary_default: bool):
    doc: dict = {}
    if message.id:
        doc["id"] = message.id
    doc["model_name"] = message.model_name
    doc["model_version"] = message.model_version
    if message.parameters:
        doc["parameters"] = {k: _parameter_value(v) for k, v in message.parameters.items()}
    outputs, blobs = [], []
    contents = list(message.raw_output_contents)
    for i, tensor in enumerate(message.outputs):
        out = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if "shared_memory_region" not in tensor.parameters:
            raw = contents[i] if i < len(contents) else b""
            if binary_outputs.get(tensor.name, binary_default):
                out["parameters"] = {"binary_data_size": len(raw)}
                blobs.append(raw)
            else:
                out["data"] = _json_data(raw, tensor.datatype, tensor.name)
        outputs.append(out)
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    head = head.encode("utf-8", "surrogateescape")
    if not any(blobs):
        return 200, [(b"content-type", b"application/json")], head
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", b"%d" % len(head)),
    ]
    return 200, headers, b"".join([head, *blobs])


__all__ = ["Front", "FrontLimits", "Health"]
