"""HTTP/1.1 clients over a Unix socket (or TCP): the daemon's client of each VM's Firecracker
API, and the CLI's client of the daemon. Replies are bounded; a peer that does not answer within
the timeout is an ApiError, as is any fault it answers."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from corral.errors import CorralError

REPLY_MAX = 16 << 20
LINE_MAX = 1 << 20  # one line of a JSON-lines reply


class ApiError(CorralError):
    """A request that failed: the peer's fault message, or why it could not be asked."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


class HttpClient:
    """One request per connection, JSON in and out. `where` is a Unix socket path, or
    `tcp:HOST:PORT`; `token` is sent as a bearer token."""

    def __init__(self, where: str, *, timeout: float = 30.0, token: str | None = None) -> None:
        self.where = where
        self.timeout = timeout
        self.token = token

    def _connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        t = self.timeout if timeout is None else timeout
        if self.where.startswith("tcp:"):
            host, _, port = self.where[4:].rpartition(":")
            return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=t)
        return UnixHTTPConnection(self.where, t)

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str, body: Any) -> None:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn.request(method, path, body=data, headers=headers)

    def call(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        """The reply's JSON (None for an empty reply); a status >= 300 raises ApiError."""
        status, raw, ctype = self.raw(method, path, body, timeout=timeout)
        if "json" not in ctype:
            return raw.decode(errors="replace") if raw else None
        try:
            reply = json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(f"{self.where} answered {method} {path} with bad JSON", status) from None
        if status >= 300:
            msg = reply.get("fault_message") if isinstance(reply, dict) else None
            raise ApiError(str(msg or f"{method} {path}: HTTP {status}"), status)
        return reply

    def raw(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> tuple[int, bytes, str]:
        conn = self._connect(timeout)
        try:
            self._send(conn, method, path, body)
            r = conn.getresponse()
            raw = r.read(REPLY_MAX + 1)
            if len(raw) > REPLY_MAX:
                raise ApiError(f"{self.where}: the reply to {method} {path} is too large")
            if r.status >= 300 and "json" not in (r.getheader("Content-Type") or ""):
                raise ApiError(f"{method} {path}: HTTP {r.status}", r.status)
            return r.status, raw, r.getheader("Content-Type") or ""
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"cannot reach {self.where}: {exc}") from None
        finally:
            conn.close()

    def lines(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Iterator[Any]:
        """A request whose 200 reply is JSON lines (a migration's progress): each line's JSON
        as it comes; `timeout` bounds each wait for the next line."""
        conn = self._connect(timeout)
        try:
            self._send(conn, method, path, body)
            r = conn.getresponse()
            if r.status >= 300:
                raise _fault(r, method, path)
            while line := r.readline(LINE_MAX + 1):
                if len(line) > LINE_MAX:
                    raise ApiError(f"{self.where}: a line of the reply to {method} {path} is too long")
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise ApiError(f"{self.where} answered {method} {path} with bad JSON") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"the reply from {self.where} broke: {exc}") from None
        finally:
            conn.close()

    def stream(self, path: str) -> Iterator[bytes]:
        """GET `path` and yield the reply body as it arrives (a chunked stream), until it ends."""
        conn = self._connect(None)
        conn.timeout = None
        try:
            self._send(conn, "GET", path, None)
            r = conn.getresponse()
            if r.status >= 300:
                raise _fault(r, "GET", path)
            while chunk := r.read1(65536):
                yield chunk
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(f"the stream from {self.where} broke: {exc}") from None
        finally:
            conn.close()


def _fault(r: http.client.HTTPResponse, method: str, path: str) -> ApiError:
    """The ApiError for a reply of status >= 300: its fault message, or the status."""
    raw = r.read(REPLY_MAX)
    try:
        msg = json.loads(raw).get("fault_message")
    except (ValueError, AttributeError):
        msg = None
    return ApiError(str(msg or f"{method} {path}: HTTP {r.status}"), r.status)


__all__ = ["ApiError", "HttpClient"]
