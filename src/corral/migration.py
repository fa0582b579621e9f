"""Live migration between two corral processes over TCP: pre-copy with KVM's dirty log.

    source                                   destination (`receive`)
                                     <-      greeting {protocol, auth, nonce_d}
    proof {nonce_s, HMAC(token, source|nonce_d|nonce_s)} ->
                                     <-      verdict {ok, HMAC(token, destination|...)}
    hello {version, cpu, config}     ->      checks the config against the host resources
                                             its operator gave; builds the machine (RAM,
                                             devices; no vCPUs yet)
                                     <-      {ok} or {error}
    RAM: every non-zero chunk, then rounds of the pages dirtied meanwhile (KVM dirty log), until
    what is left would go within the downtime limit and another round would not shrink it by
    a fifth; the guest is throttled if it dirties faster than the link carries
    pause; last dirty pages and every page the VMM wrote itself (device DMA)
    state {MachineState}             ->      creates vCPUs, loads every component
                                     <-      {ready}
    {go}                             ->      starts the guest
                                     <-      {running} (or {error}: it did not start)
    source stops ("migrated"); its downtime runs from its pause to the {running}

Trust. Whoever reaches the port is a stranger until proven otherwise: both sides hold a shared
token (at least 16 bytes, from a file only its owner reads) and each proves it with an HMAC
over two fresh nonces, so the token never crosses the wire and a recorded handshake cannot be
replayed; the source checks the destination's proof too, so it never sends a guest to an
impostor. With `tls` (a certificate on the receiver, its SHA-256 pinned on the source) the
stream is also encrypted and protected; without it the token authenticates the peers but the
guest's memory crosses the network in clear: use TLS, or a network you trust. A receiver with
no token refuses to start unless told `insecure`. The receiver binds loopback unless given a
host. Everything before the proof is fixed-size and bounded by one deadline
(HANDSHAKE_TIMEOUT for the whole greeting, however slowly the bytes come), and a peer that
fails it (a port scan, a bare connect, a wrong token, junk, a slow trickle) is logged in one
line while `receive` goes on listening. Handshakes run concurrently (MAX_HANDSHAKES at once, a
new connection cutting the oldest), so a slow peer never delays a real source. Messages after
the proof are bounded too.

The peer's hello is the guest's shape (CPUs, memory, command line, which devices), never the
host's: its disks, NICs, vsock and console are matched against the HostResources the
destination's operator gave (config.HostResources), and one the operator did not give is
refused by field name, before anything is opened.

Until `go` is sent, any failure (a refused hello, a broken connection, a destination that
dies) leaves the source running as before, with dirty logging off, and the destination tears
its half-built machine down. Both sides time out rather than wait forever on a silent peer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import select
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from corral._version import __version__
from corral.config import HostResources, MachineConfig
from corral.errors import ConfigError, CorralError
from corral.files import Refused, open_checked
from corral.machine import Machine
from corral.seccomp import enter as enter_seccomp
from corral.state.model import CpuModel, MachineState

log = logging.getLogger(__name__)

PAGE = 4096
MAX_FRAME = 1 << 20  # pages are sent in runs of at most 1 MiB
_PAGES = struct.Struct("<cQI")  # b"P", backing offset, length
_JSON = struct.Struct("<cI")  # b"J", length
PROTOCOL = 3  # 2: the authenticated handshake; 3: the destination says when the guest runs
IO_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 10.0  # the receiver's deadline for a peer to prove itself, all reads together
MAX_HANDSHAKES = 16  # handshakes the receiver runs at once (each on its own thread)
HELLO_LIMIT = 1 << 20  # the largest hello (a machine config) and reply
STATE_LIMIT = 64 << 20  # the largest machine state message
TOKEN_MIN, TOKEN_MAX = 16, 4096

MAGIC = b"CORRALMG"
NONCE = 32
_GREETING = struct.Struct("<8sBB32s")  # magic, protocol, auth (0: none, 1: token), nonce_d
_PROOF = struct.Struct("<8sB32s32s")  # magic, protocol, nonce_s, HMAC (zeros without a token)
_VERDICT = struct.Struct("<B32s")  # 0 ok | 1 wrong token | 2 other protocol; the destination's HMAC
_OK, _WRONG_TOKEN, _OTHER_PROTOCOL = 0, 1, 2
_NO_MAC = bytes(32)


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
    # where the downtime went, in ms: pause, final pages, state, destination (its load of the
    # state and the round trip), go, start (the destination's start of the guest and its word)
    downtime_ms: dict[str, float] = Field(default_factory=dict)


Progress = Callable[[int, int, int], None]  # round, bytes sent so far, bytes still dirty


# -- credentials ----------------------------------------------------------------------------------


def check_token(token: bytes | str) -> bytes:
    """A shared token as bytes; too short or too long is refused."""
    raw = token.encode() if isinstance(token, str) else bytes(token)
    raw = raw.strip()
    if not TOKEN_MIN <= len(raw) <= TOKEN_MAX:
        raise ConfigError(
            f"a migration token must be {TOKEN_MIN} to {TOKEN_MAX} bytes, not {len(raw)}: "
            "make one with `openssl rand -hex 32`"
        )
    return raw


def load_token(path: str | os.PathLike[str]) -> bytes:
    """The token in the file at `path`, which only its owner may read (as ssh's keys)."""
    try:
        fd = open_checked(path)
    except Refused as exc:
        raise ConfigError(f"cannot read the token file: {exc}") from None
    st = os.fstat(fd)
    with os.fdopen(fd, "rb") as f:
        if st.st_mode & 0o077:
            raise ConfigError(f"the token file {path} can be read by other users: chmod 600 {path}")
        data = f.read(TOKEN_MAX + 64)
    try:
        data.decode()
    except UnicodeDecodeError:
        raise ConfigError(
            f"the token file {path} holds binary data: put text in it (openssl rand -hex 32)"
        ) from None
    try:
        return check_token(data)
    except ConfigError as exc:
        raise ConfigError(f"the token file {path}: {exc}") from None


def server_tls(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """The receiver's TLS context from a PEM certificate and key (TLS 1.2 at least)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for what, path in (("certificate", cert), ("key", key)):
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ConfigError(f"cannot load the TLS {what} {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):  # a FIFO would block the load forever
            raise ConfigError(f"the TLS {what} {path} is not a regular file")
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None
    return ctx


def certificate_pin(cert: str | os.PathLike[str]) -> str:
    """The SHA-256 of a PEM certificate (its first one), as `migrate(tls_pin=...)` takes it."""
    try:
        text = Path(cert).read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate {cert}: {exc.strerror}") from None
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
    if m is None:
        raise ConfigError(f"{cert} holds no PEM certificate")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest()


def check_pin(pin: str) -> str:
    """A certificate's SHA-256 as 64 hex digits (colons allowed, as openssl prints it)."""
    hexed = pin.replace(":", "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", hexed):
        raise ConfigError(f"{pin!r} is not a SHA-256 fingerprint: give 64 hex digits")
    return hexed


def _mac(token: bytes, role: bytes, nonce_d: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(token, b"corral-migrate " + role + b"\0" + nonce_d + nonce_s, hashlib.sha256).digest()


# -- the wire ---------------------------------------------------------------------------------------


class _Link:
    """Framed messages over one TCP (or TLS) connection. With `deadline` set, every read
    waits only for what is left of it, so a trickling peer cannot stretch it."""

    def __init__(self, sock: socket.socket, timeout: float = IO_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline: float | None = None
        sock.settimeout(timeout)
        # the hand-over is a ping-pong of small messages: Nagle plus delayed ACKs would add 40 ms
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_json(self, obj: object) -> None:
        self.send_json_bytes(json.dumps(obj).encode())

    def send_json_bytes(self, data: bytes) -> None:
        """A message already serialised (a JSON object)."""
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
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise MigrationError(f"the peer did not finish the handshake in {self.timeout:g} s")
                self.sock.settimeout(left)
            try:
                k = self.sock.recv_into(buf[got:], n - got)
            except TimeoutError:
                if self.deadline is not None:
                    raise MigrationError(
                        f"the peer did not finish the handshake in {self.timeout:g} s"
                    ) from None
                raise MigrationError(f"the other side sent nothing for {self.timeout:g} s") from None
            if k == 0:
                raise MigrationError("the other side closed the connection")
            got += k
        return b"" if into is not None else bytes(buf)

    def recv(
        self, memory_view: Callable[[int, int], memoryview] | None = None, *, limit: int = HELLO_LIMIT
    ) -> dict:
        """The next JSON message (at most `limit` bytes); page frames on the way are written
        through `memory_view` (offset, length) -> view."""
        while True:
            kind = self._exact(1)
            if kind == b"J":
                (n,) = struct.unpack("<I", self._exact(4))
                if n > limit:
                    raise MigrationError(f"a message of {n} bytes is too large (at most {limit})")
                try:
                    msg = json.loads(self._exact(n))
                except (ValueError, RecursionError):
                    raise MigrationError("the other side sent a malformed message") from None
                if not isinstance(msg, dict):
                    raise MigrationError("the other side sent a malformed message")
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
        if "error" in msg:
            raise MigrationError(f"the destination refused: {_one_line(msg['error'])}")
        if key not in msg:
            raise MigrationError(f"the destination answered {sorted(msg)[:10]} instead of '{key}'")
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


def _handshake_out(link: _Link, token: bytes | None) -> None:
    """The source's half: read the greeting, prove the token, check the destination's proof."""
    try:
        magic, protocol, auth, nonce_d = _GREETING.unpack(link._exact(_GREETING.size))
    except MigrationError as exc:
        raise MigrationError(f"{exc} before greeting (if it uses TLS, give its certificate's pin)") from None
    if magic != MAGIC:
        raise MigrationError("the other side is not a corral receiver")
    if protocol != PROTOCOL:
        raise MigrationError(f"the destination speaks migration protocol {protocol}, this corral {PROTOCOL}")
    if auth == 0 and token is not None:
        raise MigrationError(
            "the destination checks no token (it runs with --insecure): not sending it the guest"
        )
    if auth != 0 and token is None:
        raise MigrationError("the destination checks a token: give the one it was started with")
    nonce_s = secrets.token_bytes(NONCE)
    proof = _mac(token, b"source", nonce_d, nonce_s) if token is not None else _NO_MAC
    link.send_raw(_PROOF.pack(MAGIC, PROTOCOL, nonce_s, proof))
    verdict, theirs = _VERDICT.unpack(link._exact(_VERDICT.size))
    if verdict == _WRONG_TOKEN:
        raise MigrationError("the destination refused the token: give the one it was started with")
    if verdict != _OK:
        raise MigrationError("the destination refused the handshake (another corral version?)")
    if token is not None and not hmac.compare_digest(theirs, _mac(token, b"destination", nonce_d, nonce_s)):
        raise MigrationError(
            "the destination did not prove it holds the token: is it the receiver you meant?"
        )


def _handshake_in(link: _Link, token: bytes | None) -> None:
    """The destination's half; raises MigrationError for any peer that does not prove itself."""
    nonce_d = secrets.token_bytes(NONCE)
    link.send_raw(_GREETING.pack(MAGIC, PROTOCOL, 0 if token is None else 1, nonce_d))
    magic, protocol, nonce_s, proof = _PROOF.unpack(link._exact(_PROOF.size))
    if magic != MAGIC:
        raise MigrationError("not a corral source (bad greeting)")
    if protocol != PROTOCOL:
        link.send_raw(_VERDICT.pack(_OTHER_PROTOCOL, _NO_MAC))
        raise MigrationError(f"the source speaks migration protocol {protocol}, this corral {PROTOCOL}")
    if token is not None and not hmac.compare_digest(proof, _mac(token, b"source", nonce_d, nonce_s)):
        link.send_raw(_VERDICT.pack(_WRONG_TOKEN, _NO_MAC))
        raise MigrationError("wrong token")
    mine = _mac(token, b"destination", nonce_d, nonce_s) if token is not None else _NO_MAC
    link.send_raw(_VERDICT.pack(_OK, mine))


# -- source ---------------------------------------------------------------------------------------


CONVERGING = 0.8  # a round that leaves less than this share of what it sent dirty shrinks it
NEAR_LEAST = 1.25
SETTLED = 0.001  # seconds: what is left is not worth another round


def precopy_step(
    pending: int, sent: int, least: int, rate: float, downtime_limit: float
) -> Literal["stop", "copy", "throttle"]:
    """After a pre-copy round that sent `sent` bytes at `rate` bytes/s and left `pending` dirty
    (`least`: the fewest left after any round so far): "stop" and copy the rest with the guest
    paused, "copy" another round, or "throttle" the guest (it dirties faster than the link
    carries) and copy another. Once the rest fits the downtime limit, another round goes only
    while that shrinks what the pause will send (a guest rewriting 128 MiB left 15-28 MiB
    after the first round, 4 ms of downtime at the third), or while a guest that writes in
    bursts is amid one (119 MiB left, after 6 MiB the round before)."""
    converging = pending < CONVERGING * sent
    if pending / rate <= downtime_limit:
        if pending / rate <= SETTLED or (not converging and pending <= NEAR_LEAST * least):
            return "stop"
        return "copy"
    return "copy" if converging or not sent else "throttle"


def migrate(
    machine: Machine,
    address: str,
    *,
    token: bytes | str | None = None,
    tls_pin: str | None = None,
    insecure: bool = False,
    downtime_limit: float = 0.3,
    max_rounds: int = 30,
    progress: Progress | None = None,
    cut_at: str | None = None,
) -> MigrationStats:
    """Move `machine` to the corral listening at `address` (HOST:PORT). On success the local
    machine is stopped; on failure it runs on. `token` is the destination's shared token
    (`insecure` sends the guest to a destination that checks none); `tls_pin`, the SHA-256 of
    the destination's TLS certificate, turns TLS on. `cut_at` (tests) drops the connection at
    a phase: hello, memory, state or go."""
    host, port = parse_address(address)
    key = check_token(token) if token is not None else None
    if key is None and not insecure:
        raise MigrationError(
            "no migration token: give the token the destination was started with, "
            "or allow an unauthenticated destination (insecure)"
        )
    pin = check_pin(tls_pin) if tls_pin is not None else None
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
        if pin is not None:
            link = _Link(_tls_client(sock, pin))
        _handshake_out(link, key)
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
            machine.prepare_state_models()  # not in the downtime
            machine.start_dirty_log()
            # round 0: everything that is not zero (the destination's RAM starts zeroed)
            for off, data in mem.populated(MAX_FRAME):
                link.send_pages(off, data)
            stats.round_bytes.append(link.sent)
            _cut(link, cut_at, "memory")
            dirty = machine.read_dirty_log()  # what the guest wrote meanwhile
            least = len(dirty) * PAGE
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
                least = min(least, pending)
                step = precopy_step(pending, round_bytes, least, rate, downtime_limit)
                if step == "stop" or stats.rounds >= max_rounds:
                    break
                if step == "throttle" and stats.rounds >= 2:
                    throttle.increase()
            # stop and copy
            down = lap = time.perf_counter()

            def phase(name: str) -> None:
                nonlocal lap
                now = time.perf_counter()
                stats.downtime_ms[name] = (now - lap) * 1000
                lap = now

            throttle.stop()
            machine.pause()
            phase("pause")
            final = dirty | machine.read_dirty_log(with_vmm_writes=True)
            sent0 = link.sent
            for off, n in _runs(final):
                link.send_pages(off, mem.offset_view(off, n))
            stats.final_bytes = link.sent - sent0
            phase("final pages")
            _cut(link, cut_at, "state")
            link.send_json_bytes(state_message(machine.save_state()))
            phase("state")
            link.expect("ready")
            phase("destination")
            _cut(link, cut_at, "go")
            link.send_json({"go": True})
            committed = True  # from here on the destination owns the guest
            phase("go")
            not_started = _destination_started(link, host, port)
            phase("start")
            stats.downtime_seconds = time.perf_counter() - down
            stats.throttle = throttle.fraction
    except (OSError, MigrationError, CorralError) as exc:
        throttle.stop()
        link.close()
        if committed:
            # the destination owns the guest: resuming this copy too would run it twice
            machine.stop_dirty_log()
            machine.stop(f"migrated to {host}:{port}")
            raise MigrationError(
                f"the connection failed after the hand-over was sent ({_reason(exc)}); "
                "the guest now runs at the destination"
            ) from None
        _abort(machine, was_paused)
        raise MigrationError(
            f"migration to {host}:{port} failed: {_reason(exc)}; the guest runs on here"
        ) from None
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
    if not_started is not None:
        # the destination owns the guest and did not start it: resuming it here could run it
        # against disks the destination's start may already have written
        raise MigrationError(f"{not_started}; the guest is stopped on both hosts")
    return stats


def _destination_started(link: _Link, host: str, port: int) -> str | None:
    """The destination's word after `go`: None once it runs the guest, else why not. A word
    that does not come (a link cut after the hand-over) is logged: the guest is the
    destination's then, running or not."""
    try:
        reply = link.recv(limit=HELLO_LIMIT)
    except (OSError, MigrationError) as exc:
        log.warning(
            "migration to %s:%d: no word from the destination after the hand-over: %s",
            host,
            port,
            _reason(exc),
        )
        return None
    if reply.get("running") is True:
        return None
    why = _one_line(reply.get("error", "it sent something else"))  # the peer's words: one bounded line
    return f"the destination at {host}:{port} took the guest but could not start it: {why}"


def state_message(state: MachineState) -> bytes:
    """The `{"state": ...}` message, serialised once by pydantic (in the downtime: a
    json.loads and json.dumps round trip of it cost ~0.3 ms more)."""
    return b'{"state":' + state.model_dump_json().encode() + b"}"


def _tls_client(sock: socket.socket, pin: str) -> ssl.SSLSocket:
    """TLS to the destination, trusting exactly the certificate whose SHA-256 is `pin`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin below is the whole trust decision
    tls = ctx.wrap_socket(sock)  # handshakes within the socket's timeout
    der = tls.getpeercert(binary_form=True) or b""
    got = hashlib.sha256(der).hexdigest()
    if not hmac.compare_digest(got, pin):
        tls.close()
        raise MigrationError(f"the destination's TLS certificate is sha256 {got}, not the pinned one")
    return tls


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
    """A listening socket for `receive`: HOST:PORT, or PORT alone on loopback (127.0.0.1):
    other hosts reach it only where the operator names an address for them."""
    host, port = parse_address(address, default_host="127.0.0.1", any_port=True)
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((host, port))
    except OSError as exc:
        srv.close()
        raise CorralError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    srv.listen(8)
    return srv


def receive(
    server: socket.socket,
    *,
    token: bytes | str | None = None,
    insecure: bool = False,
    tls: ssl.SSLContext | None = None,
    host: HostResources | None = None,
    console: Callable[[bytes], None] | None = None,
    kvm_path: str = "/dev/kvm",
    accept_timeout: float | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Machine:
    """Accept one incoming migration on `server` and return the machine, handed over and
    started (its vCPUs run as the source hears of it); run() or wait() on it from there.

    A peer must prove `token` (without one, `insecure` must say so) within
    `handshake_timeout`; one that does not is logged and the next connection accepted, until
    `accept_timeout` (None: forever) has passed. The guest's host resources come from `host`
    (HostResources; none given: the guest may have no disk, NIC, vsock or console file). Once a
    peer has proven itself, any failure closes the half-built machine and raises
    MigrationError; `server` stays open, so receive() can be called again."""
    key = check_token(token) if token is not None else None
    if key is None and not insecure:
        raise MigrationError(
            "no migration token: give one (a shared secret the source gives too), or accept "
            "migrations from anyone who can connect (insecure)"
        )
    grant = host or HostResources()
    link, where = _first_proven(server, key, tls, accept_timeout, handshake_timeout)
    return _receive_machine(link, where, grant, console, kvm_path)


class _Handshakes:
    """The handshakes in flight, each on its own thread, so a slow or silent peer never delays
    a real source (which proves itself in a few round trips). At most MAX_HANDSHAKES at once:
    the next connection cuts the oldest, so holding the receiver takes a flood, not a trickle."""

    def __init__(self, key: bytes | None, tls: ssl.SSLContext | None, timeout: float) -> None:
        self.key, self.tls, self.timeout = key, tls, timeout
        self.lock = threading.Lock()
        self.pending: dict[int, socket.socket] = {}  # id -> a dup of the peer's socket, to cut it
        self.proven: list[tuple[_Link, str]] = []
        self.closed = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self._next = 0

    def start(self, sock: socket.socket, where: str) -> None:
        with self.lock:
            if len(self.pending) >= MAX_HANDSHAKES:
                oldest = min(self.pending)
                log.warning("migration: %d handshakes in flight, cutting the oldest", MAX_HANDSHAKES)
                _cut_socket(self.pending.pop(oldest))
            self._next += 1
            ident = self._next
            self.pending[ident] = sock.dup()
        threading.Thread(
            target=self._run, args=(ident, sock, where), name="corral-mig-handshake", daemon=True
        ).start()

    def _run(self, ident: int, sock: socket.socket, where: str) -> None:
        try:
            enter_seccomp("incoming", "corral-mig-in")  # the peer's bytes, parsed under a filter
            link = _accept(sock, self.key, self.tls, self.timeout)
        except (OSError, CorralError) as exc:  # MigrationError; SeccompError: no filter, no handshake
            log.warning("migration: refused a connection from %s: %s; still listening", where, _reason(exc))
            sock.close()
            link = None
        with self.lock:
            dup = self.pending.pop(ident, None)
            if link is not None and (self.closed or dup is None):
                link.close()  # cut meanwhile, or another source came first
            elif link is not None:
                self.proven.append((link, where))
        if dup is not None:
            dup.close()
        try:
            self.wake_w.send(b"!")
        except OSError:
            pass

    def take(self) -> tuple[_Link, str] | None:
        with self.lock:
            return self.proven.pop(0) if self.proven else None

    def close(self) -> None:
        """Cut every handshake still in flight and every proven peer not taken."""
        with self.lock:
            self.closed = True
            for dup in self.pending.values():
                _cut_socket(dup)
            self.pending.clear()
            for link, _ in self.proven:
                link.close()
            self.proven.clear()
        self.wake_r.close()
        self.wake_w.close()


def _cut_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes the handshake's thread at once
    except OSError:
        pass
    sock.close()


def _first_proven(
    server: socket.socket,
    key: bytes | None,
    tls: ssl.SSLContext | None,
    accept_timeout: float | None,
    handshake_timeout: float,
) -> tuple[_Link, str]:
    """Accept connections, handshaking with each concurrently, until one peer proves itself."""
    deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
    shakes = _Handshakes(key, tls, handshake_timeout)
    try:
        while True:
            proven = shakes.take()
            if proven is not None:
                return proven
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise MigrationError("no migration arrived in time")
            try:
                ready, _, _ = select.select([server, shakes.wake_r], [], [], left)
            except (OSError, ValueError) as exc:
                raise MigrationError(f"cannot accept a connection: {exc}") from None
            if shakes.wake_r in ready:
                try:
                    shakes.wake_r.recv(4096)
                except BlockingIOError:
                    pass
            if server not in ready:
                continue
            server.settimeout(0)
            try:
                sock, peer = server.accept()
            except (BlockingIOError, InterruptedError):
                continue  # the peer went away between select and accept
            except OSError as exc:
                raise MigrationError(f"cannot accept a connection: {exc.strerror or exc}") from None
            sock.setblocking(True)
            shakes.start(sock, f"{peer[0]}:{peer[1]}")
    finally:
        shakes.close()


def _accept(sock: socket.socket, key: bytes | None, tls: ssl.SSLContext | None, timeout: float) -> _Link:
    """TLS (if asked) and the handshake, all within `timeout` however slowly the peer sends."""
    deadline = time.monotonic() + timeout
    try:
        if tls is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)  # do_handshake() treats it as a deadline for the whole of it
            sock = tls.wrap_socket(sock, server_side=True)
    except TimeoutError:
        sock.close()
        raise MigrationError(f"the peer did not finish the TLS handshake in {timeout:g} s") from None
    except OSError:
        sock.close()
        raise
    link = _Link(sock, timeout=timeout)
    link.deadline = deadline
    try:
        _handshake_in(link, key)
    except BaseException:
        link.close()
        raise
    link.deadline = None
    link.sock.settimeout(IO_TIMEOUT)
    link.timeout = IO_TIMEOUT
    return link


def _receive_machine(
    link: _Link,
    where: str,
    grant: HostResources,
    console: Callable[[bytes], None] | None,
    kvm_path: str,
) -> Machine:
    """The migration proper, from a peer that proved itself."""
    machine: Machine | None = None
    try:
        hello = link.recv(limit=HELLO_LIMIT)
        try:
            if hello.get("protocol") != PROTOCOL or hello.get("corral_version") != __version__:
                raise CorralError(
                    f"the source is corral {str(hello.get('corral_version'))[:40]} (protocol "
                    f"{str(hello.get('protocol'))[:10]}), this is corral {__version__} "
                    f"(protocol {PROTOCOL})"
                )
            fields = hello.get("config")
            if not isinstance(fields, dict):
                raise CorralError("the hello has no machine config")
            config = grant.apply(MachineConfig.build(**fields), "the source")
            cpu = CpuModel.model_validate(hello.get("cpu"))
            machine = Machine(config, console=console, kvm_path=kvm_path, incoming=True)
            machine.build()
            if cpu != machine.cpu_model:
                assert machine.cpu_model is not None
                raise CorralError(
                    f"the source runs on a {cpu.describe()}, this host has a {machine.cpu_model.describe()}"
                )
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            reason = _one_line(exc)
            link.send_json({"error": reason})
            raise MigrationError(f"refused the migration from {where}: {reason}") from None
        # before the ok: built after it, they held up the pages of a short pre-copy and then
        # the stop-and-copy behind them (an idle guest's downtime went from ~2 to ~40 ms)
        machine.prepare_state_models()
        link.send_json({"ok": True})
        mem = machine.memory
        assert mem is not None
        msg = link.recv(mem.offset_view, limit=STATE_LIMIT)
        if "state" not in msg:
            raise MigrationError("the source sent no machine state")
        try:
            machine.load_incoming(MachineState.model_validate(msg["state"]))
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            reason = _one_line(exc)
            link.send_json({"error": reason})
            raise MigrationError(f"the machine state from {where} does not load: {reason}") from None
        link.send_json({"ready": True})
        go = link.recv(limit=HELLO_LIMIT)
        if not go.get("go"):
            raise MigrationError("the source did not hand the guest over")
        # the guest's pause ends here, not when the caller gets to start it (a CLI sets up its
        # API socket and filters first); the source counts its downtime to this word
        try:
            machine.start()
        except CorralError as exc:
            reason = _one_line(exc)
            _send_quietly(link, {"error": reason})
            raise MigrationError(f"the guest from {where} did not start: {reason}") from None
        _send_quietly(link, {"running": True})
        return machine
    except BaseException as exc:
        if machine is not None:
            machine.close()
        if isinstance(exc, OSError):
            raise MigrationError(f"incoming migration from {where} failed: {exc.strerror or exc}") from None
        raise
    finally:
        link.close()


def _send_quietly(link: _Link, msg: dict[str, object]) -> None:
    """A last word to the source after the hand-over: one it does not hear changes nothing."""
    try:
        link.send_json(msg)
    except OSError:
        pass


def _one_line(exc: object) -> str:
    """An error as one bounded line (pydantic's reports span several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:1000]


def _reason(exc: BaseException) -> str:
    """Why an operation failed, in one bounded line: an OSError by its strerror alone."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _one_line(exc)


__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MigrationError",
    "MigrationStats",
    "certificate_pin",
    "check_pin",
    "check_token",
    "listen",
    "load_token",
    "migrate",
    "parse_address",
    "receive",
    "server_tls",
]
