"""The daemon's REST API, and the `corral serve` process.

    GET    /                     the daemon: version, state directory, number of VMs
    GET    /vms                  every VM (VmInfo)
    POST   /vms                  create one (CreateVm: a Firecracker config or a snapshot) -> 201
    GET    /vms/ID               one VM
    POST   /vms/ID/pause|resume|stop
    POST   /vms/ID/snapshot      {"path": DIR}: the snapshot directory a clone is created from
    POST   /vms/ID/clone         a new VM from a snapshot of this one (kept with the clone) -> 201
    POST   /vms/ID/migrate       MigrateVm: live-migrate to another daemon ({"to": SOCKET or
                                 tcp:HOST:PORT, "token": its bearer token}); removed here after
    POST   /vms/ID/gdb           {"address": tcp:[HOST:]PORT|unix:PATH}: start its gdb stub
    POST   /incoming             a VM that waits for a migration (what /vms/ID/migrate asks of
                                 the target): its address and a fresh token -> 201
    DELETE /vms/ID               stop it and remove its directory, cgroups and taps -> 204
    GET    /vms/ID/console       the serial console as a chunked stream (?follow=0: what is there)
    GET    /metrics              Prometheus text for every VM

HTTP is firecracker/server.py's (bounded bodies: a larger one is refused from its
Content-Length without being read; keep-alive; JSON faults; capped connections), extended here
with plain-text and streamed replies and with the checks of who may ask: on the Unix socket
(0600) the peer's uid (SO_PEERCRED) must be the daemon's or root's; on TCP (off unless
--tcp) every request must carry the bearer token (`Authorization: Bearer ...`), compared in
constant time, before its body is read. Errors are `{"fault_message": ...}`: 400 for a bad
request, 404 for an unknown VM; nothing a client sends ends the daemon.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import parse_qs

from pydantic import BaseModel, ValidationError

from corral._version import __version__
from corral.backends.unix_socket import listen_unix, peer_allowed, peer_uid
from corral.daemon import metrics
from corral.daemon.cgroups import Cgroups
from corral.daemon.fleet import Fleet, FleetError
from corral.daemon.launcher import ForkLauncher, Launcher, SpawnLauncher
from corral.daemon.models import CloneVm, CreateVm, DaemonInfo, GdbVm, Incoming, MigrateVm, SnapshotVm
from corral.daemon.statedir import StateDir, check_vm_id
from corral.errors import ConfigError, CorralError
from corral.firecracker.models import body_error
from corral.firecracker.server import MAX_CONNECTIONS, HttpServer, Reply, RequestHandler

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # a create request (a whole config) fits many times over
REAP_INTERVAL = 1.0
TOKEN_MIN = 16
M = TypeVar("M", bound=BaseModel)


@dataclass
class Text(Reply):
    """A plain-text reply (metrics)."""

    text: str = ""
    content_type: str = "text/plain; charset=utf-8"


@dataclass
class Stream(Reply):
    """A reply streamed with chunked transfer encoding until `chunks` ends."""

    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))
    content_type: str = "application/octet-stream"


def fault(message: str, status: int = 400) -> Reply:
    return Reply(status, {"fault_message": message})


def _json(model: BaseModel, status: int = 200) -> Reply:
    return Reply(status, json.loads(model.model_dump_json()))


class DaemonApi:
    """Paths and methods onto the Fleet."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def handle(self, method: str, target: str, body: bytes | None) -> Reply:
        path, _, query = target.partition("?")
        parts = [p for p in path.split("/") if p]
        try:
            return self._route(method, parts, parse_qs(query), body)
        except FleetError as exc:
            return fault(str(exc), exc.status)
        except CorralError as exc:
            return fault(str(exc))

    def _route(self, method: str, parts: list[str], query: dict[str, list[str]], body: bytes | None) -> Reply:
        fleet = self.fleet
        if parts == [] and method == "GET":
            info = DaemonInfo(
                version=__version__, state_dir=str(fleet.state.root), vms=len(fleet.ids()), jail=fleet.jail
            )
            return _json(info)
        if parts == ["metrics"] and method == "GET":
            vms = [(i, fleet.state.vm(i.id)) for i in fleet.list()]
            return Text(200, text=metrics.render(vms, fleet.cgroups), content_type=metrics.CONTENT_TYPE)
        if parts == ["incoming"] and method == "POST":
            return _json(fleet.incoming(parse(Incoming, body)), 201)
        if parts[:1] != ["vms"]:
            return fault(f"no such path: {method} /{'/'.join(parts)}", 404)
        if len(parts) == 1:
            if method == "GET":
                return Reply(200, [json.loads(i.model_dump_json()) for i in fleet.list()])
            if method == "POST":
                return _json(fleet.create(parse(CreateVm, body)), 201)
            return _bad_method(method, parts)
        vm_id = check_vm_id(parts[1])
        verb = parts[2:]
        if verb == [] and method == "GET":
            return _json(fleet.info(vm_id))
        if verb == [] and method == "DELETE":
            fleet.remove(vm_id)
            return Reply(204)
        if verb == ["console"] and method == "GET":
            follow = query.get("follow", ["1"])[-1] not in ("0", "false", "no")
            return Stream(200, chunks=fleet.console(vm_id, follow))
        if len(verb) == 1 and method == "POST":
            if verb[0] in ("pause", "resume"):
                _no_body(body)
                return _json(fleet.set_paused(vm_id, verb[0] == "pause"))
            if verb[0] == "stop":
                _no_body(body)
                return _json(fleet.stop(vm_id))
            if verb[0] == "snapshot":
                return _json(fleet.snapshot(vm_id, parse(SnapshotVm, body).path))
            if verb[0] == "migrate":
                return _json(fleet.migrate(vm_id, parse(MigrateVm, body)))
            if verb[0] == "clone":
                return _json(fleet.clone(vm_id, parse(CloneVm, body or b"{}")), 201)
            if verb[0] == "gdb":
                return _json(fleet.gdb(vm_id, parse(GdbVm, body).address))
        return _bad_method(method, parts)


def _bad_method(method: str, parts: list[str]) -> Reply:
    return fault(f"no such path: {method} /{'/'.join(parts)}", 404)


def _no_body(body: bytes | None) -> None:
    if body and body.strip() not in (b"", b"{}"):
        raise FleetError("this request takes no body")


def parse(model: type[M], body: bytes | None) -> M:
    if not body:
        raise FleetError(f"the request needs a JSON body ({model.__name__})")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise FleetError(body_error(exc, model)) from None


# --- HTTP: firecracker/server.py's, with text and streamed replies and the peer checks ---------


class _DaemonHandler(RequestHandler):
    server: _DaemonServer

    def version_string(self) -> str:
        return f"corral/{__version__}"

    def _serve(self, method: str) -> None:
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self.close_connection = True
                self._send(fault("a bearer token is required: send Authorization: Bearer <token>", 401))
                return
        super()._serve(method)

    def _send(self, reply: Reply) -> None:
        if isinstance(reply, Stream):
            self._send_chunks(reply)
        elif isinstance(reply, Text):
            data = reply.text.encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        else:
            super()._send(reply)

    def _send_chunks(self, reply: Stream) -> None:
        self.close_connection = True
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            for chunk in reply.chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:
            close = getattr(reply.chunks, "close", None)
            if close is not None:
                close()


class _DaemonServer(HttpServer):
    def __init__(self, sock: socket.socket, api: DaemonApi, token: str | None, max_body: int) -> None:
        super().__init__(sock, api.handle, lambda: None, max_body)
        self.RequestHandlerClass = _DaemonHandler
        self.token = token
        self.unix = sock.family == socket.AF_UNIX

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.unix:
            return True
        if peer_allowed(request):
            return True
        log.warning(
            "refused a connection from uid %s: only the daemon's uid (%d) and root",
            peer_uid(request),
            os.geteuid(),
        )
        return False


class DaemonServer:
    """Serves a DaemonApi on a Unix socket and, when given, on TCP with a bearer token."""

    def __init__(
        self,
        api: DaemonApi,
        sock_path: Path,
        *,
        tcp: tuple[str, int] | None = None,
        token: str | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.path = Path(sock_path)
        self._servers: list[_DaemonServer] = []
        self._threads: list[threading.Thread] = []
        unix = listen_unix(self.path, "daemon socket", "--api-sock", backlog=MAX_CONNECTIONS)
        self._add(_DaemonServer(unix, api, None, max_body))
        if tcp is not None:
            if not token:
                self.close()
                raise ConfigError("--tcp needs --token-file: the TCP API is never served without a token")
            try:
                s = socket.create_server(tcp, backlog=MAX_CONNECTIONS, reuse_port=False)
            except OSError as exc:
                self.close()
                raise ConfigError(f"cannot listen on {tcp[0]}:{tcp[1]}: {exc.strerror}") from None
            self.tcp_address = s.getsockname()[:2]
            self._add(_DaemonServer(s, api, token, max_body))

    def _add(self, server: _DaemonServer) -> None:
        self._servers.append(server)
        t = threading.Thread(target=server.serve_forever, name="corral-daemon-api", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        for s in self._servers:
            s.shutdown()
            s.server_close()
        try:
            self.path.unlink()
        except OSError:
            pass


def read_token(path: Path) -> str:
    """The bearer token: a file only its owner may read, holding at least TOKEN_MIN characters."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            raise ConfigError(f"the token file {path} is readable by others: chmod 600 it")
        token = os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)
    if len(token) < TOKEN_MIN or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            f"the token file {path} must hold one token of at least {TOKEN_MIN} printable characters "
            "(e.g. `openssl rand -hex 32`)"
        )
    return token


def parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--tcp {text!r}: give HOST:PORT (e.g. 127.0.0.1:7777)")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(
    state_dir: Path,
    api_sock: Path | None = None,
    *,
    tcp: str | None = None,
    token_file: Path | None = None,
    cgroup_parent: str | None = "corral",
    launcher: Launcher | None = None,
    spawn: bool = False,
    jail: bool = True,
    ready: threading.Event | None = None,
) -> int:
    """Run the daemon until SIGTERM or SIGINT; VMs keep running after it ends. VMs fork from a
    warm template (corral.forkserver) unless `spawn` asks for a fresh interpreter each, and
    each runs in a jail of its own (corral.jail) when the daemon is root, unless `jail` is off."""
    if jail and os.geteuid() != 0:
        log.warning("corral serve: jailing VMs needs root: this daemon runs them unjailed (--no-jail)")
        jail = False
    if jail and spawn:
        raise ConfigError(
            "--spawn cannot jail VMs (the jail is entered in the fork server's child): "
            "drop --spawn, or give --no-jail"
        )
    # Every file the daemon and its VMs make is private; the caller's mask comes back after
    # (a process that embeds the daemon, the tests, keeps its own).
    old_mask = os.umask(0o077)
    try:
        state = StateDir(state_dir)
        cgroups = Cgroups(parent=cgroup_parent) if cgroup_parent else None
        own_launcher = launcher is None
        launcher = launcher or (SpawnLauncher() if spawn else ForkLauncher())
        fleet = Fleet(state, launcher, cgroups, jail=jail)
        address = parse_tcp(tcp) if tcp else None
        if address is not None:  # VMs migrated here listen where the daemon's clients reach it
            fleet.migration_host = address[0]
        if token_file is not None and address is None:
            raise ConfigError("--token-file is for --tcp: the Unix socket checks the peer's uid instead")
        token = read_token(token_file) if token_file is not None else None
        server = DaemonServer(
            DaemonApi(fleet), api_sock or state.root / "corral.sock", tcp=address, token=token
        )
        found = fleet.list()
        by_state: dict[str, int] = {}
        for vm in found:
            by_state[vm.state] = by_state.get(vm.state, 0) + 1
        log.warning(
            "corral serve: %s, %s, %d VM(s) found%s",
            server.path,
            "VMs jailed" if jail else "VMs not jailed",
            len(found),
            "".join(f", {n} {s}" for s, n in sorted(by_state.items())),
        )
        stopping = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        if ready is not None:
            ready.set()
        try:
            while not stopping.wait(REAP_INTERVAL):
                fleet.reap()
                fleet.cap_files()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            server.close()
            if own_launcher:
                launcher.close()  # the template goes; the VMs it forked run on
        return 0
    finally:
        os.umask(old_mask)


__all__ = ["DaemonApi", "DaemonServer", "Stream", "Text", "parse_tcp", "read_token", "serve"]
