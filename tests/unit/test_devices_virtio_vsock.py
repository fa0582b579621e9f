"""virtio-vsock driven by the Python driver on one side and real Unix sockets on the other, as a
host program would use them (Firecracker's CONNECT protocol), and the limits that keep a guest or
a host program from exhausting the VMM: connections, fds, queued bytes and replies, a blocked
connect."""

from __future__ import annotations

import os
import resource
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from support.fakes import FakeLoop
from support.virtio_driver import Driver

from corral.backends.unix_socket import listen_unix
from corral.devices.virtio.vsock import (
    BUF_ALLOC,
    HDR,
    HOST_CID,
    MAX_CONNECTIONS,
    MAX_CONTROL,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    TYPE_STREAM,
    VirtioVsock,
)
from corral.errors import ConfigError

CID = 7
GUEST_BUF = 64 * 1024


class Guest:
    """The driver side: posts receive buffers, sends packets, reads what the device delivered."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = FakeLoop()
        self.uds = str(tmp_path / "v.sock")
        self.dev = VirtioVsock(CID, listen_unix(self.uds, "vsock socket", "vsock.uds_path"), self.loop)
        self.d = Driver(self.dev)
        self.d.setup()
        self.bufs = {}
        self.fwd = 0
        for _ in range(32):
            self.post()

    def post(self) -> None:
        b = self.d.alloc(4096)
        head = self.d.submit(0, [(b, True)], kick=False)
        self.bufs[head] = b

    def packets(self) -> list[tuple[tuple, bytes]]:
        self.loop.run_ready()
        out = []
        for head, n in self.d.used(0):
            raw = self.d.mem.read(self.bufs[head][0], n)
            out.append((HDR.unpack(raw[: HDR.size]), raw[HDR.size :]))
            self.post()
        self.d.kick(0)
        return out

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        src_cid: int = CID,
        dst_cid: int = HOST_CID,
        length: int | None = None,
        buf_alloc: int = GUEST_BUF,
        settle: bool = True,
    ) -> None:
        hdr = HDR.pack(
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len(payload) if length is None else length,
            TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            self.fwd,
        )
        self.d.submit(1, [(self.d.alloc(hdr + payload), False)])
        self.d.used(1)
        if settle:  # let the host sockets' callbacks run
            self.loop.run_ready()

    def close(self) -> None:
        self.dev.close()
        self.d.mem.close()


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path)
    yield g
    g.close()


def host_connect(g: Guest, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(g.uds)
    s.sendall(f"CONNECT {port}\n".encode())
    s.settimeout(5)
    return s


def test_host_connects_to_a_listening_guest_and_data_flows(guest):
    s = host_connect(guest, 5000)
    ((hdr, _),) = guest.packets()
    src_cid, dst_cid, src_port, dst_port, _, _, op, *_ = hdr
    assert (src_cid, dst_cid, dst_port, op) == (HOST_CID, CID, 5000, OP_REQUEST)
    guest.send(OP_RESPONSE, 5000, src_port)
    assert s.recv(64) == f"OK {src_port}\n".encode()
    s.sendall(b"ping from the host")
    pkts = guest.packets()
    assert [(h[6], p) for h, p in pkts] == [(OP_RW, b"ping from the host")]
    guest.send(OP_RW, 5000, src_port, b"pong from the guest")
    assert s.recv(64) == b"pong from the guest"
    s.close()  # host hangs up: the guest is told
    assert [h[6] for h, _ in guest.packets()] == [OP_SHUTDOWN]
    guest.send(OP_RST, 5000, src_port)
    assert not guest.dev.conns


def test_guest_refuses_the_host(guest):
    s = host_connect(guest, 5001)
    ((hdr, _),) = guest.packets()
    guest.send(OP_RST, 5001, hdr[2])
    assert s.recv(64) == b""  # closed without OK
    assert not guest.dev.conns


def test_guest_connects_to_a_host_listener(guest, tmp_path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{guest.uds}_6000")
    srv.listen(1)
    srv.settimeout(5)
    guest.send(OP_REQUEST, 1234, 6000)
    conn, _ = srv.accept()
    conn.settimeout(5)
    ((hdr, _),) = guest.packets()
    assert hdr[6] == OP_RESPONSE and (hdr[2], hdr[3]) == (6000, 1234)
    guest.send(OP_RW, 1234, 6000, b"hello host")
    assert conn.recv(64) == b"hello host"
    conn.sendall(b"hello guest")
    assert [(h[6], p) for h, p in guest.packets()] == [(OP_RW, b"hello guest")]
    conn.close()
    srv.close()


def test_nothing_listening_means_reset(guest):
    guest.send(OP_REQUEST, 1234, 6001)
    ((hdr, _),) = guest.packets()
    assert hdr[6] == OP_RST and (hdr[2], hdr[3]) == (6001, 1234)


def test_the_host_never_sends_beyond_the_guests_credit(guest):
    s = host_connect(guest, 5002)
    ((hdr, _),) = guest.packets()
    port = hdr[2]
    guest.send(OP_RESPONSE, 5002, port, buf_alloc=1000)  # the guest can hold 1000 bytes
    s.recv(64)
    s.sendall(b"x" * 5000)
    got = sum(len(p) for h, p in guest.packets() if h[6] == OP_RW)
    assert got == 1000
    guest.fwd = 1000  # consumed: credit for 1000 more
    guest.send(OP_CREDIT_UPDATE, 5002, port, buf_alloc=1000)
    got = sum(len(p) for h, p in guest.packets() if h[6] == OP_RW)
    assert got == 1000
    s.close()


def test_hostile_packets_are_reset_not_fatal(guest):
    s = host_connect(guest, 5003)
    ((hdr, _),) = guest.packets()
    port = hdr[2]
    guest.send(OP_RESPONSE, 5003, port)
    s.recv(64)
    # a length beyond the buffer it came in: reset, connection gone, device fine
    guest.send(OP_RW, 5003, port, b"abc", length=60000)
    assert [h[6] for h, _ in guest.packets()] == [OP_RST]
    assert not guest.dev.conns and not guest.dev.broken
    assert s.recv(64) == b""
    # a spoofed source CID is dropped; a connect to a CID that is not the host is refused
    guest.send(OP_REQUEST, 1, 6002, src_cid=99)
    guest.send(OP_REQUEST, 1, 6002, dst_cid=42)
    # data for a stream that does not exist: reset
    guest.send(OP_RW, 77, 6003, b"zzz")
    assert [(h[0], h[6]) for h, _ in guest.packets()] == [(42, OP_RST), (HOST_CID, OP_RST)]
    # a bare header too short to be one
    guest.d.submit(1, [(guest.d.alloc(b"\x01" * 10), False)])
    assert not guest.dev.broken


def test_bad_cid_and_busy_socket(tmp_path, guest):
    listener = listen_unix(tmp_path / "x.sock", "vsock socket", "vsock.uds_path")
    with pytest.raises(ConfigError, match="reserved"):
        VirtioVsock(2, listener, FakeLoop())
    listener.close()
    with pytest.raises(ConfigError, match="in use by another program: give another vsock.uds_path"):
        listen_unix(guest.uds, "vsock socket", "vsock.uds_path")


def test_restore_tells_the_guest_its_streams_are_gone(guest):
    from corral.devices.virtio.vsock import VsockState

    ev = guest.d.alloc(8)
    guest.d.submit(2, [(ev, True)], kick=False)
    guest.dev.load_state(VsockState(guest_cid=CID))
    guest.d.kick(0)
    ((_head, n),) = guest.d.used(2)
    assert n == 4 and struct.unpack("<I", guest.d.mem.read(ev[0], 4))[0] == 0  # TRANSPORT_RESET


# -- limits: connections, queued bytes and replies, fds, a host that never accepts ---------------
def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def collect(g: Guest, want: int) -> list[tuple[tuple, bytes]]:
    """Read packets until `want` arrived (or nothing more comes)."""
    out: list[tuple[tuple, bytes]] = []
    while len(out) < want:
        got = g.packets()
        if not got:
            break
        out += got
    return out


def test_guest_connects_beyond_the_limit_are_reset_and_fds_stay_bounded(guest):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{guest.uds}_6100")
    srv.listen(1024)  # it never accepts: every connection waits in its backlog
    before = fds()
    n = MAX_CONNECTIONS + 44
    for i in range(n):
        guest.send(OP_REQUEST, 2000 + i, 6100, settle=False)
    replies = {h[3]: h[6] for h, _ in collect(guest, n)}
    assert len(replies) == n
    assert [replies[2000 + i] for i in range(n)] == [OP_RESPONSE] * MAX_CONNECTIONS + [OP_RST] * 44
    assert len(guest.dev.conns) == MAX_CONNECTIONS and fds() - before <= MAX_CONNECTIONS
    # one closes: its slot is free for the next connect
    guest.send(OP_RST, 2000, 6100)
    guest.send(OP_REQUEST, 3000, 6100)
    assert [(h[3], h[6]) for h, _ in collect(guest, 1)] == [(3000, OP_RESPONSE)]
    srv.close()


def test_host_connections_beyond_the_limit_are_closed_at_once(guest):
    before = fds()
    socks = []
    for _ in range(MAX_CONNECTIONS + 10):  # none sends its CONNECT line
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        while True:
            try:
                s.connect(guest.uds)
                break
            except BlockingIOError:  # the listener's backlog is full: let the device accept
                guest.loop.run_ready(timeout=0)
        socks.append(s)
    guest.loop.run_ready(timeout=0)
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
    assert closed == 10
    assert fds() - before <= len(socks) + MAX_CONNECTIONS  # ours, and the device's ends
    for s in socks:
        s.close()


class Hung(Exception):
    """Raised by an alarm in a test whose device call blocked."""


def test_a_host_listener_with_a_full_backlog_does_not_block_the_device(guest):
    full = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    full.bind(f"{guest.uds}_6200")
    full.listen(0)
    waiting = []
    while True:  # fill its backlog
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(f"{guest.uds}_6200")
        except BlockingIOError:
            c.close()
            break
        waiting.append(c)
    ok = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ok.bind(f"{guest.uds}_6201")
    ok.listen(1)

    def hung(*_):
        raise Hung("the device blocked in a connect")

    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        start = time.monotonic()
        guest.send(OP_REQUEST, 4000, 6200)
        guest.send(OP_REQUEST, 4001, 6201)
        assert time.monotonic() - start < 0.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sorted((h[3], h[6]) for h, _ in collect(guest, 2)) == [(4000, OP_RST), (4001, OP_RESPONSE)]
    for s in [full, ok, *waiting]:
        s.close()


def test_data_queued_for_a_slow_host_is_bounded(guest):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{guest.uds}_6300")
    srv.listen(1)
    guest.send(OP_REQUEST, 5000, 6300)
    conn, _ = srv.accept()  # and never reads
    assert [h[6] for h, _ in collect(guest, 1)] == [OP_RESPONSE]
    chunk = b"x" * 32768
    queued = []
    for _ in range(200):  # 6.4 MiB, far beyond what the device offered (its buf_alloc)
        guest.send(OP_RW, 5000, 6300, chunk, settle=False)
        c = guest.dev.conns.get((6300, 5000))
        if c is None:
            break
        queued.append(len(c.to_host))
    assert max(queued) <= BUF_ALLOC
    assert (6300, 5000) not in guest.dev.conns  # the guest ignored its credit: reset
    assert OP_RST in [h[6] for h, _ in collect(guest, 50)]
    conn.close()
    srv.close()


def test_replies_the_guest_never_takes_are_bounded(guest):
    # no receive buffers beyond the 32 posted at start, and packets that each want a reply
    for i in range(MAX_CONTROL + 200):
        guest.send(OP_RW, 1, 7000 + i, b"z", settle=False)  # no such stream: answered by a reset
    assert len(guest.dev._control) <= MAX_CONTROL and guest.dev.dropped >= 200 - 32
    assert not guest.dev.broken
    assert len(collect(guest, MAX_CONTROL + 32)) == MAX_CONTROL + 32  # what was kept arrives


def test_running_out_of_fds_refuses_connections_not_the_loop(guest):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(f"{guest.uds}_6400")
    srv.listen(8)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(f) for f in os.listdir("/proc/self/fd")) + 1, hard))
    fillers = []
    try:
        while True:  # the holes below the limit too: no fd is left
            fillers.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    try:
        host.connect(guest.uds)  # waits in the device's listener: accept() fails with EMFILE
        guest.loop.run_ready()  # no busy loop (run_ready fails on an fd that stays ready)
        guest.send(OP_REQUEST, 6000, 6400)  # socket() fails with EMFILE: reset
        assert [(h[3], h[6]) for h, _ in collect(guest, 1)] == [(6000, OP_RST)]
    finally:
        for f in fillers:
            os.close(f)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # fds again: the next kick listens again, and both sides connect
    host.sendall(b"CONNECT 5005\n")
    guest.send(OP_REQUEST, 6001, 6400)
    guest.loop.run_ready()
    ops = sorted(h[6] for h, _ in collect(guest, 2))
    assert ops == sorted([OP_REQUEST, OP_RESPONSE])
    host.close()
    srv.close()
