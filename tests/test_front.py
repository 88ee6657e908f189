"""The front (model_repository/front.py) against a real tritonserver and clients we did not write:
curl, tritonclient.http, tritonclient.grpc and raw sockets.

One Triton server for the module (python models: ``echo``, a ``slow`` one that watches
``is_cancelled()``, a decoupled ``stream``), 1 MiB python shared memory per instance, and
``model-config`` restricted to a header so that metadata passing can be seen. Fronts allow
1 MiB per request; probes stay a few MiB.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="tritonserver needs the driffusion[server] extra")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

from driffusion.model_repository.front import Front, FrontLimits  # noqa: E402

LIMIT = 1024 * 1024
ADMIN = ("admin-key", "s3cret")

ECHO_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            s = pb_utils.get_input_tensor_by_name(request, "s").as_numpy()
            n = x.nbytes + sum(len(v) for v in s.reshape(-1))
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("y", (2 * x + 1).astype(np.float32)),
                pb_utils.Tensor("t", np.array([v.upper() for v in s.reshape(-1)], dtype=object)),
                pb_utils.Tensor("n", np.array([n], dtype=np.int64)),
            ]))
        return responses
"""

SLOW_PY = """\
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.log = config["parameters"]["log"]["string_value"]

    def execute(self, requests):
        responses = []
        for request in requests:
            ms = int(pb_utils.get_input_tensor_by_name(request, "ms").as_numpy()[0])
            start, cancelled = time.monotonic(), False
            while time.monotonic() - start < ms / 1000:
                if request.is_cancelled():
                    cancelled = True
                    break
                time.sleep(0.005)
            slept = int((time.monotonic() - start) * 1000)
            with open(self.log, "a") as f:
                f.write(json.dumps({"ms": ms, "cancelled": cancelled, "slept": slept,
                                    "timeout": request.timeout(), "id": request.request_id()}))
                f.write("\\n")
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("slept", np.array([slept], dtype=np.int32))]))
        return responses
"""

STREAM_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "n").as_numpy()[0])
            for i in range(n):
                sender.send(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("i", np.array([i * 10], dtype=np.int32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""

CONFIGS = {
    "echo": """
input [{ name: "x" data_type: TYPE_FP32 dims: [-1] },
       { name: "s" data_type: TYPE_STRING dims: [-1] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [-1] },
        { name: "t" data_type: TYPE_STRING dims: [-1] },
        { name: "n" data_type: TYPE_INT64 dims: [1] }]
""",
    "slow": """
input [{ name: "ms" data_type: TYPE_INT32 dims: [1] }]
output [{ name: "slept" data_type: TYPE_INT32 dims: [1] }]
parameters { key: "log" value { string_value: "LOG" } }
""",
    "stream": """
input [{ name: "n" data_type: TYPE_INT32 dims: [1] }]
output [{ name: "i" data_type: TYPE_INT32 dims: [1] }]
model_transaction_policy { decoupled: true }
""",
}
SOURCES = {"echo": ECHO_PY, "slow": SLOW_PY, "stream": STREAM_PY}


def write_repository(repo: Path, log: Path) -> None:
    for name, config in CONFIGS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(SOURCES[name])
        head = f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        group = "instance_group [{ count: 1 kind: KIND_CPU }]\n"
        (repo / name / "config.pbtxt").write_text(head + group + config.replace("LOG", str(log)))


class Health:
    """A readiness or liveness callable the tests can flip."""

    def __init__(self) -> None:
        self.value = (True, "")

    def __call__(self):
        return self.value


@pytest.fixture(scope="module")
def slow_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slow") / "slow.jsonl"


@pytest.fixture(scope="module")
def server(tmp_path_factory, start_triton_server, slow_log):
    repo = tmp_path_factory.mktemp("repo")
    write_repository(repo, slow_log)
    restricted = "model-config:{}={}".format(*ADMIN)
    return start_triton_server(
        repo,
        shm_default_byte_size=LIMIT,
        extra_args=[
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
        ],
    )


@pytest.fixture(scope="module")
def readiness():
    return Health()


@pytest.fixture(scope="module")
def liveness():
    return Health()


@pytest.fixture(scope="module")
def front(server, readiness, liveness):
    """Plain proxying of every path."""
    with Front(
        server.http_url,
        server.grpc_url,
        http_port=0,
        grpc_port=0,
        limits=FrontLimits(max_request_bytes=LIMIT),
        readiness=readiness,
        liveness=liveness,
        cancel_on_disconnect=(),
    ) as front:
        yield front


@pytest.fixture(scope="module")
def xfront(server):
    """HTTP /infer of echo and slow translated to gRPC."""
    with Front(
        server.http_url,
        server.grpc_url,
        http_port=0,
        grpc_port=0,
        limits=FrontLimits(max_request_bytes=LIMIT),
        cancel_on_disconnect=("echo", "slow"),
    ) as front:
        yield front


@pytest.fixture
def reset_health(readiness, liveness):
    yield
    readiness.value = liveness.value = (True, "")


# --- helpers -----------------------------------------------------------------------------------


def echo_inputs(module, x: np.ndarray, s: list[bytes], binary: bool = True):
    ix = module.InferInput("x", list(x.shape), "FP32")
    is_ = module.InferInput("s", [len(s)], "BYTES")
    arr = np.array(s, dtype=object)
    if module is httpclient:
        ix.set_data_from_numpy(x, binary_data=binary)
        is_.set_data_from_numpy(arr, binary_data=binary)
    else:
        ix.set_data_from_numpy(x)
        is_.set_data_from_numpy(arr)
    return [ix, is_]


def http_exchange(url: str, data: bytes, *, read_timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes to ``host:port``; return (status, body) of the first response."""
    host, port = url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
        sock.sendall(data)
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        None,
    )
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def curl(*args: str, data: bytes | None = None) -> tuple[int, bytes]:
    """curl ``args``; (HTTP status, body)."""
    out = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
        input=data,
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    body, _, status = out.rpartition(b"\n")
    return int(status), body


def shm_sizes(server) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in Path("/dev/shm").glob(f"{server.shm_prefix}*")}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def slow_records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def wait_for_record(log: Path, count: int, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = slow_records(log)
        if len(records) >= count:
            return records[count - 1]
        time.sleep(0.02)
    raise AssertionError(f"the slow model logged {len(slow_records(log))} < {count} requests")


def json_infer_body(x: list[float], s: list[str]) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [len(x)], "datatype": "FP32", "data": x},
                {"name": "s", "shape": [len(s)], "datatype": "BYTES", "data": s},
            ]
        }
    ).encode()


# --- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_request_bytes": 0}, "max_request_bytes"),
        ({"max_request_bytes": 2**31}, "max_request_bytes"),
        ({"max_header_bytes": 10}, "max_header_bytes"),
        ({"max_concurrent_streams": True}, "max_concurrent_streams"),
        ({"idle_timeout_s": 0}, "idle_timeout_s"),
    ],
)
def test_limits_are_validated_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FrontLimits(**kwargs)


def test_front_arguments_are_validated_naming_the_field():
    with pytest.raises(ValueError, match="upstream_http"):
        Front("localhost", None)
    with pytest.raises(ValueError, match="http_port"):
        Front("127.0.0.1:1", None, http_port=70000)
    with pytest.raises(ValueError, match="limits"):
        Front("127.0.0.1:1", None, limits={"max_request_bytes": 1})


def test_a_taken_port_fails_start_and_stop_is_idempotent(server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            Front(server.http_url, None, http_port=port).start()
        with pytest.raises(OSError):
            Front(None, server.grpc_url, grpc_port=port).start()
    front = Front(server.http_url, server.grpc_url, http_port=0, grpc_port=0).start()
    assert front.http_port and front.grpc_port
    front.stop()
    front.stop()


# --- HTTP passthrough --------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_http_gets_what_triton_gives(server, front, xfront, binary, compression):
    """Plain proxying and the translated /infer give tritonclient what Triton gives it; with
    request and response compression too (the front inflates; it answers uncompressed)."""
    x = np.arange(5, dtype=np.float32)
    s = [b"abc", "d\u00e9f".encode()]
    answers = []
    for url in (server.http_url, front.http_url, xfront.http_url):
        with httpclient.InferenceServerClient(url) as client:
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in "ytn"]
            result = client.infer(
                "echo",
                echo_inputs(httpclient, x, s, binary),
                outputs=outputs,
                request_compression_algorithm=compression,
                response_compression_algorithm=compression,
            )
            answers.append((result.get_response(), [result.as_numpy(n).tolist() for n in "ytn"]))
            answers.append(client.get_model_metadata("echo"))
    assert answers[0] == answers[2] == answers[4] and answers[1] == answers[3] == answers[5]
    np.testing.assert_array_equal(answers[2][1][0], 2 * x + 1)


def test_curl_json_and_errors_are_passed_through(server, front):
    body = json_infer_body([1.0, 2.5], ["ab"])
    for path, data in [
        ("/v2/models/echo/infer", body),
        ("/v2/models/echo/versions/1/infer", body),
        ("/v2/models/echo/infer", b'{"inputs": []}'),  # Triton's own 400
        ("/v2/models/nope/infer", body),  # 400 from Triton, unknown model
        ("/v2/models/echo", None),
        ("/v2/nowhere", None),
    ]:
        args = ["--data-binary", "@-"] if data is not None else []
        direct = curl(*args, f"http://{server.http_url}{path}", data=data)
        through = curl(*args, f"http://{front.http_url}{path}", data=data)
        assert through == direct, path


def test_curl_gzip_and_deflate_bodies_are_inflated_for_triton(server, front):
    body = json_infer_body([3.0] * 100, ["x" * 1000])
    expected = curl(
        "--data-binary", "@-", f"http://{server.http_url}/v2/models/echo/infer", data=body
    )
    assert expected[0] == 200
    for encoding, packed in [("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))]:
        got = curl(
            "--data-binary",
            "@-",
            "-H",
            f"Content-Encoding: {encoding}",
            f"http://{front.http_url}/v2/models/echo/infer",
            data=packed,
        )
        assert got == expected, encoding


def test_keep_alive_and_pipelining_on_one_connection(front):
    request = (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v2/models/echo HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    host, port = front.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        assert read_response(sock)[0] == 200
        status, body = read_response(sock)
        assert status == 200 and json.loads(body)["name"] == "echo"
        sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection, later
        assert read_response(sock)[0] == 200


# --- HTTP limits -------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_refused_before_the_body(front):
    head = f"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT + 1}\r\n\r\n"
    status, body = http_exchange(front.http_url, head.encode())  # no body sent at all
    assert status == 413
    assert "max_request_bytes" in json.loads(body)["error"]


def test_curl_with_a_big_body_gets_413(front):
    status, body = curl(
        "--data-binary",
        "@-",
        f"http://{front.http_url}/v2/models/echo/infer",
        data=b"0" * (2 * LIMIT),
    )
    assert status == 413 and "max_request_bytes" in json.loads(body)["error"]


def test_a_chunked_body_growing_past_the_limit_is_refused(front):
    host, port = front.http_url.rsplit(":", 1)
    chunk = b"x" * 65536
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # the front may stop reading once refused
            for _ in range(2 * LIMIT // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        status, body = read_response(sock)
    assert status == 413 and "max_request_bytes" in json.loads(body)["error"]


def test_an_idle_or_slow_connection_is_closed(server):
    limits = FrontLimits(idle_timeout_s=0.3)
    with Front(server.http_url, None, http_port=0, limits=limits) as front:
        host, port = front.http_url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # and no more
            start = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - start < 2


def test_oversized_and_malformed_headers(front):
    big = b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    status, body = http_exchange(front.http_url, big)
    assert status == 431 and "max_header_bytes" in json.loads(body)["error"]
    many = b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"b" * 60) for i in range(1200)
    )
    assert http_exchange(front.http_url, many + b"\r\n")[0] == 431
    for garbage in [b"HELLO\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n"]:
        status, body = http_exchange(front.http_url, garbage)
        assert status == 400 and json.loads(body)["error"]
    assert curl(f"http://{front.http_url}/v2/health/ready")[0] == 200  # and it still serves


def gzip_bomb(inflated: int) -> bytes:
    """A gzip body of a binary-data infer request for echo whose ``s`` input inflates to
    ``inflated`` bytes."""
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]},
                {
                    "name": "s",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": inflated + 4},
                },
            ]
        }
    ).encode()
    packer = zlib.compressobj(wbits=31)
    parts = [packer.compress(header), packer.compress(inflated.to_bytes(4, "little"))]
    zeros = bytes(1024 * 1024)
    for _ in range(inflated // len(zeros)):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return header, b"".join(parts)


def test_gzip_bomb_is_refused_and_triton_memory_and_shm_stay_flat(server, front):
    header, bomb = gzip_bomb(4 * LIMIT)
    assert len(bomb) < 10 * 1024
    infer = f"http://{front.http_url}/v2/models/echo/infer"
    small = json_infer_body([1.0], ["warm"])
    assert curl("--data-binary", "@-", infer, data=small)[0] == 200  # warm-up
    shm_before, rss_before = shm_sizes(server), rss_bytes(server.pid)
    assert shm_before and all(size <= LIMIT for size in shm_before.values())
    for encoding in ("gzip", "deflate"):
        body = bomb if encoding == "gzip" else zlib.compress(gzip.decompress(bomb))
        status, answer = curl(
            "--data-binary",
            "@-",
            "-H",
            f"Content-Encoding: {encoding}",
            "-H",
            f"Inference-Header-Content-Length: {len(header)}",
            infer,
            data=body,
        )
        assert status == 413, answer
        assert "inflated request body exceeds max_request_bytes" in json.loads(answer)["error"]
    # gRPC: 4 MiB of zeros gzip-compressed on the wire
    with grpcclient.InferenceServerClient(front.grpc_url) as client:
        inputs = echo_inputs(grpcclient, np.ones(1, np.float32), [bytes(4 * LIMIT)])
        with pytest.raises(grpcclient.InferenceServerException) as info:
            client.infer("echo", inputs, compression_algorithm="gzip")
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert curl("--data-binary", "@-", infer, data=small)[0] == 200  # still serving
    assert shm_sizes(server) == shm_before
    assert rss_bytes(server.pid) - rss_before < LIMIT  # the bomb was 4 MiB
    # Control: the same bomb straight to Triton grows the region for good.
    status, _ = curl(
        "--data-binary",
        "@-",
        "-H",
        "Content-Encoding: gzip",
        "-H",
        f"Inference-Header-Content-Length: {len(header)}",
        f"http://{server.http_url}/v2/models/echo/infer",
        data=bomb,
    )
    assert status == 200
    assert sum(shm_sizes(server).values()) > sum(shm_before.values()) + 3 * LIMIT


def test_bad_gzip_bodies_are_400(front):
    infer = f"http://{front.http_url}/v2/models/echo/infer"
    body = json_infer_body([1.0], ["a"])
    for data in [b"not gzip at all", gzip.compress(body)[:-12], gzip.compress(body) + b"junk"]:
        status, answer = curl(
            "--data-binary", "@-", "-H", "Content-Encoding: gzip", infer, data=data
        )
        assert status == 400, answer
        assert "gzip" in json.loads(answer)["error"]


# --- health ------------------------------------------------------------------------------------


def grpc_health_check(url: str) -> bytes:
    with grpc.insecure_channel(url) as channel:
        return channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)


@pytest.mark.usefixtures("reset_health")
def test_readiness_and_liveness_follow_the_callables(front, readiness, liveness):
    ready = f"http://{front.http_url}/v2/health/ready"
    live = f"http://{front.http_url}/v2/health/live"
    with grpcclient.InferenceServerClient(front.grpc_url) as client:
        assert curl(ready) == (200, b"") and curl(live) == (200, b"")
        assert client.is_server_ready() and client.is_server_live()
        assert grpc_health_check(front.grpc_url) == b"\x08\x01"  # SERVING

        readiness.value = (False, "denoiser_0_1 is dead")
        assert curl(ready) == (503, b'{"error":"denoiser_0_1 is dead"}')
        assert curl(live)[0] == 200
        assert not client.is_server_ready() and client.is_server_live()
        assert grpc_health_check(front.grpc_url) == b"\x08\x02"  # NOT_SERVING
        assert client.is_model_ready("echo")  # model readiness is Triton's own

        liveness.value = (False, "stuck")
        assert curl(live) == (503, b'{"error":"stuck"}')
        assert not client.is_server_live()
        readiness.value = liveness.value = (True, "")
        assert client.is_server_ready() and curl(ready)[0] == 200


def test_readiness_needs_triton_too(server):
    def boom():
        raise RuntimeError("probe broke")

    with Front(server.http_url, server.grpc_url, http_port=0, grpc_port=0, readiness=boom) as f:
        status, body = curl(f"http://{f.http_url}/v2/health/ready")
        assert status == 503 and "probe broke" in json.loads(body)["error"]
    dead_port = socket.socket()
    dead_port.bind(("127.0.0.1", 0))
    port = dead_port.getsockname()[1]
    dead_port.close()
    with Front(f"127.0.0.1:{port}", f"127.0.0.1:{port}", http_port=0, grpc_port=0) as f:
        status, body = curl(f"http://{f.http_url}/v2/health/ready")
        assert status == 503 and "triton unreachable" in json.loads(body)["error"]
        with grpcclient.InferenceServerClient(f.grpc_url) as client:
            assert not client.is_server_ready()
        assert curl(f"http://{f.http_url}/v2/models/echo")[0] == 502


# --- gRPC --------------------------------------------------------------------------------------


def test_tritonclient_grpc_gets_what_triton_gives(server, front):
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    s = [b"one", b"two"]
    results = []
    for url in (server.grpc_url, front.grpc_url):
        with grpcclient.InferenceServerClient(url) as client:
            result = client.infer("echo", echo_inputs(grpcclient, x, s), request_id="r1")
            results.append((result.get_response(), client.get_model_metadata("echo")))
    assert results[0] == results[1]
    assert results[1][0].id == "r1"


def test_grpc_metadata_reaches_triton_and_status_comes_back(server, front):
    answers = []
    for url in (server.grpc_url, front.grpc_url):
        with grpcclient.InferenceServerClient(url) as client:
            with pytest.raises(grpcclient.InferenceServerException) as info:
                client.get_model_config("echo")
            answers.append((info.value.status(), info.value.message()))
            headers = {f"triton-grpc-protocol-{ADMIN[0]}": ADMIN[1]}
            assert client.get_model_config("echo", headers=headers).config.name == "echo"
            with pytest.raises(grpcclient.InferenceServerException) as info:
                client.infer("nope", echo_inputs(grpcclient, np.ones(1, np.float32), [b""]))
            answers.append((info.value.status(), info.value.message()))
    assert answers[0] == answers[2] and answers[1] == answers[3]
    assert answers[0][0] == "StatusCode.UNAVAILABLE"
    # HTTP headers pass too
    config = f"http://{front.http_url}/v2/models/echo/config"
    assert curl(config)[0] == 403
    assert curl("-H", "{}: {}".format(*ADMIN), config)[0] == 200


def test_grpc_message_over_the_limit_is_resource_exhausted(front):
    with grpcclient.InferenceServerClient(front.grpc_url) as client:
        ok = client.infer(
            "echo", echo_inputs(grpcclient, np.ones(1, np.float32), [bytes(LIMIT // 2)])
        )
        assert ok.as_numpy("n")[0] == LIMIT // 2 + 4
        with pytest.raises(grpcclient.InferenceServerException) as info:
            client.infer("echo", echo_inputs(grpcclient, np.ones(1, np.float32), [bytes(LIMIT)]))
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_grpc_metadata_over_the_limit_is_resource_exhausted(front):
    with grpcclient.InferenceServerClient(front.grpc_url) as client:
        assert client.is_server_live(headers={"x-big": "a" * 30_000})
        with pytest.raises(grpcclient.InferenceServerException) as info:
            client.is_server_live(headers={"x-big": "a" * 70_000})
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.is_server_live()


def test_grpc_cancellation_and_deadline_reach_the_model(front, slow_log):
    count = len(slow_records(slow_log))
    ms = grpcclient.InferInput("ms", [1], "INT32")
    ms.set_data_from_numpy(np.array([5000], dtype=np.int32))
    with grpcclient.InferenceServerClient(front.grpc_url) as client:
        start = time.monotonic()
        with pytest.raises(grpcclient.InferenceServerException) as info:
            client.infer("slow", [ms], client_timeout=0.5)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        record = wait_for_record(slow_log, count + 1)
        assert record["cancelled"] and record["slept"] < 2000
        assert time.monotonic() - start < 3

        future = client.async_infer("slow", [ms], callback=lambda result, error: None)
        time.sleep(0.5)
        future.cancel()
        record = wait_for_record(slow_log, count + 2)
        assert record["cancelled"] and record["slept"] < 2000

        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer("slow", [ms])
        time.sleep(0.5)
        client.stop_stream(cancel_requests=True)
        record = wait_for_record(slow_log, count + 3)
        assert record["cancelled"] and record["slept"] < 2000


def test_grpc_stream_through_the_front(server, front):
    answers = []
    for url in (server.grpc_url, front.grpc_url):
        got = []
        with grpcclient.InferenceServerClient(url) as client:
            client.start_stream(callback=lambda result, error, got=got: got.append((result, error)))
            for n in (3, 2):
                inp = grpcclient.InferInput("n", [1], "INT32")
                inp.set_data_from_numpy(np.array([n], dtype=np.int32))
                client.async_stream_infer("stream", [inp], request_id=f"n{n}")
            deadline = time.monotonic() + 10
            while len(got) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            client.stop_stream()
        assert all(error is None for _, error in got), got
        answers.append(sorted((r.get_response().id, int(r.as_numpy("i")[0])) for r, _ in got))
    assert answers[0] == answers[1] == [("n2", 0), ("n2", 10), ("n3", 0), ("n3", 10), ("n3", 20)]


# --- HTTP infer over gRPC (cancel on disconnect) -----------------------------------------------


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False, None])
def test_translated_infer_answers_like_triton(server, xfront, binary_in, binary_out):
    x = np.array([0.1, -2.0, 3.5e10], dtype=np.float32)
    s = [b"ab", "\u00fcber".encode(), b""]
    bodies = []
    for url in (server.http_url, xfront.http_url):
        with httpclient.InferenceServerClient(url) as client:
            outputs = (
                None
                if binary_out is None
                else [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in "ytn"]
            )
            result = client.infer(
                "echo",
                echo_inputs(httpclient, x, s, binary_in),
                outputs=outputs,
                request_id="q",
                parameters={"color": "red", "level": 3},
            )
            bodies.append((result.get_response(), [result.as_numpy(n).tolist() for n in "ytn"]))
    assert bodies[0] == bodies[1]


def test_translated_infer_answers_curl_like_triton(server, xfront):
    body = json_infer_body([1.0, 0.1, -7.25], ['a"b', "\u00e9", ""])
    path = "/v2/models/echo/infer"
    direct = curl("-i", "--data-binary", "@-", f"http://{server.http_url}{path}", data=body)
    through = curl("-i", "--data-binary", "@-", f"http://{xfront.http_url}{path}", data=body)
    assert through[0] == direct[0] == 200
    head_d, _, body_d = direct[1].partition(b"\r\n\r\n")
    head_t, _, body_t = through[1].partition(b"\r\n\r\n")
    # The same JSON, keys in the same order. Not byte for byte: Triton's rapidjson writes
    # float32 0.1 as 0.10000000149011612 and 1.2 as 1.2000000476837159 (Grisu2), Python as
    # 1.2000000476837158 (shortest repr); both parse to the same double.
    assert json.loads(body_t, object_pairs_hook=list) == json.loads(body_d, object_pairs_hook=list)
    assert b"content-type: application/json" in head_t.lower()
    good = json.loads(body)
    x, s = good["inputs"]
    bad_bodies = [
        {"inputs": 5},
        {**good, "id": 5},
        {**good, "parameters": {"timeout": -1}},
        {**good, "parameters": {"triton_x": 1}},
        {**good, "outputs": [{"name": "zz"}]},
        {"inputs": [{**x, "shape": [2]}, s]},
        {"inputs": [{**x, "data": ["a"] * 3}, s]},
        {"inputs": [x]},
    ]
    for bad in bad_bodies:
        data = json.dumps(bad).encode()
        d = curl("--data-binary", "@-", f"http://{server.http_url}{path}", data=data)
        t = curl("--data-binary", "@-", f"http://{xfront.http_url}{path}", data=data)
        assert t == d and d[0] in (400, 500), bad
    # Not JSON: the same status, the parser's own words.
    d = curl("--data-binary", "@-", f"http://{server.http_url}{path}", data=b"{")
    t = curl("--data-binary", "@-", f"http://{xfront.http_url}{path}", data=b"{")
    assert t[0] == d[0] == 500 and b"failed to parse the request JSON buffer" in t[1]
    version = "/v2/models/echo/versions/7/infer"
    d = curl("--data-binary", "@-", f"http://{server.http_url}{version}", data=body)
    t = curl("--data-binary", "@-", f"http://{xfront.http_url}{version}", data=body)
    assert t == d and d[0] == 404


def test_http_client_that_disconnects_cancels_its_request(server, xfront, slow_log):
    count = len(slow_records(slow_log))
    body = json.dumps(
        {
            "inputs": [{"name": "ms", "shape": [1], "datatype": "INT32", "data": [5000]}],
            "parameters": {"timeout": 7000000},
        }
    ).encode()
    head = f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    host, port = xfront.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.5)
    record = wait_for_record(slow_log, count + 1)
    assert record["cancelled"] and record["slept"] < 2000
    assert record["timeout"] == 7000000  # the KServe timeout parameter arrives
    # A client that stays gets its answer.
    quick = body.replace(b"5000", b"50")
    status, answer = curl(
        "--data-binary", "@-", f"http://{xfront.http_url}/v2/models/slow/infer", data=quick
    )
    assert status == 200 and json.loads(answer)["outputs"][0]["data"][0] >= 50


def test_translated_infer_keeps_restricted_api_headers(tmp_path, start_triton_server, slow_log):
    """With ``inference`` restricted to a header, a translated request carries the header to
    Triton's gRPC endpoint, and a refusal reads as Triton's HTTP refusal (403)."""
    write_repository(tmp_path / "repo", slow_log)
    restricted = "inference:{}={}".format(*ADMIN)
    locked = start_triton_server(
        tmp_path / "repo",
        models=["echo"],
        extra_args=[
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
        ],
    )
    body = json_infer_body([1.0], ["a"])
    path = "/v2/models/echo/infer"
    key = "-H", "{}: {}".format(*ADMIN)
    with Front(
        locked.http_url, locked.grpc_url, http_port=0, grpc_port=0, cancel_on_disconnect=("echo",)
    ) as f:
        for args in [(), key]:
            d = curl(*args, "--data-binary", "@-", f"http://{locked.http_url}{path}", data=body)
            t = curl(*args, "--data-binary", "@-", f"http://{f.http_url}{path}", data=body)
            assert t == d
        assert d[0] == 200
    locked.stop()


def test_deadline_metadata_and_status_reach_the_upstream_call_and_back():
    """Triton does not report a call's deadline or the metadata it got, so a stand-in upstream
    (a plain gRPC server) tells what arrived."""
    from concurrent.futures import ThreadPoolExecutor

    seen = []

    def model_infer(request, context):
        seen.append((context.time_remaining(), dict(context.invocation_metadata())))
        context.send_initial_metadata((("x-up-initial", "1"),))
        if request == b"fail":
            context.set_trailing_metadata((("x-up-trailer", "err"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "upstream says no")
        context.set_trailing_metadata((("x-up-trailer", "ok"),))
        return request[::-1]

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},
    )
    upstream = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    try:
        with Front(None, f"127.0.0.1:{port}", grpc_port=0) as front:
            with grpc.insecure_channel(front.grpc_url) as channel:
                infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                metadata = (("x-key", "v"), ("triton-grpc-protocol-admin-key", "s"))
                response, call = infer.with_call(b"abc", timeout=3, metadata=metadata)
                assert response == b"cba"
                assert ("x-up-initial", "1") in call.initial_metadata()
                assert ("x-up-trailer", "ok") in call.trailing_metadata()
                with pytest.raises(grpc.RpcError) as info:
                    infer(b"fail", metadata=metadata)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert info.value.details() == "upstream says no"
                assert ("x-up-trailer", "err") in info.value.trailing_metadata()
                with pytest.raises(grpc.RpcError) as info:
                    channel.unary_unary("/other.Service/Method")(b"", timeout=3)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        upstream.stop(0)
    (remaining, got), (no_deadline, _) = seen
    assert 2 < remaining <= 3  # the client's deadline, less the time spent on the way
    assert no_deadline is None or no_deadline > 1e9  # none (gRPC reports it as 2**63 ns)
    assert got["x-key"] == "v" and got["triton-grpc-protocol-admin-key"] == "s"
