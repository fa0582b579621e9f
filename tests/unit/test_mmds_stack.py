"""The MMDS network stack: ARP, the TCP handshake, HTTP over TCP, closes and resets, its bounds,
hostile frames (hypothesis), and virtio-net running it on a real tap: MMDS traffic is answered
into the guest's receive queue and never reaches the tap."""

from __future__ import annotations

import ipaddress
import os
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import FakeLoop
from support.net import rx_packets
from support.virtio_driver import Driver

from corral.devices.mmds import packets as p
from corral.devices.mmds.service import MAX_REQUEST, Mmds
from corral.devices.mmds.stack import (
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_CONTROL,
    MMDS_MAC,
    OUR_MSS,
    RCV_WINDOW,
    MmdsStack,
)

GUEST_MAC = bytes.fromhex("525400c0ffee")
GUEST_IP = ipaddress.IPv4Address("169.254.0.2").packed
MMDS_IP = ipaddress.IPv4Address("169.254.169.254").packed
DATA = {"latest": {"meta-data": {"id": "i-1234", "big": "x" * 20000}}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def arp_request(target: bytes, op: int = p.ARP_REQUEST) -> bytes:
    pkt = p.ARP_PKT.pack(1, p.ETH_P_IP, 6, 4, op, GUEST_MAC, GUEST_IP, bytes(6), target)
    return p.ETH_HDR.pack(b"\xff" * 6, GUEST_MAC, p.ETH_P_ARP) + pkt


def drain(stack: MmdsStack, limit: int = 1000) -> list[bytes]:
    out = []
    while (f := stack.next_frame()) is not None:
        out.append(f)
        assert len(out) < limit, "the stack never stops sending"
    return out


def parse(frame: bytes) -> p.Segment:
    ip = p.parse_ipv4(frame[14:])
    assert ip is not None and ip.src == MMDS_IP and ip.dst == GUEST_IP
    # the checksums the guest will verify
    assert p.checksum(frame[14:34]) == 0
    pseudo = ip.src + ip.dst + struct.pack(">BBH", 0, p.IPPROTO_TCP, len(ip.payload))
    assert p.checksum(pseudo + ip.payload) == 0
    seg = p.parse_tcp(ip.payload)
    assert seg is not None
    return seg


class Peer:
    """The guest's side of one TCP connection, by hand."""

    def __init__(self, stack: MmdsStack, port: int = 40000, dport: int = 80, window: int = 65535) -> None:
        self.stack, self.port, self.dport, self.window = stack, port, dport, window
        self.seq = 1000
        self.ack = 0
        self.received = bytearray()
        self.fin = False

    def send(self, flags: int, data: bytes = b"", *, seq: int | None = None, mss: int | None = None) -> bool:
        frame = p.tcp_frame(
            src_mac=GUEST_MAC,
            dst_mac=MMDS_MAC,
            src_ip=GUEST_IP,
            dst_ip=MMDS_IP,
            src_port=self.port,
            dst_port=self.dport,
            seq=self.seq if seq is None else seq,
            ack=self.ack,
            flags=flags,
            window=self.window,
            data=data,
            mss=mss,
        )
        return self.stack.intercept(frame)

    def connect(self) -> p.Segment:
        assert self.send(p.SYN, mss=1460)
        segs = [parse(f) for f in drain(self.stack)]
        self.others = [s for s in segs if s.dst_port != self.port]  # resets to evicted connections
        (synack,) = [s for s in segs if s.dst_port == self.port]
        assert synack.flags == p.SYN | p.ACK and synack.ack == self.seq + 1
        self.seq += 1
        self.ack = synack.seq + 1
        self.send(p.ACK)
        return synack

    def request(self, raw: bytes) -> None:
        self.send(p.ACK | p.PSH, raw)
        self.seq += len(raw)

    def take(self, segs: list[p.Segment]) -> None:
        for seg in segs:
            if seg.seq == self.ack and seg.data:
                self.received += seg.data
                self.ack = (self.ack + len(seg.data)) & 0xFFFFFFFF
            if seg.flags & p.FIN and seg.seq + len(seg.data) == self.ack:
                self.fin = True
                self.ack += 1

    def collect(self) -> list[p.Segment]:
        """Take what the stack sends, acknowledging in-order data as a guest would."""
        segs = []
        for _ in range(100):
            got = [parse(f) for f in drain(self.stack)]
            if not got:
                break
            self.take(got)
            segs += got
            self.send(p.ACK)
        return segs


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def stack(clock):
    return MmdsStack(Mmds(lambda: DATA), clock=clock)


def test_arp_for_the_mmds_address_is_answered(stack):
    assert stack.intercept(arp_request(MMDS_IP))
    (reply,) = drain(stack)
    dst, src, etype = p.ETH_HDR.unpack_from(reply)
    assert (dst, src, etype) == (GUEST_MAC, MMDS_MAC, p.ETH_P_ARP)
    arp = p.parse_arp(reply[14:])
    assert (arp.op, arp.sender_mac, arp.sender_ip, arp.target_ip) == (
        p.ARP_REPLY,
        MMDS_MAC,
        MMDS_IP,
        GUEST_IP,
    )
    assert stack.intercept(arp_request(MMDS_IP, op=p.ARP_REPLY)) and drain(stack) == []  # taken, no answer


def test_other_traffic_passes(stack):
    assert not stack.intercept(arp_request(ipaddress.IPv4Address("169.254.0.1").packed))
    other = p.tcp_frame(
        src_mac=GUEST_MAC, dst_mac=b"\x02" * 6, src_ip=GUEST_IP, dst_ip=bytes([10, 0, 0, 1]),
        src_port=1, dst_port=80, seq=0, ack=0, flags=p.SYN, window=100,
    )  # fmt: skip
    assert not stack.intercept(other)
    assert not stack.intercept(p.ETH_HDR.pack(b"\xff" * 6, GUEST_MAC, 0x86DD) + bytes(60))  # IPv6
    assert not stack.intercept(b"\x00" * 10)
    assert drain(stack) == []


def test_configured_address():
    stack = MmdsStack(Mmds(lambda: DATA), "169.254.170.2")
    assert not stack.intercept(arp_request(MMDS_IP))
    assert stack.intercept(arp_request(ipaddress.IPv4Address("169.254.170.2").packed))


def test_handshake(stack):
    peer = Peer(stack)
    synack = peer.connect()
    assert synack.mss == OUR_MSS and synack.window == RCV_WINDOW
    assert stack.connections == 1 and drain(stack) == []  # a bare ACK needs no answer


def test_v1_get_over_tcp_then_close(stack):
    peer = Peer(stack)
    peer.connect()
    peer.request(b"GET /latest/meta-data/id HTTP/1.1\r\nHost: x\r\n\r\n")
    peer.collect()
    head, _, body = bytes(peer.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"i-1234"
    assert b"Content-Length: 6" in head and not peer.fin  # keep-alive
    # the guest closes: its FIN is acknowledged, the stack closes too and forgets the connection
    peer.send(p.FIN | p.ACK)
    peer.seq += 1
    segs = peer.collect()
    assert any(s.flags & p.FIN for s in segs) and peer.fin
    assert stack.connections == 0


def test_large_response_in_mss_segments_within_the_window(stack):
    peer = Peer(stack, window=4000)
    peer.send(p.SYN, mss=1000)
    synack = parse(drain(stack)[0])
    peer.seq += 1
    peer.ack = synack.seq + 1
    peer.send(p.ACK)
    peer.request(b"GET /latest/meta-data/big HTTP/1.1\r\nConnection: close\r\n\r\n")
    first = [parse(f) for f in drain(stack)]
    data = [s for s in first if s.data]
    assert all(len(s.data) <= 1000 for s in data) and sum(len(s.data) for s in data) <= 4000
    peer.take(first)
    peer.send(p.ACK)
    peer.collect()
    assert peer.received.endswith(b"x" * 20000) and peer.fin  # Connection: close -> FIN after it


def test_duplicate_acks_resend_from_the_first_unacked_byte(stack):
    peer = Peer(stack)
    peer.connect()
    peer.request(b"GET /latest/meta-data/id HTTP/1.1\r\n\r\n")
    lost = [parse(f) for f in drain(stack)]  # the guest never saw these
    assert any(s.data for s in lost)
    peer.send(p.ACK)
    peer.send(p.ACK)  # two duplicate ACKs: go back
    peer.collect()
    assert peer.received.endswith(b"i-1234")


def test_out_of_order_data_is_not_taken(stack):
    peer = Peer(stack)
    peer.connect()
    peer.send(p.ACK, b"GET / HTTP/1.1\r\n\r\n", seq=peer.seq + 5)
    (ack,) = [parse(f) for f in drain(stack)]
    assert ack.ack == peer.seq and not ack.data  # re-acknowledges what it has


def test_unknown_connections_and_ports_get_resets(stack):
    peer = Peer(stack)
    peer.send(p.ACK, b"hello")
    (rst,) = [parse(f) for f in drain(stack)]
    assert rst.flags & p.RST
    closed = Peer(stack, dport=22)
    closed.send(p.SYN)
    (rst,) = [parse(f) for f in drain(stack)]
    assert rst.flags == p.RST | p.ACK and rst.ack == closed.seq + 1
    assert stack.connections == 0


def test_a_reset_from_the_guest_drops_the_connection(stack):
    peer = Peer(stack)
    peer.connect()
    peer.send(p.RST)
    assert stack.connections == 0 and drain(stack) == []


def test_connections_are_bounded_and_idle_ones_expire(stack, clock):
    resets = []
    for i in range(MAX_CONNECTIONS + 5):
        clock.now += 0.01
        peer = Peer(stack, port=20000 + i)
        peer.connect()
        resets += peer.others
    assert stack.connections == MAX_CONNECTIONS
    # the longest idle ones were evicted, each told so with a RST
    assert sorted(s.dst_port for s in resets if s.flags & p.RST) == list(range(20000, 20005))
    assert stack.stats["evicted"] == 5
    clock.now += IDLE_TIMEOUT + 2
    Peer(stack, port=30000).send(p.SYN)
    assert stack.connections == 1


def test_oversized_request_gets_400_and_a_close(stack):
    peer = Peer(stack)
    peer.connect()
    junk = b"GET /" + b"a" * (MAX_REQUEST + 100)
    for i in range(0, len(junk), 1000):
        peer.request(junk[i : i + 1000])
        peer.collect()
    assert peer.received.startswith(b"HTTP/1.1 400") and peer.fin


def test_the_window_bounds_what_a_connection_holds(stack):
    peer = Peer(stack)
    peer.connect()
    peer.send(p.ACK, b"a" * (RCV_WINDOW + 5000))  # no end of headers, more than the window
    assert all(len(c.inbuf) <= RCV_WINDOW for c in stack._conns.values())


def test_v2_over_tcp(clock):
    stack = MmdsStack(Mmds(lambda: DATA, version="V2"), clock=clock)
    peer = Peer(stack)
    peer.connect()
    peer.request(b"GET /latest/meta-data/id HTTP/1.1\r\n\r\n")
    peer.collect()
    assert peer.received.startswith(b"HTTP/1.1 401")
    peer.received.clear()
    peer.request(b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n")
    peer.collect()
    token = bytes(peer.received).partition(b"\r\n\r\n")[2].decode()
    peer.received.clear()
    peer.request(f"GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n".encode())
    peer.collect()
    assert bytes(peer.received).endswith(b"\r\n\r\ni-1234")


# -- hostile frames ------------------------------------------------------------------------------
def _mmds_headed(body: bytes) -> bytes:
    """Random bytes behind real Ethernet/IPv4 headers for the MMDS address, so the fuzz reaches
    the TCP code and not only the first length check."""
    ip = p.IP_HDR.pack(0x45, 0, 20 + len(body), 0, 0, 64, p.IPPROTO_TCP, 0, GUEST_IP, MMDS_IP)
    return p.ETH_HDR.pack(MMDS_MAC, GUEST_MAC, p.ETH_P_IP) + ip + body


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=200), st.binary(max_size=120).map(_mmds_headed)), max_size=40))
def test_random_frames_never_raise_nor_grow_without_bound(frames):
    stack = MmdsStack(Mmds(lambda: DATA))
    for f in frames:
        assert stack.intercept(f) in (True, False)
        for _ in range(MAX_CONTROL + 10 * MAX_CONNECTIONS):
            if stack.next_frame() is None:
                break
    assert stack.connections <= MAX_CONNECTIONS and len(stack._control) <= MAX_CONTROL
    assert all(len(c.inbuf) <= RCV_WINDOW for c in stack._conns.values())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0x3F),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFFFF),
            st.binary(max_size=64),
            st.integers(1, 3),
        ),
        max_size=60,
    )
)
def test_random_segments_on_live_connections_never_raise(segments):
    clock = Clock()
    stack = MmdsStack(Mmds(lambda: DATA, version="V2"), clock=clock)
    peer = Peer(stack)
    peer.connect()
    peer.request(b"GET /latest/meta-data/big HTTP/1.1\r\n\r\n")
    for flags, seq, ack, window, data, port in segments:
        clock.now += 0.5
        frame = p.tcp_frame(
            src_mac=GUEST_MAC, dst_mac=MMDS_MAC, src_ip=GUEST_IP, dst_ip=MMDS_IP,
            src_port=40000 + port % 2, dst_port=80, seq=seq, ack=ack, flags=flags, window=window, data=data,
        )  # fmt: skip
        assert stack.intercept(frame)
        sent = drain(stack)
        assert len(sent) < 1000
    assert stack.connections <= MAX_CONNECTIONS


# -- on a virtio-net device ------------------------------------------------------------------------
@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun for a tap"
)
def test_virtio_net_answers_mmds_and_keeps_it_off_the_tap(tmp_path):
    from corral.backends.tap import Tap
    from corral.devices.virtio.net import VirtioNet

    name = "crmd" + uuid.uuid4().hex[:8]
    stack = MmdsStack(Mmds(lambda: DATA))
    dev = VirtioNet(Tap(name), GUEST_MAC, FakeLoop(), stack)
    d = Driver(dev)
    try:
        d.setup()
        bufs = [d.alloc(2048) for _ in range(8)]
        for b in bufs:
            d.submit(0, [(b, True)], kick=False)
        d.kick(0)
        before = rx_packets(name)
        d.submit(1, [(d.alloc(bytes(12) + arp_request(MMDS_IP)), False)])
        assert [h for h, _ in d.used(1)] == [0]  # the transmit completed
        # the host may have put a frame of its own in first (IPv6 chatter on a fresh tap)
        frames = [d.mem.read(bufs[head][0], n) for head, n in d.used(0)]
        (reply,) = [f for f in frames if f[12:18] == GUEST_MAC and f[18:24] == MMDS_MAC]
        assert reply[:12] == bytes(10) + b"\x01\x00"  # a plain header, one buffer
        assert p.parse_arp(reply[26:]).sender_mac == MMDS_MAC
        assert rx_packets(name) == before and dev.stats["tx_frames"] == 0  # nothing on the tap
    finally:
        d.close()
