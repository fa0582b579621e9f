"""The control socket of a running machine: one JSON request per line over a Unix socket.

    corral run --api /tmp/vm.sock ...         # serves it while the guest runs
    {"op": "pause"} | {"op": "resume"} | {"op": "status"} | {"op": "stop"}
    {"op": "snapshot", "path": "/srv/snaps/a"}
    {"op": "migrate", "to": "10.0.0.2:7000", "downtime_ms": 300, "token": "...", "tls_pin": "..."}

Each request gets one reply line, {"ok": true, ...} or {"ok": false, "error": "..."}; a
migration first streams {"progress": {...}} lines. Requests are validated (pydantic) before
anything is done, so a bad body changes nothing and says what was wrong.

The socket is 0600 (backends/unix_socket.py), and each connection's peer is checked besides
(SO_PEERCRED): only the VMM's own uid and root are served, so a socket an operator made wider
(chmod, a shared directory) still lets no other user stop the VM or copy its RAM out.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from corral.backends.unix_socket import listen_unix
from corral.config import parse_size
from corral.devices.virtio.balloon import BalloonInfo
from corral.errors import CorralError
from corral.machine import Machine, MachineStatus
from corral.migration import MigrationStats, migrate
from corral.seccomp import enter as enter_seccomp
from corral.state.snapshot import SnapshotStats

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
    token: str | None = Field(
        default=None, min_length=16, max_length=4096, repr=False, description="the receiver's shared token"
    )
    tls_pin: str | None = Field(
        default=None, max_length=200, description="SHA-256 of the receiver's TLS certificate"
    )
    insecure: bool = Field(default=False, description="send to a receiver that checks no token")


class Balloon(_Req):
    op: Literal["balloon"]
    target: int | str | None = Field(
        default=None, description="bytes (or 256M, 1G) to take back; omit to only read"
    )


Request = Annotated[Pause | Resume | Status | Stop | Snapshot | Migrate | Balloon, Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)


def describe_error(exc: ValidationError) -> str:
    e = exc.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "request"
    return f"bad request: {where}: {e['msg']}"


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (as it was at connect)."""
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


class ControlServer:
    """Serves a machine's control socket on a thread until closed."""

    def __init__(self, machine: Machine, path: str | os.PathLike[str]) -> None:
        self.machine = machine
        self.path = Path(path)
        self._sock = listen_unix(self.path, "control socket", "path", backlog=4)
        self._closed = False
        self._refused: set[int] = set()
        self._thread = threading.Thread(target=self._serve, name="corral-api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        enter_seccomp("api", "corral-api")  # the connections' threads inherit it
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._admit(conn):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _admit(self, conn: socket.socket) -> bool:
        """Serve only the VMM's own uid and root; anyone else gets one refusal line (never
        waited on: the accept loop must not block) and is hung up on."""
        own = os.geteuid()
        try:
            uid = _peer_uid(conn)
        except OSError:
            conn.close()
            return False
        if uid in (0, own):
            return True
        who = "root" if own == 0 else f"uid {own} and root"
        line = {"ok": False, "error": f"uid {uid} may not control this VM: only {who} may"}
        try:
            conn.send(json.dumps(line).encode() + b"\n", socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()
        if uid not in self._refused:  # once per uid: a user connecting in a loop floods nothing
            self._refused.add(uid)
            log.warning("control socket %s: refused a connection from uid %d", self.path, uid)
        return False

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
                pass  # the client went away

    def _do(self, req: Request, send: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        m = self.machine
        if isinstance(req, Pause):
            m.pause()
        elif isinstance(req, Resume):
            m.resume()
        elif isinstance(req, Stop):
            m.stop("stopped through the control socket")
        elif isinstance(req, Snapshot):
            return m.snapshot(req.path).model_dump(mode="json")
        elif isinstance(req, Migrate):
            st = migrate(
                m,
                req.to,
                token=req.token,
                tls_pin=req.tls_pin,
                insecure=req.insecure,
                downtime_limit=req.downtime_ms / 1000,
                progress=lambda r, sent, dirty: send(
                    {"progress": MigrationProgress(round=r, sent=sent, dirty=dirty).model_dump()}
                ),
            )
            return st.model_dump(mode="json")
        elif isinstance(req, Balloon):
            if req.target is not None:
                m.set_balloon(parse_size(req.target))
            return m.balloon_info().model_dump(mode="json")
        return m.status().model_dump(mode="json")

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass


class NoControlSocket(CorralError):
    """Nothing serves a control socket at the path given."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(f"no control socket at {path}")
        self.path = str(path)


class ControlClient:
    """Typed verbs over a machine's control socket: what the CLI (and any embedder) calls.

    >>> ControlClient("/tmp/vm.sock").snapshot("/srv/snaps/a").memory_bytes_written
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def pause(self) -> None:
        call(self.path, Pause(op="pause"))

    def resume(self) -> None:
        call(self.path, Resume(op="resume"))

    def stop(self) -> None:
        call(self.path, Stop(op="stop"))

    def status(self) -> MachineStatus:
        return MachineStatus.model_validate(call(self.path, Status(op="status")))

    def snapshot(self, path: str | os.PathLike[str]) -> SnapshotStats:
        return SnapshotStats.model_validate(call(self.path, Snapshot(op="snapshot", path=str(path))))

    def balloon(self, target: int | None = None) -> BalloonInfo:
        """Set the balloon to `target` bytes (None: leave it) and report it."""
        return BalloonInfo.model_validate(call(self.path, Balloon(op="balloon", target=target)))

    def migrate(
        self,
        to: str,
        downtime_ms: int = 300,
        on_progress: Callable[[MigrationProgress], None] | None = None,
        *,
        token: str | None = None,
        tls_pin: str | None = None,
        insecure: bool = False,
    ) -> MigrationStats:
        """Migrate the VM to `corral receive` at `to`, proving `token` (corral.migration.migrate)."""
        return MigrationStats.model_validate(
            call(
                self.path,
                Migrate(
                    op="migrate",
                    to=to,
                    downtime_ms=downtime_ms,
                    token=token,
                    tls_pin=tls_pin,
                    insecure=insecure,
                ),
                (lambda p: on_progress(MigrationProgress.model_validate(p))) if on_progress else None,
            )
        )


class MigrationProgress(BaseModel):
    """One pre-copy round of a migration in flight."""

    round: int
    sent: int  # bytes sent so far
    dirty: int  # bytes the guest dirtied meanwhile (still to send)


def call(
    path: str | os.PathLike[str],
    request: Request | dict[str, Any],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Send one request to a machine's control socket; returns the reply's fields or raises
    CorralError. ControlClient wraps this with typed replies."""
    body = request.model_dump(mode="json", exclude_none=True) if isinstance(request, BaseModel) else request
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except FileNotFoundError:
        raise NoControlSocket(path) from None
    except OSError as exc:
        raise CorralError(f"cannot reach the VM at {path}: {exc.strerror} (is it still running?)") from None
    with s:
        try:
            s.sendall(json.dumps(body).encode() + b"\n")
        except OSError:
            pass  # it hung up before reading (it refused us): its reply line says why
        f = s.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                raise CorralError(f"the VM at {path} closed the connection without answering")
            reply = json.loads(line)
            if "progress" in reply:
                if on_progress:
                    on_progress(reply["progress"])
                continue
            if not reply.pop("ok", False):
                raise CorralError(reply.get("error", "the VM refused the request"))
            return reply


__all__ = ["ControlClient", "ControlServer", "MigrationProgress", "NoControlSocket", "Request", "call"]
