"""The metadata service itself: HTTP/1.1 requests from the guest in, responses out, as
Firecracker's MMDS answers them (docs/mmds/mmds-user-guide.md in Firecracker's repository).

- V1: GET without a token (a token, valid or not, is ignored); PUT /latest/api/token works too.
- V2: PUT /latest/api/token with `X-metadata-token-ttl-seconds` (1..21600) returns a session
  token; every GET must carry it in `X-metadata-token` (401 without it, or when it expired).
  The `X-aws-ec2-metadata-token*` spellings are accepted; a PUT with `X-Forwarded-For` is refused.
- The path is a JSON pointer into the data store; `Accept: application/json` returns JSON
  (compact, keys sorted), anything else the IMDS text format (an object lists its keys, objects
  with a trailing '/', a string is itself, other types are 501). `imds_compat` always answers
  IMDS text.
- Other methods: 405 with an Allow header.

Tokens hold no state here: a token is its expiry time and an HMAC of it under a key drawn when
the service starts, so no guest can grow a token table and a new service (a restored snapshot)
refuses old tokens. The data is read through a callable at each request, so the API's PUT and
PATCH /mmds are seen by the next request with no copy or lock (the API swaps whole objects).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

MAX_REQUEST = 8192  # request line, headers and body together
MAX_HEADERS = 64
TOKEN_PATH = "/latest/api/token"
MIN_TTL, MAX_TTL = 1, 21600
TOKEN_HEADERS = ("x-metadata-token", "x-aws-ec2-metadata-token")
TTL_HEADERS = ("x-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds")
REJECTED_HEADER = "x-forwarded-for"
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    501: "Not Implemented",
}
_EXPIRY = struct.Struct(">Q")
_MAC_LEN = 24

Version = Literal["V1", "V2"]


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    allow: str | None = None
    close: bool = False

    def encode(self) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, '')}",
            "Server: corral",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
        ]
        if self.allow:
            lines.append(f"Allow: {self.allow}")
        lines.append("Connection: close" if self.close else "Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


class BadRequest(Exception):
    """A request that cannot be parsed: answered 400, then the connection closes."""


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """The first complete request in `buf` and the bytes it took; None while incomplete.
    Raises BadRequest for a malformed or oversized one."""
    end = bytes(buf[:MAX_REQUEST]).find(b"\r\n\r\n")
    if end < 0:
        if len(buf) >= MAX_REQUEST:
            raise BadRequest("Request too large.")
        return None
    try:
        head = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("Invalid request: non-ASCII bytes in the request head.") from None
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("Invalid request line.")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest("Too many headers.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"Invalid header: {line[:64]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest("Transfer-Encoding is not supported: send a Content-Length.")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest("Invalid Content-Length.") from None
    start = end + 4
    if length < 0 or start + length > MAX_REQUEST:
        raise BadRequest("Request too large.")
    if len(buf) < start + length:
        return None
    body = bytes(buf[start : start + length])
    return Request(parts[0], parts[1], parts[2], headers, body), start + length


def request_path(target: str) -> str:
    """The absolute path of a request target (origin or absolute form), query dropped, runs of
    '/' folded into one."""
    if "://" in target:
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else ""
    target = target.split("?", 1)[0].split("#", 1)[0]
    while "//" in target:
        target = target.replace("//", "/")
    return target


def _lookup(data: Any, path: str) -> tuple[bool, Any]:
    """Follow the JSON pointer `path` (a trailing '/' ignored) into `data`: (found, value)."""
    node = data
    for raw in path.strip("/").split("/") if path.strip("/") else []:
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False, None
    return True, node


class Mmds:
    """One metadata service, shared by every interface that forwards to it."""

    def __init__(
        self,
        data: Callable[[], Any],
        *,
        version: Version = "V1",
        imds_compat: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data, self.version, self.imds_compat, self.clock = data, version, imds_compat, clock
        self._key = secrets.token_bytes(32)

    # -- tokens -----------------------------------------------------------------------------------
    def new_token(self, ttl: int) -> str:
        expiry = _EXPIRY.pack(int((self.clock() + ttl) * 1000))
        mac = hmac.new(self._key, expiry, hashlib.sha256).digest()[:_MAC_LEN]
        return base64.urlsafe_b64encode(expiry + mac).decode()

    def token_valid(self, token: str) -> bool:
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False
        if len(raw) != _EXPIRY.size + _MAC_LEN:
            return False
        expiry, mac = raw[: _EXPIRY.size], raw[_EXPIRY.size :]
        good = hmac.new(self._key, expiry, hashlib.sha256).digest()[:_MAC_LEN]
        return hmac.compare_digest(mac, good) and _EXPIRY.unpack(expiry)[0] > self.clock() * 1000

    # -- requests ---------------------------------------------------------------------------------
    def respond(self, req: Request) -> Response:
        path = request_path(req.target)
        if not path:
            return Response(400, b"Invalid URI.")
        if req.method == "GET":
            if self.version == "V2":
                token = next((req.headers[h] for h in TOKEN_HEADERS if h in req.headers), None)
                if token is None:
                    return Response(
                        401,
                        b"No MMDS token provided. Use `X-metadata-token` header to specify the "
                        b"session token.",
                    )
                if not self.token_valid(token):
                    return Response(401, b"MMDS token not valid.")
            return self._get(path, req)
        if req.method == "PUT":
            return self._put_token(path, req)
        return Response(405, b"Not allowed HTTP method.", allow="GET, PUT")

    def _get(self, path: str, req: Request) -> Response:
        found, value = _lookup(self.data(), path)
        if not found or (value is None and path.strip("/") == ""):
            return Response(404, f"Resource not found: {path}.".encode())
        wants_json = "application/json" in req.headers.get("accept", "") and not self.imds_compat
        if wants_json:
            text = json.dumps(value, separators=(",", ":"), sort_keys=True)
            return Response(200, text.encode(), "application/json")
        if isinstance(value, str):
            return Response(200, value.encode())
        if isinstance(value, dict):
            keys = [f"{k}/" if isinstance(v, dict) else k for k, v in sorted(value.items())]
            return Response(200, "\n".join(keys).encode())
        return Response(501, b"Cannot retrieve value. The value has an unsupported type.")

    def _put_token(self, path: str, req: Request) -> Response:
        if REJECTED_HEADER in req.headers:
            return Response(400, b"Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For")
        if path != TOKEN_PATH:
            return Response(404, f"Resource not found: {path}.".encode())
        name = next((h for h in TTL_HEADERS if h in req.headers), None)
        if name is None:
            return Response(
                400,
                b"Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to "
                b"specify the token's lifetime.",
            )
        raw = req.headers[name]
        if not raw.isdigit() or len(raw) > 12:
            reason = f"Invalid header. Reason: Invalid value. Key:{name}; Value:{raw[:32]}"
            return Response(400, reason.encode())
        ttl = int(raw)
        if not MIN_TTL <= ttl <= MAX_TTL:
            return Response(
                400,
                f"Invalid time to live value provided for token: {ttl}. Please provide a value "
                f"between {MIN_TTL} and {MAX_TTL}.".encode(),
            )
        return Response(200, self.new_token(ttl).encode())
