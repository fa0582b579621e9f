"""HTTP/1.1 on a Unix socket, as Firecracker's API server speaks it: stdlib only.

Each connection is kept alive for as many requests as the client sends. What a client sends is
bounded before it is read: the request line and headers by http.server's limits, the body by
`max_body` (Firecracker's default, 51200 bytes): a larger body is answered 400 at once from its
Content-Length, the connection is closed, and at most `DRAIN_MAX` bytes of it are read and
dropped first (so the client reads the answer instead of a reset). Chunked bodies are refused.
The number of connections is capped; an idle connection is closed after `IDLE_TIMEOUT`. Every
failure is answered with a JSON fault message; nothing a client sends ends the server.

A reply may stream (`Reply.stream`: a long verb such as a migration reports as it goes): it is
sent chunked, one JSON document per line, and the connection closes after it.

The socket is 0600 (backends/unix_socket.py), and each connection's peer is checked besides
(SO_PEERCRED): only the server's own uid and root are served, so a socket an operator made wider
(chmod, a shared directory) still lets no other user stop the VM or copy its RAM out. Anyone
else gets one 403 (sent without waiting: the accept loop never blocks) and is hung up on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from corral.backends.unix_socket import listen_unix, peer_allowed, peer_uid
from corral.seccomp import enter as enter_seccomp

log = logging.getLogger(__name__)

MAX_BODY = 51200  # Firecracker's --http-api-max-payload-size default
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 300.0  # seconds a connection may sit idle
DRAIN_MAX = 4 << 20  # bytes of a refused body read and dropped before closing
DRAIN_SECONDS = 2.0
CLOSE_GRACE = 5.0  # seconds close() waits for requests in flight (a migration's last line)

Emit = Callable[[Any], None]


@dataclass
class Reply:
    """One HTTP answer: status, JSON body (None: no body), extra headers; `fatal` ends the
    process once it is sent."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    fatal: bool = False
    # a streamed 200: called with `emit` once the headers are sent; each emit sends one line
    stream: Callable[[Emit], None] | None = None


Handle = Callable[[str, str, bytes | None], Reply]


class RequestHandler(BaseHTTPRequestHandler):
    """One connection's HTTP/1.1 requests, each answered by the server's `handle`; the daemon's
    server subclasses it (and HttpServer) for its own socket."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: HttpServer

    def version_string(self) -> str:
        return "Firecracker API"  # the Server header Firecracker sends

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(_fault("Transfer-Encoding is not supported: send the body with a Content-Length."))
            return
        raw_length = self.headers.get("Content-Length", "0").strip()
        if not raw_length.isdigit() or len(raw_length) > 18:
            self.close_connection = True
            self._send(_fault(f"Invalid Content-Length: {raw_length[:32]!r}."))
            return
        length = int(raw_length)
        if length > self.server.max_body:
            self.close_connection = True
            self._send(
                _fault(
                    f"Request payload with size {length} is larger than the limit of "
                    f"{self.server.max_body} allowed by server."
                )
            )
            self._drain(length)
            return
        body = self.rfile.read(length) if length else None
        if body is not None and len(body) < length:
            self.close_connection = True
            return  # the client hung up mid-body
        with self.server.in_flight():
            try:
                reply = self.server.api_handle(method, self.path, body)
            except Exception:  # a bug must cost one request, never the server
                log.exception("internal error serving %s %s", method, self.path)
                reply = Reply(500, {"fault_message": "Internal Server Error: see the corral log"})
            if reply.stream is not None:
                self._send_stream(reply.stream)
                return
            self._send(reply)
        if reply.fatal:
            self.close_connection = True
            self.server.on_fatal()

    def _send_stream(self, stream: Callable[[Emit], None]) -> None:
        """A 200 whose body is JSON lines, sent chunked as `stream` emits them. A client that
        goes away costs only its own lines: the verb runs to its end."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        gone = False

        def emit(obj: Any) -> None:
            nonlocal gone
            if gone:
                return
            data = json.dumps(obj).encode() + b"\n"
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            except OSError:
                gone = True

        try:
            stream(emit)
        except Exception:  # a bug must cost one request, never the server
            log.exception("internal error streaming %s", self.path)
            emit({"fault_message": "Internal Server Error: see the corral log"})
        if not gone:
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        if reply.body is not None:
            data = json.dumps(reply.body).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        else:
            data = b""
            if reply.status != 204:
                self.send_header("Content-Length", "0")
        self.send_header("Connection", "close" if self.close_connection else "keep-alive")
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _drain(self, length: int) -> None:
        """Read and drop up to DRAIN_MAX bytes of a refused body, briefly."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_SECONDS
            left = min(length, DRAIN_MAX)
            self.connection.settimeout(DRAIN_SECONDS)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (bad request line, oversized headers, unknown method), in
        Firecracker's JSON shape."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # never answer in HTTP/0.9's headerless form
        try:
            self._send(_fault(message or explain or "Bad Request", 400 if code == 501 else code))
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)


def _fault(message: str, status: int = 400) -> Reply:
    return Reply(status, {"fault_message": message})


def refusal(uid: int) -> str:
    """Why a peer with `uid` is not served."""
    own = os.geteuid()
    who = "root" if own == 0 else f"uid {own} and root"
    return f"uid {uid} may not control this VM: only {who} may"


class HttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per connection on an already-bound socket, bounded in connections and body size."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self, sock: socket.socket, handle: Handle, on_fatal: Callable[[], None], max_body: int
    ) -> None:
        super().__init__(sock.getsockname(), RequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.api_handle = handle
        self.on_fatal = on_fatal
        self.max_body = max_body
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._busy = 0
        self._idle = threading.Condition()
        self._refused: set[int] = set()

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        """Count a request being answered (close() waits for them)."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Serve only this process's uid and root (SO_PEERCRED)."""
        uid = peer_uid(request)
        if uid is None:
            return False
        if peer_allowed(request):
            return True
        data = json.dumps({"fault_message": refusal(uid)}).encode()
        head = (
            f"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            request.send(head + data, socket.MSG_DONTWAIT)
        except OSError:
            pass
        if uid not in self._refused:  # once per uid: a user connecting in a loop floods nothing
            self._refused.add(uid)
            log.warning("API socket: refused a connection from uid %d", uid)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("api: %d connections open: refusing another", MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("api: a connection ended with an error", exc_info=True)  # noqa: LOG014


class ApiServer:
    """Serves `handle` (method, target, body or None) -> Reply on the Unix socket `path`, on a
    thread, until closed. `on_fatal` runs after a fatal reply has been sent."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        handle: Handle,
        *,
        on_fatal: Callable[[], None] = lambda: None,
        max_body: int = MAX_BODY,
        what: str = "API socket",
        flag: str = "--api-sock",
        seccomp_kind: str = "vmm",
    ) -> None:
        self.path = Path(path)
        sock = listen_unix(self.path, what, flag, backlog=MAX_CONNECTIONS)
        self._server = HttpServer(sock, handle, on_fatal, max_body)
        self._seccomp_kind = seccomp_kind
        self._thread = threading.Thread(target=self._serve, name="corral-fc-api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        # The connections' threads inherit this thread's filter. Under `corral firecracker`,
        # InstanceStart and snapshot loads build the machine on them: the VMM's list.
        enter_seccomp(self._seccomp_kind, "corral-api")
        # No poll interval: an idle server sleeps in select() until a client comes (close() wakes
        # it by connecting), so a thousand idle VMs cost their host no wake-ups.
        self._server.serve_forever(poll_interval=None)  # type: ignore[arg-type]  # select() blocks

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop serving; requests in flight get up to `grace` seconds to send their answer."""
        stopper = threading.Thread(target=self._server.shutdown, name="corral-fc-api-stop", daemon=True)
        stopper.start()
        deadline = time.monotonic() + grace  # a socket path someone unlinked cannot be poked
        while stopper.is_alive() and time.monotonic() < deadline:  # poke until the loop sees the flag
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as poke:
                try:
                    poke.connect(str(self.path))
                except OSError:
                    pass
            stopper.join(0.05)
        self._server.server_close()
        self._server.wait_idle(grace)
        try:
            self.path.unlink()
        except OSError:
            pass


__all__ = ["MAX_BODY", "ApiServer", "Emit", "Reply", "refusal"]
