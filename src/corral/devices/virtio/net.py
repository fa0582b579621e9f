"""virtio-net over a tap device: receive queue 0, transmit queue 1 (virtio 1.2 section 5.1).

Frames cross between the guest and the tap with their 12-byte virtio-net header unchanged (the
tap speaks the same header), so checksum offload and TSO work in both directions with no
per-packet work in Python beyond moving bytes: a transmitted frame leaves with one `writev`
straight from guest RAM, a received one is read with one `readv` straight into the guest's
buffer. Both directions work in batches: every frame the tap has ready (up to RX_BATCH per
wake-up, so a flood cannot hold the loop) or the driver posted, completed with one used-index
store and at most one interrupt (transmit without a filter, and receive of frames that fit the
next chain, run in C when the compiled path is there: fastpath.py). The tap's fd sits on the
VM's event loop while the guest has receive buffers; when it runs out, the fd is parked until
the guest refills the queue (otherwise a level-triggered epoll would spin), and a frame that
did not fit waits in `_pending` rather than being dropped. A tap whose reads fail (its interface
deleted under the VM: every read fails and the fd polls readable for ever) is parked the same
way and tried again on the guest's next kick: each failure is counted (`rx_errors`) and logged
once until a read succeeds.

A frame filter handed in at construction (devices/mmds: MmdsStack, for an interface MMDS is
served on) sees each transmitted frame first and may keep it from the tap; the frames it has for
the guest are delivered before the tap's, as receive buffers allow.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from typing import TYPE_CHECKING, Protocol

from corral.devices.base import NoState
from corral.devices.virtio import fastpath
from corral.devices.virtio.base import VIRTIO_ID_NET, VirtioDevice, VirtioInterrupt
from corral.devices.virtio.queue import VirtqueueError

if TYPE_CHECKING:
    from corral.devices.virtio.queue import DescriptorChain, Virtqueue
    from corral.eventloop import EventLoop
    from corral.memory import GuestMemory

log = logging.getLogger(__name__)

F_CSUM, F_GUEST_CSUM, F_MAC = 1 << 0, 1 << 1, 1 << 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN = 1 << 7, 1 << 8, 1 << 9
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN = 1 << 11, 1 << 12, 1 << 13
F_MRG_RXBUF, F_STATUS = 1 << 15, 1 << 16
STATUS_LINK_UP = 1
RXQ, TXQ = 0, 1
VNET_HDR_LEN = 12  # virtio 1.x header, num_buffers included
MAX_FRAME = VNET_HDR_LEN + 65535 + 14 + 4  # the largest GSO frame a tap hands over (+ VLAN)
_NUM_BUFFERS = struct.Struct("<H")
_ONE_BUFFER = _NUM_BUFFERS.pack(1)
RX_BATCH = 64  # frames per wake-up at most: a peer flooding the tap cannot hold the loop


class NetBackend(Protocol):
    """The host end as the device sees it (backends/tap.py: Tap): a non-blocking fd carrying
    frames with a 12-byte virtio-net header each, its name (for logs), the offloads it may
    hand the guest, close."""

    fd: int
    name: str

    def set_offload(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool) -> None: ...

    def close(self) -> None: ...


class FrameFilter(Protocol):
    """Takes some of the guest's frames before the tap (True: taken) and has frames of its own
    for the guest. Frames are Ethernet frames without the virtio-net header."""

    def intercept(self, frame: bytes) -> bool: ...

    def next_frame(self) -> bytes | None: ...


class VirtioNet(VirtioDevice[NoState]):
    device_id = VIRTIO_ID_NET
    queue_sizes = (256, 256)
    state_model = NoState  # nothing beyond its queues

    def __init__(
        self, tap: NetBackend, mac: bytes, loop: EventLoop, frame_filter: FrameFilter | None = None
    ) -> None:
        super().__init__()
        self.tap, self.mac, self.loop = tap, mac, loop
        self.filter = frame_filter
        self._filtered = False  # the filter took a frame: it may have answers for the guest
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.mergeable = False
        self._reading = False
        self._buf = bytearray(MAX_FRAME)
        self._bounce = memoryview(self._buf)
        self._pending: bytes | None = None
        self._read_failed = False  # this pass's tap read failed: park the tap
        self._read_failing = False  # logged; cleared by the next read that succeeds
        self.stats = {
            "rx_frames": 0,
            "tx_frames": 0,
            "rx_bytes": 0,
            "tx_bytes": 0,
            "tx_dropped": 0,
            "rx_dropped": 0,
            "rx_errors": 0,
        }

    def io_counters(self) -> dict[str, int]:
        """Frames and bytes each way, and frames dropped (GET /corral/stats)."""
        return dict(self.stats)

    def device_features(self) -> int:
        return (
            F_MAC
            | F_STATUS
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_MRG_RXBUF
        )

    def config_bytes(self) -> bytes:
        # mac, status, max_virtqueue_pairs
        return self.mac + struct.pack("<HH", STATUS_LINK_UP, 1)

    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        self.rx, self.tx, self.interrupt = queues[RXQ], queues[TXQ], interrupt
        self.mergeable = bool(driver_features & F_MRG_RXBUF)
        # segmentation offloads only ride on checksum offload
        csum = bool(driver_features & F_GUEST_CSUM)
        self.tap.set_offload(
            csum=csum,
            tso4=csum and bool(driver_features & F_GUEST_TSO4),
            tso6=csum and bool(driver_features & F_GUEST_TSO6),
            ecn=csum and bool(driver_features & F_GUEST_ECN),
        )
        self._start_reading()

    def reset(self) -> None:
        super().reset()
        self._stop_reading()
        self.rx = self.tx = self.interrupt = None
        self._pending = None

    def close(self) -> None:
        self._stop_reading()
        self.tap.close()

    # -- the loop's view of the tap -------------------------------------------------------------------
    def _start_reading(self) -> None:
        if not self._reading and self.tap.fd >= 0:
            self.loop.add_reader(self.tap.fd, self._tap_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.tap.fd)
            self._reading = False

    def queue_notify(self, index: int) -> None:
        if index == TXQ:
            self._transmit()
            if self._read_failing and not self._reading:
                self._receive()  # a parked failing tap is tried again on the guest's kicks
        elif index == RXQ:
            self._receive()  # new buffers: deliver what waited, listen again

    # -- guest -> tap ----------------------------------------------------------------------------------
    def _transmit(self) -> None:
        if self.tx is None or self.interrupt is None:
            return
        if self.filter is None and self._transmit_compiled(self.tx, self.interrupt):
            return
        self.serve(self.tx, self.interrupt, self._send_one)
        if self._filtered:
            self._filtered = False
            self._receive()

    def _transmit_compiled(self, tx: Virtqueue, interrupt: VirtioInterrupt) -> bool:
        """`serve` with `_send_one`, done in C (fastpath.py): the same frames, counters,
        completions and interrupt. False when it could not run (memory tracked or closed)."""
        done = fastpath.net_tx(tx, self.tap.fd)
        if done is None:
            return False
        self.stats["tx_frames"] += done.served
        self.stats["tx_bytes"] += done.bytes_out
        self.stats["tx_dropped"] += done.failed
        if done.error:
            self.fail(done.error)
            interrupt.signal_config()
        elif tx.needs_interrupt():
            interrupt.signal_queue(tx.index)
        return True

    def _send_one(self, chain: DescriptorChain) -> int:
        assert self.tx is not None
        n = chain.readable_len
        if n <= VNET_HDR_LEN or n > MAX_FRAME:
            self.stats["tx_dropped"] += 1  # no frame, or larger than any NIC sends
            return 0
        try:
            if self.filter is None:  # straight from guest RAM: one writev, one frame, no copy
                mem = self.tx.memory
                os.writev(self.tap.fd, [mem.view(addr, length) for addr, length in chain.readable])
            else:  # the MMDS filter sees the whole frame first
                frame = self.tx.read_all(chain)
                if self.filter.intercept(frame[VNET_HDR_LEN:]):
                    self._filtered = True
                    return 0
                os.write(self.tap.fd, frame)
            self.stats["tx_frames"] += 1
            self.stats["tx_bytes"] += n - VNET_HDR_LEN
        except OSError as exc:
            # a full tap queue (EAGAIN) or a frame the host stack rejects: the frame is lost,
            # as on a wire; the guest's stack retransmits
            self.stats["tx_dropped"] += 1
            if exc.errno != errno.EAGAIN:
                log.debug("tap %s refused a frame: %s", self.tap.name, exc.strerror)
        return 0

    # -- tap -> guest ---------------------------------------------------------------------------------
    def _tap_readable(self) -> None:
        self._receive()

    def _receive(self) -> None:
        """Deliver every frame the tap has ready, up to RX_BATCH, as far as receive buffers
        allow, then publish them with one used-index store and at most one interrupt. A frame
        that finds no buffer waits in `_pending` and the tap is parked until the guest kicks the
        receive queue. Frames go straight from the tap into guest RAM (one `readv` per frame)
        when the next buffer holds them; a larger one spills into a bounce buffer and is copied
        over the buffers after it (mergeable) or dropped (a driver without them posted too little)."""
        rx, interrupt = self.rx, self.interrupt
        if rx is None or interrupt is None or self.broken:
            self._stop_reading()  # a tap left readable and unread would spin the loop
            return
        batch = fast = 0
        self._read_failed = False
        if self.filter is None and self._pending is None:
            batch, fast = self._receive_compiled(rx)
        bufs = _RxBuffers(rx)
        done: list[tuple[int, int]] = []
        parked = False
        for _ in range(batch, RX_BATCH):
            frame = self._pending
            if frame is None and self.filter is not None:
                own = self.filter.next_frame()
                frame = None if own is None else bytes(VNET_HDR_LEN) + own
            if frame is None:
                chain = bufs.next()
                if chain is not None and chain.writable_len >= VNET_HDR_LEN and _disjoint(chain.writable):
                    got = self._read_into(rx, chain, done)
                    if got is True:
                        continue  # delivered in place
                    bufs.unget(1)
                    frame = got if isinstance(got, bytes) else None  # too large: copied below
                else:
                    if chain is not None:
                        bufs.unget(1)
                    frame = self._read_frame()  # held in `_pending` if there is no buffer
                if frame is None:
                    break  # the tap is drained
            if not self._place(rx, bufs, frame, done):
                self._pending = frame
                parked = True  # until the guest adds buffers
                break
            self._pending = None
        bufs.finish()
        rx.push_many(done)
        if bufs.error is not None and parked:
            self.fail(str(bufs.error))
            self._stop_reading()
            interrupt.signal_config()
            return
        if parked or self._read_failed:
            self._stop_reading()
        else:
            self._start_reading()
        if (done or fast) and rx.needs_interrupt():
            interrupt.signal_queue(RXQ)

    def _receive_compiled(self, rx: Virtqueue) -> tuple[int, int]:
        """The common case of `_receive` in C (fastpath.py): frames that fit the next chain,
        read straight into it. Returns the frames of the batch it used up (a spilled one
        included: it waits in `_pending`, read from its chain and the bounce buffer) and those
        it delivered; the Python loop serves the rest of the batch."""
        got = fastpath.net_rx(rx, self.tap.fd, self._bounce, RX_BATCH)
        if got is None:
            return 0, 0
        self.stats["rx_frames"] += got.frames
        self.stats["rx_bytes"] += got.bytes
        if got.frames:
            self._read_failing = False
        if got.status == fastpath.RX_FAILED:
            self._tap_failed(got.errno)
            return RX_BATCH, got.frames  # parked: the Python loop would only fail again
        if got.status == fastpath.RX_DRAINED:
            return RX_BATCH, got.frames  # the tap is empty: nothing left for the loop
        if got.status == fastpath.RX_SPILL:  # whole in the bounce buffer; its chain is still next
            self._pending = bytes(self._bounce[: got.spilled])  # (never walked again: the guest
            return got.frames, got.frames  # may have changed it since)
        return got.frames, got.frames

    def _read_frame(self) -> bytes | None:
        """The tap's next frame through the bounce buffer; None when it has none."""
        try:
            n = os.readv(self.tap.fd, [self._buf])
        except BlockingIOError:
            return None
        except OSError as exc:
            self._tap_failed(exc.errno or errno.EIO)
            return None
        self._read_failing = False
        return bytes(self._bounce[:n])

    def _read_into(self, rx: Virtqueue, chain: DescriptorChain, done: list[tuple[int, int]]) -> bool | bytes:
        """Read the tap's next frame straight into `chain` (at least a header long): True when it
        fit and is in `done`; the whole frame as bytes when it did not (the chain is not used);
        False when the tap has no frame."""
        mem = rx.memory
        iov = [mem.view(addr, length) for addr, length in chain.writable]
        room = chain.writable_len
        iov.append(self._bounce)  # what does not fit spills here
        try:
            n = os.readv(self.tap.fd, iov)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._tap_failed(exc.errno or errno.EIO)
            return False
        self._read_failing = False
        if n > room:
            head = b"".join(bytes(v) for v in iov[:-1])
            return head + bytes(self._bounce[: n - room])
        rx.write_all(chain, _ONE_BUFFER, skip=10)  # num_buffers
        done.append((chain.head, n))
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += max(n - VNET_HDR_LEN, 0)  # a read shorter than a header: none
        return True

    def _tap_failed(self, err: int) -> None:
        """A tap read failed with `err` (not EAGAIN): park the tap for this pass, count it, and
        say so once per run of failures (the guest's kicks retry it: a log line each would let a
        guest flood the host's log)."""
        self._read_failed = True
        self.stats["rx_errors"] += 1
        if not self._read_failing:
            self._read_failing = True
            log.warning(
                "tap %s: read failed: %s (parked until the guest's next kick)",
                self.tap.name,
                os.strerror(err),
            )

    def _place(self, rx: Virtqueue, bufs: _RxBuffers, frame: bytes, done: list[tuple[int, int]]) -> bool:
        """Copy one frame into the next buffers (several with mergeable buffers); False (nothing
        consumed) when they run out first."""
        chains: list[DescriptorChain] = []
        room = 0
        while room < len(frame):
            chain = bufs.next()
            if chain is None:
                bufs.unget(len(chains))
                return False
            chains.append(chain)
            room += chain.writable_len
            if not self.mergeable:
                break
        if room < len(frame) or chains[0].writable_len < VNET_HDR_LEN:
            # a driver without mergeable buffers posted buffers too small for this frame
            done.extend((c.head, 0) for c in chains)
            self.stats["rx_dropped"] += 1
            return True
        pos = 0
        for c in chains:
            n = rx.write_all(c, frame[pos : pos + c.writable_len])
            if c is chains[0]:
                rx.write_all(c, _NUM_BUFFERS.pack(len(chains)), skip=10)
            done.append((c.head, n))
            pos += n
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += max(len(frame) - VNET_HDR_LEN, 0)
        return True


def _disjoint(segments: list[tuple[int, int]]) -> bool:
    """Whether no two (addr, length) buffers overlap. A frame read straight into buffers that
    alias each other could not be read back whole if it has to wait, so such a chain takes the
    bounce path, as one a guest shares with itself deserves."""
    if len(segments) == 1:
        return True
    end = -1
    for addr, length in sorted(segments):
        if addr < end:
            return False
        end = addr + length
    return True


class _RxBuffers:
    """The receive chains of one pass, taken from the ring in growing steps (1, 2, 4... up to
    RX_BATCH: a wake-up for one frame validates one chain, a flood takes the ring in a few
    passes) and handed out in ring order; `finish` puts back those not used. A malformed ring
    stops the supply (`error`); it only breaks the device when a frame needed a buffer past it,
    as a device taking buffers one at a time would find."""

    def __init__(self, rx: Virtqueue) -> None:
        self.rx = rx
        self.start = rx.last_avail
        self.chains: list[DescriptorChain] = []
        self.used = 0
        self.step = 1
        self.error: VirtqueueError | None = None

    def next(self) -> DescriptorChain | None:
        if self.used == len(self.chains):
            if self.error is not None:
                return None
            try:  # no more than a pass can fill (mergeable frames may need more: then 1 at a time)
                self.rx.pop_into(self.chains, max(1, min(self.step, RX_BATCH - len(self.chains))))
            except VirtqueueError as exc:
                self.error = exc
            self.step = min(2 * self.step, RX_BATCH)
            if self.used == len(self.chains):
                return None
        self.used += 1
        return self.chains[self.used - 1]

    def unget(self, count: int) -> None:
        self.used -= count

    def finish(self) -> None:
        """Put back every request taken past the used ones (a malformed one included)."""
        taken = (self.rx.last_avail - self.start) & 0xFFFF
        self.rx.undo_pop(taken - self.used)
