"""The MMDS network stack one virtio-net interface carries: it looks at each frame the guest
transmits, keeps the ones for the MMDS address (ARP for it, IPv4 to it) and answers them from
inside the VMM; every other frame goes on to the tap unchanged.

TCP here is the least a passive HTTP server needs, in the manner of Firecracker's MMDS stack:
SYN -> SYN-ACK, in-order data only (anything else is dropped and re-acknowledged, so the guest
retransmits), ACKs, FIN and RST, go-back-N on duplicate ACKs. Nothing is ever queued without a
bound: at most MAX_CONNECTIONS connections (a new one evicts the longest idle, which gets a RST),
connections idle for IDLE_TIMEOUT are dropped, each holds at most RCV_WINDOW bytes of request
(the window it advertises) and stops reading requests while MAX_OUTPUT bytes of responses wait,
and control frames (ARP replies, RSTs) wait in a queue of MAX_CONTROL, dropped beyond (the guest
retries). Data segments are not queued at all: `next_frame` builds the next one when the device
has a receive buffer for it, so none is lost on the way and no retransmission timer is needed.

Hostile frames: parsing is bounded (packets.py) and a frame that does not parse is not MMDS
traffic; `intercept` never raises.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.devices.mmds import packets as p
from corral.devices.mmds.service import MAX_REQUEST, BadRequest, Mmds, Response, parse_request

log = logging.getLogger(__name__)

MMDS_MAC = bytes.fromhex("060123456701")  # the MAC Firecracker's MMDS answers ARP with
DEFAULT_IPV4 = "169.254.169.254"
MMDS_PORT = 80
MAX_CONNECTIONS = 32
MAX_CONTROL = 64
IDLE_TIMEOUT = 30.0  # seconds
RCV_WINDOW = MAX_REQUEST
MAX_OUTPUT = 64 * 1024  # plus one response: the API caps the data store at 51,200 bytes
OUR_MSS = 1460
DEFAULT_MSS = 536  # RFC 1122, when a SYN carries none
M32 = 0xFFFFFFFF


@dataclass
class _Conn:
    peer_mac: bytes
    peer_ip: bytes
    peer_port: int
    iss: int
    rcv_nxt: int
    peer_mss: int
    peer_window: int
    last_seen: float
    syn_acked: bool = False
    syn_pending: bool = True  # a SYN-ACK to (re)send
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)  # response bytes from `una` on
    una: int = 0  # sequence number of out[0] (set past the SYN when the connection opens)
    sent: int = 0  # bytes of `out` sent and not yet acknowledged
    need_ack: bool = False
    dupacks: int = 0
    reading: bool = True  # False once a response closes the connection
    peer_fin: bool = False
    fin_queued: bool = False
    fin_sent: bool = False
    fin_acked: bool = False

    def window(self) -> int:
        return max(0, RCV_WINDOW - len(self.inbuf))


class MmdsStack:
    """The frame filter handed to VirtioNet for an interface MMDS is served on."""

    def __init__(
        self, mmds: Mmds, ipv4: str | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.mmds, self.clock = mmds, clock
        self.ip = ipaddress.IPv4Address(ipv4 or DEFAULT_IPV4).packed
        self.mac = MMDS_MAC
        self._conns: dict[tuple[bytes, int], _Conn] = {}
        self._control: deque[bytes] = deque()
        self._ident = 0
        self._next_sweep = 0.0
        self.stats = {"frames_in": 0, "frames_out": 0, "requests": 0, "evicted": 0, "control_dropped": 0}

    # -- guest -> MMDS ----------------------------------------------------------------------------
    def intercept(self, frame: bytes) -> bool:
        """True when `frame` (an Ethernet frame, no virtio-net header) was MMDS traffic and has
        been taken; False to let it go to the tap."""
        try:
            return self._intercept(frame)
        except Exception:  # a bug here must cost a frame, never the device loop
            log.exception("MMDS: dropped a frame the stack could not handle")
            return True

    def _intercept(self, frame: bytes) -> bool:
        eth = p.ethertype(frame)
        if eth is None:
            return False
        _dst, src_mac, etype = eth
        payload = frame[p.ETH_HDR.size :]
        if etype == p.ETH_P_ARP:
            arp = p.parse_arp(payload)
            if arp is None or arp.target_ip != self.ip:
                return False
            self.stats["frames_in"] += 1
            if arp.op == p.ARP_REQUEST:
                self._queue_control(p.arp_reply(self.mac, self.ip, arp))
            return True
        if etype != p.ETH_P_IP:
            return False
        ip = p.parse_ipv4(payload)
        if ip is None or ip.dst != self.ip:
            return False
        self.stats["frames_in"] += 1
        if ip.proto == p.IPPROTO_TCP:
            seg = p.parse_tcp(ip.payload)
            if seg is not None:
                self._sweep()
                self._tcp(src_mac, ip.src, seg)
        return True  # anything else for the MMDS address is dropped here, never forwarded

    def _tcp(self, mac: bytes, ip: bytes, seg: p.Segment) -> None:
        key = (ip, seg.src_port)
        conn = self._conns.get(key)
        if seg.dst_port != MMDS_PORT:
            self._reset(mac, ip, seg)
            return
        if seg.flags & p.RST:
            self._drop(key)
            return
        if seg.flags & p.SYN:
            if conn is not None and not conn.syn_acked and seg.seq == (conn.rcv_nxt - 1) & M32:
                conn.syn_pending = True  # our SYN-ACK was lost: send it again
                conn.last_seen = self.clock()
                return
            if seg.flags & p.ACK:
                self._reset(mac, ip, seg)
                return
            self._open(key, mac, ip, seg)
            return
        if conn is None:
            self._reset(mac, ip, seg)
            return
        conn.last_seen = self.clock()
        if seg.flags & p.ACK:
            self._on_ack(conn, seg)
        if not conn.syn_acked:
            return  # data before the handshake completed: dropped, the guest resends
        self._on_data(conn, seg)

    def _open(self, key: tuple[bytes, int], mac: bytes, ip: bytes, seg: p.Segment) -> None:
        self._conns.pop(key, None)
        if len(self._conns) >= MAX_CONNECTIONS:
            victim_key = min(self._conns, key=lambda k: self._conns[k].last_seen)
            victim = self._conns.pop(victim_key)
            self.stats["evicted"] += 1
            self._queue_control(self._segment(victim, p.RST | p.ACK, seq=self._snd_nxt(victim)))
        self._conns[key] = _Conn(
            peer_mac=mac,
            peer_ip=ip,
            peer_port=seg.src_port,
            iss=secrets.randbits(32),
            rcv_nxt=(seg.seq + 1) & M32,
            peer_mss=max(64, min(seg.mss or DEFAULT_MSS, OUR_MSS)),
            peer_window=seg.window,
            last_seen=self.clock(),
        )
        conn = self._conns[key]
        conn.una = (conn.iss + 1) & M32

    def _on_ack(self, conn: _Conn, seg: p.Segment) -> None:
        window_moved = seg.window != conn.peer_window
        conn.peer_window = seg.window
        if not conn.syn_acked:
            if seg.ack == conn.una:
                conn.syn_acked, conn.syn_pending = True, False
            return
        acked = (seg.ack - conn.una) & M32
        limit = conn.sent + (1 if conn.fin_sent else 0)
        if acked > limit:
            return  # acknowledges what was never sent (or is old): ignored
        if acked == 0:
            if conn.sent and not seg.data and not seg.flags & p.FIN and not window_moved:
                conn.dupacks += 1
                if conn.dupacks >= 2:  # go back: send everything unacknowledged again
                    conn.sent, conn.fin_sent, conn.dupacks = 0, False, 0
            return
        conn.dupacks = 0
        taken = min(acked, conn.sent)
        del conn.out[:taken]
        conn.sent -= taken
        conn.una = (conn.una + taken) & M32
        if acked > taken:
            conn.fin_acked = True

    def _on_data(self, conn: _Conn, seg: p.Segment) -> None:
        data = seg.data
        if data or seg.flags & p.FIN:
            conn.need_ack = True
        if data:
            if seg.seq != conn.rcv_nxt:
                return  # out of order or a retransmission: re-acknowledged, not taken
            take = data[: conn.window()] if conn.reading else data
            if conn.reading:
                conn.inbuf += take
            conn.rcv_nxt = (conn.rcv_nxt + len(take)) & M32
            self._serve(conn)
            if len(take) < len(data):
                return  # past the window: the rest (and any FIN) comes again
        if seg.flags & p.FIN and (seg.seq + len(data)) & M32 == conn.rcv_nxt and not conn.peer_fin:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & M32
            conn.peer_fin = True
            conn.fin_queued = True
            conn.reading = False

    def _serve(self, conn: _Conn) -> None:
        """Answer every complete request waiting, while the responses stay under MAX_OUTPUT."""
        while conn.reading and len(conn.out) < MAX_OUTPUT:
            try:
                parsed = parse_request(conn.inbuf)
            except BadRequest as exc:
                resp = Response(400, str(exc).encode(), close=True)
                parsed = None
            else:
                if parsed is None:
                    return
                req, used = parsed
                del conn.inbuf[:used]
                resp = self.mmds.respond(req)
                resp.close = resp.close or not req.keep_alive
            self.stats["requests"] += 1
            conn.out += resp.encode()
            if resp.close:
                conn.reading, conn.fin_queued = False, True
                conn.inbuf.clear()

    def _reset(self, mac: bytes, ip: bytes, seg: p.Segment) -> None:
        """Answer a segment no connection takes with a RST (RFC 9293 3.10.7.1)."""
        if seg.flags & p.RST:
            return
        if seg.flags & p.ACK:
            seq, ack, flags = seg.ack, 0, p.RST
        else:
            length = len(seg.data) + (1 if seg.flags & p.SYN else 0) + (1 if seg.flags & p.FIN else 0)
            seq, ack, flags = 0, (seg.seq + length) & M32, p.RST | p.ACK
        self._queue_control(
            self._frame(mac, ip, seg.dst_port, seg.src_port, seq=seq, ack=ack, flags=flags, window=0)
        )

    def _sweep(self) -> None:
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for key, conn in list(self._conns.items()):
            if now - conn.last_seen > IDLE_TIMEOUT:
                self._drop(key)
                self.stats["evicted"] += 1

    def _drop(self, key: tuple[bytes, int]) -> None:
        self._conns.pop(key, None)

    # -- MMDS -> guest ----------------------------------------------------------------------------
    def next_frame(self) -> bytes | None:
        """The next frame for the guest (an Ethernet frame, no virtio-net header), or None."""
        if self._control:
            self.stats["frames_out"] += 1
            return self._control.popleft()
        for key, conn in list(self._conns.items()):
            frame = self._next_segment(conn)
            if conn.peer_fin and conn.fin_acked and not conn.need_ack:
                self._drop(key)  # both sides closed and acknowledged
            elif frame is not None:
                self._conns[key] = self._conns.pop(key)  # round robin: to the back
            if frame is not None:
                self.stats["frames_out"] += 1
                return frame
        return None

    def _snd_nxt(self, c: _Conn) -> int:
        if not c.syn_acked:
            return c.una
        return (c.una + c.sent + (1 if c.fin_sent else 0)) & M32

    def _next_segment(self, c: _Conn) -> bytes | None:
        if c.syn_pending:
            c.syn_pending = False
            return self._segment(c, p.SYN | p.ACK, seq=c.iss, mss=OUR_MSS)
        if not c.syn_acked:
            return None
        unsent = len(c.out) - c.sent
        room = min(c.peer_window - c.sent, c.peer_mss)
        if unsent > 0 and room > 0:
            n = min(unsent, room)
            seq = self._snd_nxt(c)
            data = bytes(c.out[c.sent : c.sent + n])
            c.sent += n
            c.need_ack = False
            flags = p.ACK | (p.PSH if c.sent == len(c.out) else 0)
            return self._segment(c, flags, seq=seq, data=data)
        if c.fin_queued and not c.fin_sent and unsent == 0:
            seq = self._snd_nxt(c)
            c.fin_sent, c.need_ack = True, False
            return self._segment(c, p.FIN | p.ACK, seq=seq)
        if c.need_ack:
            c.need_ack = False
            return self._segment(c, p.ACK, seq=self._snd_nxt(c))
        return None

    def _segment(self, c: _Conn, flags: int, *, seq: int, data: bytes = b"", mss: int | None = None) -> bytes:
        return self._frame(
            c.peer_mac,
            c.peer_ip,
            MMDS_PORT,
            c.peer_port,
            seq=seq,
            ack=c.rcv_nxt,
            flags=flags,
            window=c.window(),
            data=data,
            mss=mss,
        )

    def _frame(
        self,
        mac: bytes,
        ip: bytes,
        sport: int,
        dport: int,
        *,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        data: bytes = b"",
        mss: int | None = None,
    ) -> bytes:
        self._ident = (self._ident + 1) & 0xFFFF
        return p.tcp_frame(
            src_mac=self.mac,
            dst_mac=mac,
            src_ip=self.ip,
            dst_ip=ip,
            src_port=sport,
            dst_port=dport,
            seq=seq,
            ack=ack,
            flags=flags,
            window=window,
            data=data,
            mss=mss,
            ident=self._ident,
        )

    def _queue_control(self, frame: bytes) -> None:
        if len(self._control) >= MAX_CONTROL:
            self.stats["control_dropped"] += 1
            return
        self._control.append(frame)

    @property
    def connections(self) -> int:
        return len(self._conns)
