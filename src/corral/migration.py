"""Live migration between two corral processes over TCP: pre-copy with KVM's dirty log.

    source                                   destination (`receive`)
    hello {version, cpu, config}     ->      builds the machine (RAM, devices; no vCPUs yet)
                                     <-      {ok} or {error}
    RAM: every non-zero chunk, then rounds of the pages dirtied meanwhile (KVM dirty log), until
    what is left would go within the downtime limit; the guest is throttled if it dirties
    faster than the link carries
    pause; last dirty pages and every page the VMM wrote itself (device DMA)
    state {MachineState}             ->      creates vCPUs, loads every component
                                     <-      {ready}
    {go}                             ->      starts the guest
    source stops ("migrated")

Until `go` is sent, any failure (a refused hello, a broken connection, a destination that
dies) leaves the source running as before, with dirty logging off, and the destination tears
its half-built machine down. Both sides time out rather than wait forever on a silent peer.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

from corral._version import __version__
from corral.config import MachineConfig
from corral.errors import CorralError
from corral.machine import Machine
from corral.state.model import CpuModel, MachineState

log = logging.getLogger(__name__)

PAGE = 4096
MAX_FRAME = 1 << 20  # pages are sent in runs of at most 1 MiB
_PAGES = struct.Struct("<cQI")  # b"P", backing offset, length
_JSON = struct.Struct("<cI")  # b"J", length
PROTOCOL = 1
IO_TIMEOUT = 30.0


class MigrationError(CorralError):
    """A migration failed; the source keeps running."""


class MigrationStats(BaseModel):
    """What a finished migration did (the reply of the migrate verb)."""

    rounds: int = 0
    bytes_sent: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    final_bytes: int = 0
    throttle: float = 0.0  # the share of time the guest's vCPUs were held back
    round_bytes: list[int] = Field(default_factory=list)


Progress = Callable[[int, int, int], None]  # round, bytes sent so far, bytes still dirty


class _Link:
    """Framed messages over one TCP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(IO_TIMEOUT)
        # the hand-over is a ping-pong of small messages: Nagle plus delayed ACKs would add 40 ms
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = 0

    def send_json(self, obj: object) -> None:
        data = json.dumps(obj).encode()
        self.sock.sendall(_JSON.pack(b"J", len(data)) + data)
        self.sent += _JSON.size + len(data)

    def send_pages(self, offset: int, data: memoryview) -> None:
        self.sock.sendall(_PAGES.pack(b"P", offset, len(data)))
        self.sock.sendall(data)
        self.sent += _PAGES.size + len(data)

    def _exact(self, n: int, into: memoryview | None = None) -> bytes:
        buf = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            k = self.sock.recv_into(buf[got:], n - got)
            if k == 0:
                raise MigrationError("the other side closed the connection")
            got += k
        return b"" if into is not None else bytes(buf)

    def recv(self, memory_view: Callable[[int, int], memoryview] | None = None) -> dict | None:
        """The next JSON message; page frames on the way are written through `memory_view`
        (offset, length) -> view. Returns None only for pages when no JSON follows yet."""
        while True:
            kind = self._exact(1)
            if kind == b"J":
                (n,) = struct.unpack("<I", self._exact(4))
                if n > 256 << 20:
                    raise MigrationError(f"message of {n} bytes is too large")
                msg = json.loads(self._exact(n))
                if not isinstance(msg, dict):
                    raise MigrationError("malformed message")
                return msg
            if kind == b"P" and memory_view is not None:
                offset, length = struct.unpack("<QI", self._exact(12))
                if length > MAX_FRAME:
                    raise MigrationError(f"page run of {length} bytes is too large")
                self._exact(length, memory_view(offset, length))
                continue
            raise MigrationError(f"unexpected frame {kind!r}")

    def expect(self, key: str) -> dict:
        msg = self.recv()
        assert msg is not None
        if "error" in msg:
            raise MigrationError(f"the destination refused: {msg['error']}")
        if key not in msg:
            raise MigrationError(f"the destination answered {sorted(msg)} instead of '{key}'")
        return msg

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_address(text: str, *, default_host: str = "127.0.0.1", any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT (or PORT alone). Port 0 (pick a free one) only where `any_port`."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    try:
        p = int(port)
        if not (0 if any_port else 1) <= p < 65536:
            raise ValueError
    except ValueError:
        raise CorralError(f"'{text}' is not an address: write it as HOST:PORT (e.g. 10.0.0.2:7000)") from None
    return host.strip("[]") or default_host, p


# -- source ---------------------------------------------------------------------------------------


def migrate(
    machine: Machine,
    address: str,
    *,
    downtime_limit: float = 0.3,
    max_rounds: int = 30,
    progress: Progress | None = None,
    cut_at: str | None = None,
) -> MigrationStats:
    """Move `machine` to the corral listening at `address` (HOST:PORT). On success the local
    machine is stopped; on failure it runs on. `cut_at` (tests) drops the connection at a phase:
    hello, memory, state or go."""
    host, port = parse_address(address)
    mem = machine.memory
    if mem is None or machine.cpu_model is None:
        raise MigrationError("the machine is not running: nothing to migrate")
    stats = MigrationStats()
    t0 = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout=5.0)
    except OSError as exc:
        raise MigrationError(
            f"cannot reach {host}:{port}: {exc.strerror or exc} (is `corral receive` listening there?)"
        ) from None
    link = _Link(sock)
    was_paused = machine.paused
    committed = False
    throttle = _Throttle(machine)
    try:
        with machine.exclusive():
            _cut(link, cut_at, "hello")
            link.send_json(
                {
                    "protocol": PROTOCOL,
                    "corral_version": __version__,
                    "cpu": machine.cpu_model.model_dump(),
                    "config": machine.config.model_dump(mode="json"),
                }
            )
            link.expect("ok")
            machine.start_dirty_log()
            # round 0: everything that is not zero (the destination's RAM starts zeroed)
            for off, data in mem.populated(MAX_FRAME):
                link.send_pages(off, data)
            stats.round_bytes.append(link.sent)
            _cut(link, cut_at, "memory")
            dirty = machine.read_dirty_log()  # what the guest wrote meanwhile
            while True:
                stats.rounds += 1
                started, sent0 = time.perf_counter(), link.sent
                for off, n in _runs(dirty):
                    link.send_pages(off, mem.offset_view(off, n))
                took = max(time.perf_counter() - started, 1e-4)
                round_bytes = link.sent - sent0
                stats.round_bytes.append(round_bytes)
                rate = max(round_bytes / took, 50e6)  # bytes/s the link carried
                dirty = machine.read_dirty_log()
                pending = len(dirty) * PAGE
                if progress:
                    progress(stats.rounds, link.sent, pending)
                if pending / rate <= downtime_limit or stats.rounds >= max_rounds:
                    break
                if stats.rounds >= 2 and round_bytes and pending >= 0.8 * round_bytes:
                    throttle.increase()  # not converging: slow the guest down
            # stop and copy
            down = time.perf_counter()
            throttle.stop()
            machine.pause()
            final = dirty | machine.read_dirty_log(with_vmm_writes=True)
            sent0 = link.sent
            for off, n in _runs(final):
                link.send_pages(off, mem.offset_view(off, n))
            stats.final_bytes = link.sent - sent0
            _cut(link, cut_at, "state")
            link.send_json({"state": json.loads(machine.save_state().model_dump_json())})
            link.expect("ready")
            _cut(link, cut_at, "go")
            link.send_json({"go": True})
            committed = True  # from here on the destination owns the guest
            stats.downtime_seconds = time.perf_counter() - down
            stats.throttle = throttle.fraction
    except (OSError, MigrationError, CorralError) as exc:
        throttle.stop()
        _abort(machine, was_paused)
        link.close()
        if committed:
            raise MigrationError(
                f"the connection failed after the hand-over was sent ({exc}); "
                "the guest now runs at the destination"
            ) from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise MigrationError(f"migration to {host}:{port} failed: {reason}; the guest runs on here") from None
    except BaseException:
        throttle.stop()
        _abort(machine, was_paused)
        link.close()
        raise
    link.close()
    machine.stop_dirty_log()
    stats.bytes_sent = link.sent
    stats.total_seconds = time.perf_counter() - t0
    machine.stop(f"migrated to {host}:{port}")
    return stats


def _cut(link: _Link, cut_at: str | None, phase: str) -> None:
    if cut_at == phase:
        link.sock.shutdown(socket.SHUT_RDWR)


def _abort(machine: Machine, was_paused: bool) -> None:
    try:
        machine.stop_dirty_log()
    except CorralError as exc:
        log.warning("could not turn dirty logging off: %s", exc)
    if not was_paused:
        machine.resume()


def _runs(offsets: set[int]) -> list[tuple[int, int]]:
    """Sorted page offsets -> (offset, length) runs of adjacent pages, each at most MAX_FRAME."""
    runs: list[tuple[int, int]] = []
    for off in sorted(offsets):
        if runs and runs[-1][0] + runs[-1][1] == off and runs[-1][1] < MAX_FRAME:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((off, PAGE))
    return runs


class _Throttle:
    """Holds the vCPUs for a growing share of every 50 ms when the guest dirties memory faster
    than the link carries it (the guest's clock keeps running, as with a busy host)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.fraction = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def increase(self) -> None:
        self.fraction = min(0.9, self.fraction + 0.2)
        log.info("migration: guest throttled to %d%% of its time", 100 - int(100 * self.fraction))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="migration-throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        period = 0.05
        while not self._stop.is_set():
            self.machine.hold_vcpus()
            self._stop.wait(period * self.fraction)
            self.machine.release_vcpus()
            self._stop.wait(period * (1 - self.fraction))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None


# -- destination ----------------------------------------------------------------------------------


def listen(address: str) -> socket.socket:
    host, port = parse_address(address, default_host="0.0.0.0", any_port=True)
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((host, port))
    except OSError as exc:
        srv.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    srv.listen(1)
    return srv


def receive(
    server: socket.socket,
    *,
    console: Callable[[bytes], None] | None = None,
    kvm_path: str = "/dev/kvm",
    accept_timeout: float | None = None,
) -> Machine:
    """Accept one incoming migration on `server` and return the machine, loaded and handed
    over: call start() (or run()) at once. On any failure the half-built machine is closed and
    MigrationError raised."""
    server.settimeout(accept_timeout)
    try:
        sock, peer = server.accept()
    except TimeoutError:
        raise MigrationError("no migration arrived in time") from None
    link = _Link(sock)
    machine: Machine | None = None
    try:
        hello = link.recv()
        assert hello is not None
        try:
            if hello.get("protocol") != PROTOCOL or hello.get("corral_version") != __version__:
                raise CorralError(
                    f"the source is corral {hello.get('corral_version')} (protocol "
                    f"{hello.get('protocol')}), this is corral {__version__} "
                    f"(protocol {PROTOCOL})"
                )
            config = MachineConfig.build(**hello["config"])
            machine = Machine(config, console=console, kvm_path=kvm_path, incoming=True)
            machine.build()
            cpu = CpuModel.model_validate(hello["cpu"])
            if cpu != machine.cpu_model:
                assert machine.cpu_model is not None
                raise CorralError(
                    f"the source runs on a {cpu.describe()}, this host has a {machine.cpu_model.describe()}"
                )
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            link.send_json({"error": str(exc)})
            raise MigrationError(f"refused the migration from {peer[0]}: {exc}") from None
        link.send_json({"ok": True})
        mem = machine.memory
        assert mem is not None
        msg = link.recv(mem.offset_view)
        if msg is None or "state" not in msg:
            raise MigrationError("the source sent no machine state")
        machine.load_incoming(MachineState.model_validate(msg["state"]))
        link.send_json({"ready": True})
        go = link.recv()
        if not go or not go.get("go"):
            raise MigrationError("the source did not hand the guest over")
        return machine
    except BaseException as exc:
        if machine is not None:
            machine.close()
        if isinstance(exc, OSError):
            raise MigrationError(f"incoming migration failed: {exc.strerror or exc}") from None
        raise
    finally:
        link.close()


__all__ = ["MigrationError", "MigrationStats", "listen", "migrate", "parse_address", "receive"]
