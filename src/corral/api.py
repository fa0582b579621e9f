"""The control socket of a running machine: Firecracker's REST API (HTTP/1.1 on a Unix socket),
with corral's own endpoints beside it. One protocol for every client:

    corral run --api /tmp/vm.sock ...      # serves it while the guest runs
    curl --unix-socket /tmp/vm.sock -X PATCH localhost/vm -d '{"state": "Paused"}'
    curl --unix-socket /tmp/vm.sock localhost/corral/status
    curl --unix-socket /tmp/vm.sock localhost/corral/openapi.json    # every endpoint, typed

The server is corral.firecracker's (server.py: bounded HTTP, 0600 socket, only the VMM's uid and
root served through SO_PEERCRED; routes.py: the route table) over a FirecrackerVmm attached to
the running Machine. ControlClient keeps typed verbs for the CLI and for embedders; its replies
are the same pydantic models the server sends (MachineStatus, SnapshotStats, BalloonInfo,
MigrationStats), and a refusal is a CorralError carrying the server's fault message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from corral.debug.dump import DumpStats
from corral.debug.stats import ExitStats
from corral.devices.virtio.balloon import BalloonInfo
from corral.errors import CorralError
from corral.firecracker.models import (
    CorralBalloon,
    CorralDump,
    CorralMigrate,
    CorralSnapshot,
    CorralStats,
    MigrationProgress,
    Vm,
)
from corral.firecracker.routes import Router
from corral.firecracker.server import ApiServer
from corral.firecracker.vmm import FirecrackerVmm
from corral.machine import Machine, MachineStatus
from corral.migration import MigrationStats
from corral.state.snapshot import SnapshotStats

M = TypeVar("M", bound=BaseModel)

REPLY_MAX = 16 << 20  # bytes of a reply body read (the OpenAPI document is the largest)
LINE_MAX = 1 << 20  # bytes of one streamed line
TIMEOUT = 60.0  # seconds a reply may take (a migration's lines come at least this often)


class ControlServer:
    """Serves a machine's control socket (Firecracker's API + corral's) on a thread until closed."""

    def __init__(self, machine: Machine, path: str | os.PathLike[str], instance_id: str = "corral") -> None:
        self.machine = machine
        self.path = Path(path)
        self.vmm = FirecrackerVmm.attached(machine, instance_id)
        self._server = ApiServer(
            self.path, Router(self.vmm).handle, what="control socket", flag="--api", seccomp_kind="api"
        )

    def close(self) -> None:
        self._server.close()


class NoControlSocket(CorralError):
    """Nothing serves a control socket at the path given."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(f"no control socket at {path}")
        self.path = str(path)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ControlClient:
    """Typed verbs over a machine's control socket: what the CLI (and any embedder) calls.

    >>> ControlClient("/tmp/vm.sock").snapshot("/srv/snaps/a").memory_bytes_written
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def pause(self) -> None:
        self.request("PATCH", "/vm", Vm(state="Paused"))

    def resume(self) -> None:
        self.request("PATCH", "/vm", Vm(state="Resumed"))

    def stop(self) -> None:
        self.request("PUT", "/corral/stop")

    def wake(self) -> None:
        """Wake a guest suspended to RAM (ACPI S3)."""
        self.request("PUT", "/corral/wake")

    def status(self) -> MachineStatus:
        return _typed(MachineStatus, self.request("GET", "/corral/status"))

    def snapshot(self, path: str | os.PathLike[str]) -> SnapshotStats:
        return _typed(SnapshotStats, self.request("PUT", "/corral/snapshot", CorralSnapshot(path=str(path))))

    def balloon(self, target: int | str | None = None) -> BalloonInfo:
        """Set the balloon to `target` bytes (or "256M"; None: leave it) and report it."""
        if target is None:
            return _typed(BalloonInfo, self.request("GET", "/corral/balloon"))
        return _typed(
            BalloonInfo, self.request("PATCH", "/corral/balloon", _model(CorralBalloon, target=target))
        )

    def dump(self, path: str | os.PathLike[str]) -> DumpStats:
        """Write an ELF core of the guest to `path` (a new file, on the VM's host)."""
        return _typed(DumpStats, self.request("PUT", "/corral/dump", CorralDump(path=str(path))))

    def stats(self, enabled: bool | None = None) -> ExitStats:
        """The VM's exit statistics; with `enabled`, start or stop counting first."""
        if enabled is None:
            return _typed(ExitStats, self.request("GET", "/corral/stats"))
        return _typed(ExitStats, self.request("PATCH", "/corral/stats", CorralStats(enabled=enabled)))

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3 document of every endpoint this socket serves."""
        doc = self.request("GET", "/corral/openapi.json")
        if not isinstance(doc, dict):
            raise CorralError(f"the VM at {self.path} sent no OpenAPI document")
        return doc

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
        """Migrate the VM to `corral receive` at `to`, proving `token` (corral.migration.migrate);
        `on_progress` hears each pre-copy round as the VM streams it."""
        body = _model(
            CorralMigrate, to=to, downtime_ms=downtime_ms, token=token, tls_pin=tls_pin, insecure=insecure
        )
        result: Any = None
        for line in self.stream("PUT", "/corral/migrate", body):
            if "fault_message" in line:
                raise CorralError(str(line["fault_message"]))
            if "progress" in line and on_progress is not None:
                on_progress(_typed(MigrationProgress, line["progress"]))
            if "result" in line:
                result = line["result"]
        if result is None:
            raise CorralError(f"the VM at {self.path} ended the migration's reply without a result")
        return _typed(MigrationStats, result)

    # -- the wire ---------------------------------------------------------------------------------
    def request(self, method: str, target: str, body: BaseModel | None = None) -> Any:
        """One request; the reply's JSON (None for a 204), or CorralError with its fault."""
        conn, resp = self._send(method, target, body)
        try:
            raw = resp.read(REPLY_MAX + 1)
            if len(raw) > REPLY_MAX:
                raise CorralError(f"the VM at {self.path} sent a reply larger than {REPLY_MAX >> 20} MiB")
            data = _json(raw, self.path) if raw else None
            if resp.status >= 300:
                raise CorralError(_fault(data, resp.status))
            return data
        except (OSError, http.client.HTTPException) as exc:
            raise self._lost(exc) from None
        finally:
            conn.close()

    def stream(self, method: str, target: str, body: BaseModel | None = None) -> Iterator[Any]:
        """One request whose 200 reply is JSON lines: yields each line's JSON as it comes (no
        time limit: a migration's last copy may take long)."""
        conn, resp = self._send(method, target, body, timeout=None)
        try:
            if resp.status >= 300:
                raw = resp.read(REPLY_MAX)
                raise CorralError(_fault(_json(raw, self.path) if raw else None, resp.status))
            while True:
                try:
                    line = resp.readline(LINE_MAX)
                except (OSError, http.client.HTTPException) as exc:
                    raise self._lost(exc) from None
                if not line:
                    return
                if line.strip():
                    yield _json(line, self.path)
        finally:
            conn.close()

    def _send(
        self, method: str, target: str, body: BaseModel | None, timeout: float | None = TIMEOUT
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = _UnixConnection(str(self.path), self.timeout if timeout is not None else None)
        data = None if body is None else body.model_dump_json(exclude_none=True).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.connect()
        except FileNotFoundError:
            raise NoControlSocket(self.path) from None
        except OSError as exc:
            raise CorralError(
                f"cannot reach the VM at {self.path}: {exc.strerror or exc} (is it still running?)"
            ) from None
        try:
            try:
                conn.request(method, target, body=data, headers=headers)
            except OSError:
                pass  # it hung up before reading (it refused us): its answer says why
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._lost(exc) from None

    def _lost(self, exc: BaseException) -> CorralError:
        if isinstance(exc, TimeoutError):
            return CorralError(f"the VM at {self.path} did not answer within {self.timeout:g} s")
        return CorralError(f"the VM at {self.path} closed the connection without answering")


def _model(model: type[BaseModel], **fields: Any) -> Any:
    """A request body built from a caller's arguments: a bad one is a one-line CorralError."""
    try:
        return model(**fields)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "request"
        raise CorralError(f"bad request: {where}: {e['msg']}") from None


def _typed(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise CorralError(
            f"the VM sent a reply that is not a {model.__name__}: {exc.errors()[0]['msg']}"
        ) from None


def _json(raw: bytes, path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise CorralError(f"the VM at {path} sent a reply that is not JSON") from None


def _fault(data: Any, status: int) -> str:
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        return data["fault_message"]
    return f"the VM refused the request (HTTP {status})"


__all__ = ["ControlClient", "ControlServer", "MigrationProgress", "NoControlSocket"]
