"""The control socket of a running machine: one JSON request per line over a Unix socket.

    corral run --api /tmp/vm.sock ...         # serves it while the guest runs
    {"op": "pause"} | {"op": "resume"} | {"op": "status"} | {"op": "stop"}
    {"op": "snapshot", "path": "/srv/snaps/a"}
    {"op": "migrate", "to": "10.0.0.2:7000", "downtime_ms": 300}

Each request gets one reply line, {"ok": true, ...} or {"ok": false, "error": "..."}; a
migration first streams {"progress": {...}} lines. Requests are validated (pydantic) before
anything is done, so a bad body changes nothing and says what was wrong.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from corral.errors import CorralError
from corral.unix_socket import listen_unix

if TYPE_CHECKING:
    from corral.machine import Machine

log = logging.getLogger(__name__)


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pause(_Req):
    op: Literal["pause"]


class Resume(_Req):
    op: Literal["resume"]


class Status(_Req):
    op: Literal["status"]


class Stop(_Req):
    op: Literal["stop"]


class Snapshot(_Req):
    op: Literal["snapshot"]
    path: str = Field(min_length=1, description="a new directory to write the snapshot to")


class Migrate(_Req):
    op: Literal["migrate"]
    to: str = Field(min_length=1, description="HOST:PORT where `corral receive` listens")
    downtime_ms: int = Field(default=300, ge=1, le=60_000)


class Balloon(_Req):
    op: Literal["balloon"]
    target: int | str | None = Field(default=None, description="bytes (or 256M, 1G) to take back; omit to only read")


Request = Annotated[Union[Pause, Resume, Status, Stop, Snapshot, Migrate, Balloon], Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)


def describe_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "request"
    return f"bad request: {where}: {e['msg']}"


class ControlServer:
    """Serves a machine's control socket on a thread until closed."""

    def __init__(self, machine: Machine, path: str | os.PathLike[str]) -> None:
        self.machine = machine
        self.path = Path(path)
        self._sock = listen_unix(self.path, "control socket", "--api path", backlog=4)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="corral-api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rwb")

            def send(obj: dict[str, Any]) -> None:
                f.write(json.dumps(obj).encode() + b"\n")
                f.flush()

            try:
                line = f.readline(1 << 16)
                try:
                    req = _REQUEST.validate_json(line)
                except ValidationError as exc:
                    send({"ok": False, "error": describe_error(exc)})
                    return
                try:
                    send({"ok": True, **self._do(req, send)})
                except CorralError as exc:
                    send({"ok": False, "error": str(exc)})
            except OSError:
                pass                                   # the client went away

    def _do(self, req: Request, send: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        m = self.machine
        if isinstance(req, Pause):
            m.pause()
        elif isinstance(req, Resume):
            m.resume()
        elif isinstance(req, Stop):
            m.stop("stopped through the control socket")
        elif isinstance(req, Snapshot):
            st = m.snapshot(req.path)
            return {"path": str(st.path), "seconds": st.seconds, "memory_bytes": st.memory_bytes_written,
                    "disk_bytes": st.disk_bytes}
        elif isinstance(req, Migrate):
            from corral.state.migration import migrate

            st = migrate(m, req.to, downtime_limit=req.downtime_ms / 1000,
                         progress=lambda r, sent, dirty: send(
                             {"progress": {"round": r, "sent": sent, "dirty": dirty}}))
            return {"rounds": st.rounds, "bytes_sent": st.bytes_sent, "seconds": st.total_seconds,
                    "downtime_ms": st.downtime_seconds * 1000, "throttle": st.throttle}
        elif isinstance(req, Balloon):
            from corral.config import parse_size

            if req.target is not None:
                m.set_balloon(parse_size(req.target))
            return m.balloon_info()
        return {"state": "paused" if m.paused else "running", "cpus": m.config.cpus,
                "memory": m.config.memory}

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass


def call(path: str | os.PathLike[str], request: dict[str, Any],
         on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Send one request to a machine's control socket; returns the reply or raises CorralError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except FileNotFoundError:
        raise CorralError(f"no control socket at {path}: start the VM with --api {path}") from None
    except OSError as exc:
        raise CorralError(f"cannot reach the VM at {path}: {exc.strerror} (is it still running?)") from None
    with s:
        f = s.makefile("rwb")
        f.write(json.dumps(request).encode() + b"\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                raise CorralError(f"the VM at {path} closed the connection without answering")
            reply = json.loads(line)
            if "progress" in reply:
                if on_progress:
                    on_progress(reply["progress"])
                continue
            if not reply.get("ok"):
                raise CorralError(reply.get("error", "the VM refused the request"))
            return reply


__all__ = ["ControlServer", "call", "Request"]
