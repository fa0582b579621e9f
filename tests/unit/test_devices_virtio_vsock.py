"""virtio-vsock driven by the Python driver on one side and real Unix sockets on the other, as a
host program would use them (Firecracker's CONNECT protocol)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from support.fakes import FakeLoop
from support.virtio_driver import Driver

from corral.backends.unix_socket import listen_unix
from corral.devices.virtio.vsock import (
    HDR,
    HOST_CID,
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
