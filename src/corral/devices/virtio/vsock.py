"""virtio-vsock with the host side on Unix sockets, in the style of Firecracker.

* Host to guest: a program connects to `uds_path` and writes `CONNECT <port>\\n`; corral opens a
  stream to the guest's port and answers `OK <host port>\\n` once the guest accepts (the socket
  is closed if it refuses). Bytes then flow both ways.
* Guest to host: a guest connecting to CID 2, port P, reaches whatever listens on the Unix
  socket `<uds_path>_<P>`; nothing there means the guest's connect is refused.

Queues: rx (0, device to driver), tx (1), event (2). Every packet starts with a 44-byte header;
flow control is credit-based: each side says how much buffer it has (buf_alloc) and how much it
has consumed (fwd_cnt), and never sends more than the other can hold. Everything the guest puts
in a header is checked: its own CID as the source, the host as the destination, lengths within
the buffers; a packet that breaks a rule is answered with a reset, never with a failure of the VMM.
Connections do not survive a snapshot: a restored guest is told the transport was reset.

Limits, because both sides are outside input: at most MAX_CONNECTIONS streams and host
connections awaiting their CONNECT line (beyond it a guest request is reset, a host connection
closed at once); BUF_ALLOC bytes queued toward each host socket (a guest beyond its credit is
reset); MAX_CONTROL replies waiting for receive buffers (beyond it they are dropped, and a stream
that needed one is closed). Nothing blocks the loop: host sockets are non-blocking, connects
included (a Unix socket connects at once or fails with EAGAIN when its backlog is full: the guest
is reset), and running out of fds (EMFILE) refuses connections, not the loop.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.devices.base import DeviceState
from corral.devices.virtio.base import VIRTIO_ID_VSOCK, VirtioDevice, VirtioInterrupt
from corral.devices.virtio.queue import VirtqueueError
from corral.errors import ConfigError
from corral.lazymodel import Field

if TYPE_CHECKING:
    from corral.devices.virtio.queue import DescriptorChain, Virtqueue
    from corral.eventloop import EventLoop
    from corral.memory import GuestMemory

log = logging.getLogger(__name__)

HDR = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
EVENT_TRANSPORT_RESET = 0
RXQ, TXQ, EVQ = 0, 1, 2
BUF_ALLOC = 256 * 1024  # what corral buffers per connection toward the host socket
MAX_PAYLOAD = 64 * 1024  # per packet from the guest
FIRST_HOST_PORT = 1 << 30  # local ports corral picks for host-initiated streams
CONNECT_LINE_MAX = 64
MAX_CONNECTIONS = 256  # streams plus host connections not yet past their CONNECT line
MAX_CONTROL = 1024  # replies queued for the guest while it posts no receive buffers


@dataclass
class _Conn:
    sock: socket.socket
    host_port: int
    guest_port: int
    established: bool = False
    host_initiated: bool = False
    peer_buf_alloc: int = 0  # the guest's receive buffer and consumption, from its headers
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # bytes from the guest written to the host socket
    last_credit: int = 0  # fwd_cnt last announced to the guest
    to_host: bytearray = field(default_factory=bytearray)  # waiting for the host socket
    readable: bool = False
    watching: bool = False
    host_eof: bool = False
    guest_shut: int = 0

    def credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


class VsockState(DeviceState):
    guest_cid: int = Field(
        ge=3,
        lt=0xFFFF_FFFF,
        description="the guest's context id (its address; streams themselves do not survive a snapshot)",
    )


class VirtioVsock(VirtioDevice[VsockState]):
    device_id = VIRTIO_ID_VSOCK
    queue_sizes = (128, 128, 16)
    state_model = VsockState

    def __init__(self, guest_cid: int, listener: socket.socket, loop: EventLoop) -> None:
        """`listener` is the listening Unix socket at the uds path (backends.unix_socket.
        listen_unix); guest connects go to sockets beside it. The device closes and unlinks it."""
        super().__init__()
        if not 3 <= guest_cid < 0xFFFF_FFFF:
            raise ConfigError(f"vsock.cid {guest_cid} is reserved: give 3 or more")
        self.guest_cid, self.loop = guest_cid, loop
        self.uds_path: str = listener.getsockname()
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self.evq: Virtqueue | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.conns: dict[tuple[int, int], _Conn] = {}  # (host port, guest port)
        self._control: deque[bytes] = deque()  # packets for the guest, in order
        self._pending_connects: dict[int, socket.socket] = {}
        self._next_port = FIRST_HOST_PORT
        self._reset_event = False
        self._pump_queued = False  # a _pump is scheduled on the loop (its per-wake budget ran out)
        self.dropped = 0  # replies the guest never had room for (MAX_CONTROL)
        self.listener = listener
        self.listener.setblocking(False)
        self._accepting = False
        self._accept_on()

    def device_features(self) -> int:
        return 0  # VIRTIO_VSOCK_F_STREAM is implied

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        self.rx, self.tx, self.evq = queues[RXQ], queues[TXQ], queues[EVQ]
        self.interrupt = interrupt

    def reset(self) -> None:
        super().reset()
        for key in list(self.conns):
            self._drop(key)
        self._control.clear()
        self.rx = self.tx = self.evq = self.interrupt = None

    def close(self) -> None:
        for key in list(self.conns):
            self._drop(key)
        for s in self._pending_connects.values():
            s.close()
        self._pending_connects.clear()
        self._accept_off()
        self.listener.close()
        try:
            os.unlink(self.uds_path)
        except OSError:
            pass

    def save_state(self) -> VsockState:
        return VsockState(guest_cid=self.guest_cid)

    def load_state(self, state: VsockState) -> None:
        # streams do not survive: the restored guest learns that from a transport reset event
        self._reset_event = True

    # -- host side ---------------------------------------------------------------------------------
    def _live(self) -> int:
        return len(self.conns) + len(self._pending_connects)

    def _accept_on(self) -> None:
        if not self._accepting and self.listener.fileno() >= 0:
            self.loop.add_reader(self.listener.fileno(), self._accept)
            self._accepting = True

    def _accept_off(self) -> None:
        if self._accepting:
            self.loop.remove_reader(self.listener.fileno())
            self._accepting = False

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # the listener stays readable: watching it would spin. Listen again when a
                # connection of ours closes (or the guest kicks)
                log.warning("vsock: cannot accept a host connection (%s): paused", exc.strerror)
                self._accept_off()
            return
        if self._live() >= MAX_CONNECTIONS:
            sock.close()  # the host program reads EOF at once
            return
        sock.setblocking(False)
        fd = sock.fileno()
        self._pending_connects[fd] = sock
        buf = bytearray()

        def read_connect() -> None:
            try:
                data = sock.recv(CONNECT_LINE_MAX - len(buf))
            except BlockingIOError:
                return
            except OSError:
                data = b""
            buf.extend(data)
            if b"\n" not in buf and data and len(buf) < CONNECT_LINE_MAX:
                return
            self.loop.remove_reader(fd)
            del self._pending_connects[fd]
            line, _, rest = bytes(buf).partition(b"\n")
            parts = line.split()
            if (
                len(parts) != 2
                or parts[0] != b"CONNECT"
                or not parts[1].isdigit()
                or int(parts[1]) > 0xFFFF_FFFF
                or self.rx is None
            ):
                sock.close()
                self._accept_on()
                return
            self._connect_to_guest(sock, int(parts[1]), rest)

        self.loop.add_reader(fd, read_connect)

    def _connect_to_guest(self, sock: socket.socket, guest_port: int, early: bytes) -> None:
        host_port = self._next_port
        self._next_port = FIRST_HOST_PORT + (self._next_port + 1 - FIRST_HOST_PORT) % (1 << 30)
        conn = _Conn(sock, host_port, guest_port, host_initiated=True)
        self.conns[(host_port, guest_port)] = conn
        if early:
            log.debug("vsock: %d bytes sent before OK are dropped", len(early))
        self._send(conn, OP_REQUEST)
        self._pump()

    def _watch(self, conn: _Conn, on: bool) -> None:
        if on and not conn.watching:
            key = (conn.host_port, conn.guest_port)
            self.loop.add_reader(conn.sock.fileno(), lambda: self._host_readable(key))
            conn.watching = True
        elif not on and conn.watching:
            self.loop.remove_reader(conn.sock.fileno())
            conn.watching = False

    def _host_readable(self, key: tuple[int, int]) -> None:
        conn = self.conns.get(key)
        if conn is None:
            return
        conn.readable = True
        self._watch(conn, False)
        self._pump()

    def _drop(self, key: tuple[int, int]) -> None:
        conn = self.conns.pop(key, None)
        if conn is not None:
            self._watch(conn, False)
            self.loop.remove_writer(conn.sock.fileno())
            conn.sock.close()
            self._accept_on()  # an fd and a connection slot are free again

    # -- packets to the guest -------------------------------------------------------------------
    def _header(self, conn: _Conn, op: int, length: int = 0, flags: int = 0) -> bytes:
        return HDR.pack(
            HOST_CID,
            self.guest_cid,
            conn.host_port,
            conn.guest_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            BUF_ALLOC,
            conn.fwd_cnt,
        )

    def _queue(self, pkt: bytes) -> bool:
        """Queue a reply for the guest; False (and dropped) once MAX_CONTROL wait already."""
        if len(self._control) >= MAX_CONTROL:
            if not self.dropped:
                log.warning("vsock: the guest takes no replies: dropping them")
            self.dropped += 1
            return False
        self._control.append(pkt)
        return True

    def _send(self, conn: _Conn, op: int, flags: int = 0) -> None:
        if op in (OP_RW, OP_CREDIT_UPDATE, OP_RESPONSE, OP_REQUEST):
            conn.last_credit = conn.fwd_cnt
        if not self._queue(self._header(conn, op, 0, flags)):
            self._drop((conn.host_port, conn.guest_port))  # a stream that lost a reply is gone

    def _rst(self, src_cid: int, dst_cid: int, src_port: int, dst_port: int) -> None:
        """Reset a stream that has no connection (answering the guest's packet)."""
        self._queue(HDR.pack(dst_cid, src_cid, dst_port, src_port, 0, TYPE_STREAM, OP_RST, 0, BUF_ALLOC, 0))

    def _pump(self) -> None:
        """Move what can move to the guest: control packets first, then stream data within the
        guest's credit, while the receive queue has buffers: at most a queue's worth per call
        (a guest that refills as fast as it is served would hold the loop), the rest on the
        loop's next turn."""
        self._pump_queued = False
        rx, interrupt = self.rx, self.interrupt
        if rx is None or interrupt is None or self.broken:
            return
        used = False
        budget = rx.size

        def take() -> DescriptorChain | None:
            nonlocal budget
            if budget == 0:
                return None
            budget -= 1
            return rx.pop()

        try:
            if self._reset_event and self.evq is not None:
                chain = self.evq.pop()
                if chain is not None:
                    self.evq.push(
                        chain.head, self.evq.write_all(chain, struct.pack("<I", EVENT_TRANSPORT_RESET))
                    )
                    self._reset_event = False
                    if self.evq.needs_interrupt():
                        interrupt.signal_queue(EVQ)
            while self._control:
                chain = take()
                if chain is None:
                    break
                pkt = self._control.popleft()
                rx.push(chain.head, rx.write_all(chain, pkt))
                used = True
            for key, conn in list(self.conns.items()):
                if not conn.established:
                    continue
                while conn.readable and conn.credit() > 0 and not self._control:
                    chain = take()
                    if chain is None:
                        break
                    room = min(chain.writable_len - HDR.size, conn.credit(), MAX_PAYLOAD)
                    if room <= 0:
                        rx.push(chain.head, 0)
                        used = True
                        continue
                    try:
                        data = conn.sock.recv(room)
                    except BlockingIOError:
                        rx.undo_pop()
                        conn.readable = False
                        break
                    except OSError:
                        data = b""
                    if not data:
                        rx.undo_pop()
                        conn.readable = False
                        conn.host_eof = True
                        self._send(conn, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)
                        break
                    conn.tx_cnt += len(data)
                    conn.last_credit = conn.fwd_cnt
                    rx.push(chain.head, rx.write_all(chain, self._header(conn, OP_RW, len(data)) + data))
                    used = True
                if key in self.conns and not conn.readable and not conn.host_eof:
                    self._watch(conn, True)
        except VirtqueueError as exc:
            self.fail(str(exc))
            interrupt.signal_config()
            return
        if used and rx.needs_interrupt():
            interrupt.signal_queue(RXQ)
        if budget == 0 or (self._control and rx.has_available()):
            # the budget ran out, or control packets were queued on the way (a host EOF)
            self._pump_soon()

    def _pump_soon(self) -> None:
        if not self._pump_queued:
            self._pump_queued = True
            self.loop.call_soon(self._pump)

    # -- packets from the guest ------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        if index == TXQ and self.tx is not None and self.interrupt is not None:
            self.serve(self.tx, self.interrupt, self._from_guest)
        if not self._accepting and self._live() < MAX_CONNECTIONS:
            self._accept_on()  # paused by EMFILE: try again, once per kick
        self._pump()

    def _from_guest(self, chain: DescriptorChain) -> int:
        assert self.tx is not None
        if chain.readable_len < HDR.size:
            return 0
        head = self.tx.read_all(chain, HDR.size)
        src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt = HDR.unpack(head)
        if src_cid != self.guest_cid or dst_cid != HOST_CID or ptype != TYPE_STREAM:
            # spoofed source, another destination, or a socket type corral does not carry
            if op != OP_RST and ptype == TYPE_STREAM and src_cid == self.guest_cid:
                self._rst(src_cid, dst_cid, src_port, dst_port)
            return 0
        if length > MAX_PAYLOAD or length > chain.readable_len - HDR.size:
            self._rst(src_cid, dst_cid, src_port, dst_port)
            conn = self.conns.get((dst_port, src_port))
            if conn is not None:
                self._drop((dst_port, src_port))
            return 0
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if conn is not None:
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            if conn is None:
                self._accept_from_guest(dst_port, src_port, buf_alloc, fwd_cnt)
            return 0
        if conn is None:
            if op != OP_RST:
                self._rst(src_cid, dst_cid, src_port, dst_port)
            return 0
        if op == OP_RESPONSE and conn.host_initiated and not conn.established:
            conn.established = True
            try:
                conn.sock.sendall(f"OK {conn.host_port}\n".encode())
            except OSError:
                self._send(conn, OP_RST)
                self._drop(key)
                return 0
            conn.readable = True
        elif op == OP_RW and conn.established:
            payload = self.tx.read_all(chain, HDR.size + length)[HDR.size :]
            if len(conn.to_host) + len(payload) > BUF_ALLOC:
                self._send(conn, OP_RST)  # the guest ignored our credit
                self._drop(key)
                return 0
            conn.to_host += payload
            self._flush_to_host(conn)
        elif op == OP_CREDIT_REQUEST:
            self._send(conn, OP_CREDIT_UPDATE)
        elif op == OP_SHUTDOWN:
            conn.guest_shut |= flags
            self._after_guest_shutdown(conn)
        elif op == OP_RST:
            self._drop(key)
        elif op == OP_CREDIT_UPDATE:
            pass  # credit already taken from the header
        else:
            self._send(conn, OP_RST)
            self._drop(key)
        return 0

    def _host_writable(self, key: tuple[int, int]) -> None:
        conn = self.conns.get(key)
        if conn is None:
            return
        self.loop.remove_writer(conn.sock.fileno())
        self._flush_to_host(conn)
        if key in self.conns and conn.guest_shut:
            self._after_guest_shutdown(conn)
        self._pump()

    def _after_guest_shutdown(self, conn: _Conn) -> None:
        """Once every byte the guest sent before its SHUTDOWN is in the host socket: pass a SEND
        shutdown on, and end a stream neither side will use again with the RST that completes a
        clean disconnect. Never before: those bytes were sent within credit (a Linux guest's
        close() sends its last write and a full SHUTDOWN together) and must reach the host."""
        if conn.to_host:
            return  # _host_writable calls again once the host has taken them
        if conn.guest_shut & SHUTDOWN_SEND:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if conn.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND or conn.host_eof:
            self._send(conn, OP_RST)
            self._drop((conn.host_port, conn.guest_port))

    def _accept_from_guest(self, host_port: int, guest_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        refuse = (self.guest_cid, HOST_CID, guest_port, host_port)
        if self._live() >= MAX_CONNECTIONS:
            self._rst(*refuse)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:  # out of fds (EMFILE, ENFILE) or memory: this connect fails, not the loop
            self._rst(*refuse)
            return
        try:
            # non-blocking, so the loop never waits: a Unix socket connects at once, or fails
            # (EAGAIN: the listener's backlog is full; ENOENT, ECONNREFUSED: nobody listens)
            sock.setblocking(False)
            sock.connect(f"{self.uds_path}_{host_port}")
        except OSError:
            sock.close()
            self._rst(*refuse)
            return
        conn = _Conn(
            sock,
            host_port,
            guest_port,
            established=True,
            peer_buf_alloc=buf_alloc,
            peer_fwd_cnt=fwd_cnt,
            readable=True,
        )
        self.conns[(host_port, guest_port)] = conn
        self._send(conn, OP_RESPONSE)

    def _flush_to_host(self, conn: _Conn) -> None:
        key = (conn.host_port, conn.guest_port)
        while conn.to_host:
            try:
                n = conn.sock.send(conn.to_host)
            except BlockingIOError:
                # the host reads slowly: finish when it can take more
                self.loop.add_writer(conn.sock.fileno(), lambda: self._host_writable(key))
                break
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    self._send(conn, OP_RST)
                    self._drop((conn.host_port, conn.guest_port))
                return
            del conn.to_host[:n]
            conn.fwd_cnt += n
        # tell the guest about freed buffer space once a good part of it is free again
        if conn.fwd_cnt - conn.last_credit >= BUF_ALLOC // 4:
            self._send(conn, OP_CREDIT_UPDATE)
