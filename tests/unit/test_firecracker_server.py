"""The Firecracker API's HTTP server (corral/firecracker/server.py) on a real Unix socket: keep-alive,
JSON faults for everything malformed, a body cap that answers before reading an oversized body,
and a server that keeps serving whatever a client sends. The handler here is a plain function."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from corral.firecracker.server import MAX_BODY, ApiServer, Reply


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None):
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    r = conn.getresponse()
    raw = r.read()
    return r.status, (json.loads(raw) if raw else None), r


@pytest.fixture
def served(tmp_path):
    seen: list[tuple[str, str, bytes | None]] = []
    fatal = threading.Event()

    def handle(method: str, target: str, body: bytes | None) -> Reply:
        seen.append((method, target, body))
        if target == "/boom":
            raise RuntimeError("a bug")
        if target == "/fatal":
            return Reply(400, {"fault_message": "load failed"}, fatal=True)
        if method == "GET":
            return Reply(200, {"path": target})
        return Reply(204, headers={"Deprecation": "true"} if target == "/old" else {})

    path = tmp_path / "api.sock"
    server = ApiServer(path, handle, on_fatal=fatal.set)
    yield str(path), seen, fatal
    server.close()
    assert not path.exists()


def raw_exchange(path: str, data: bytes, timeout: float = 5) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    return out


def test_keep_alive_serves_many_requests_on_one_connection(served):
    path, seen, _ = served
    conn = UnixHTTPConnection(path)
    for i in range(5):
        status, body, r = request(conn, "GET", f"/x{i}")
        assert status == 200 and body == {"path": f"/x{i}"}
        assert r.getheader("Connection") == "keep-alive"
        assert r.getheader("Content-Type") == "application/json"
        assert r.getheader("Server") == "Firecracker API"
    status, body, r = request(conn, "PUT", "/old", {"a": 1})
    assert status == 204 and body is None and r.getheader("Deprecation") == "true"
    assert seen[-1] == ("PUT", "/old", b'{"a": 1}')
    conn.close()


def test_an_empty_body_reaches_the_handler_as_none(served):
    path, seen, _ = served
    status, _, _ = request(UnixHTTPConnection(path), "PUT", "/x", b"")
    assert status == 204 and seen[-1] == ("PUT", "/x", None)


def test_an_oversized_body_is_refused_and_the_server_serves_on(served):
    path, seen, _ = served
    conn = UnixHTTPConnection(path)
    status, body, r = request(conn, "PUT", "/drives/a", b"x" * (2 << 20))
    assert status == 400 and "larger than the limit" in body["fault_message"]
    assert str(MAX_BODY) in body["fault_message"] and r.getheader("Connection") == "close"
    assert not seen  # the handler never saw it
    status, body, _ = request(UnixHTTPConnection(path), "GET", "/")
    assert status == 200


def test_a_100mb_body_is_answered_from_its_length_alone(served):
    path, seen, _ = served
    t0 = time.monotonic()
    out = raw_exchange(path, b"PUT /mmds HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n{")
    assert out.startswith(b"HTTP/1.1 400") and b"larger than the limit" in out
    assert time.monotonic() - t0 < 4 and not seen


@pytest.mark.parametrize(
    "data",
    [
        b"NONSENSE\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 12x\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
        b"BREW /pot HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_requests_get_a_json_fault(served, data):
    path, _, _ = served
    out = raw_exchange(path, data)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 4"), out[:200]
    assert "fault_message" in json.loads(body)
    status, _, _ = request(UnixHTTPConnection(path), "GET", "/")
    assert status == 200


def test_a_handler_bug_costs_one_request(served):
    path, _, _ = served
    conn = UnixHTTPConnection(path)
    status, body, _ = request(conn, "GET", "/boom")
    assert status == 500 and "fault_message" in body
    assert request(conn, "GET", "/")[0] == 200


def test_clients_that_hang_up_mid_request_do_not_hurt(served):
    path, _, _ = served
    for data in (b"PUT /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", b"GET / HT", b""):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(data)
        s.close()
    assert request(UnixHTTPConnection(path), "GET", "/")[0] == 200


def test_a_fatal_reply_is_sent_then_reported(served):
    path, _, fatal = served
    status, body, _ = request(UnixHTTPConnection(path), "PUT", "/fatal", {})
    assert status == 400 and body == {"fault_message": "load failed"}
    assert fatal.wait(2)


def test_a_live_socket_is_not_taken_over(served, tmp_path):
    path, _, _ = served
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="in use"):
        ApiServer(path, lambda *a: Reply(204))
