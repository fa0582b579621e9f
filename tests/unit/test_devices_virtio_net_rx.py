"""virtio-net's batched receive on hostile rings: whatever receive queue a driver builds (chains
that loop, leave RAM, mix readable and writable buffers, tables inside tables, a bogus avail
index) and whatever frames wait, one pass of the device (frames read straight into guest RAM,
chains taken in growing steps and put back when unused) completes exactly what a device taking
one buffer at a time would, with at most one used-index store and one interrupt. The frames come
from a real socket pair standing in for the tap (one datagram per frame, as a tap reads)."""

from __future__ import annotations

import socket
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.fakes import FakeLoop

from corral.devices.virtio.net import VNET_HDR_LEN, VirtioNet
from corral.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from corral.memory import GuestMemory

MiB = 1 << 20
SIZE = 16
DESC, AVAIL, USED, TABLE = 0x10000, 0x20000, 0x30000, 0x50000
TX = 0x60000  # the transmit queue's rings (unused here)
BUFS = 0x100000
F_MRG_RXBUF = 1 << 15


class SocketTap:
    """A NetBackend over one end of a SOCK_SEQPACKET pair: each read is one whole frame."""

    name = "socketpair"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()

    def set_offload(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool) -> None:
        pass

    def close(self) -> None:
        self.sock.close()


class Interrupts:
    def __init__(self) -> None:
        self.queue: list[int] = []
        self.config = 0

    def signal_queue(self, index: int) -> None:
        self.queue.append(index)

    def signal_config(self) -> None:
        self.config += 1


def _ring(mem: GuestMemory, table, indirect, heads, avail_idx) -> None:
    mem.write(DESC, b"".join(struct.pack("<QIHH", *d) for d in table))
    mem.write(TABLE, b"".join(struct.pack("<QIHH", *d) for d in indirect))
    for i, h in enumerate(heads):
        mem.write(AVAIL + 4 + 2 * i, struct.pack("<H", h))
    mem.write(AVAIL + 2, struct.pack("<H", avail_idx))


def _used(mem: GuestMemory) -> list[tuple[int, int]]:
    idx = struct.unpack("<H", mem.read(USED + 2, 2))[0]
    return [struct.unpack("<II", mem.read(USED + 4 + 8 * (i % SIZE), 8)) for i in range(idx)]


def _reference(q: Virtqueue, frames: list[bytes], mergeable: bool) -> tuple[bool, int, int, bytes | None]:
    """A device taking one buffer at a time for one frame at a time: (broken, delivered,
    dropped, the frame left waiting)."""
    delivered = dropped = 0
    for frame in frames:
        chains: list[DescriptorChain] = []
        room = 0
        try:
            while room < len(frame):
                chain = q.pop()
                if chain is None:
                    q.undo_pop(len(chains))
                    return False, delivered, dropped, frame
                chains.append(chain)
                room += chain.writable_len
                if not mergeable:
                    break
        except VirtqueueError:
            return True, delivered, dropped, frame
        if room < len(frame) or chains[0].writable_len < VNET_HDR_LEN:
            for c in chains:
                q.push(c.head, 0)
            dropped += 1
            continue
        pos = 0
        for c in chains:
            n = q.write_all(c, frame[pos : pos + c.writable_len])
            q.push(c.head, n)
            pos += n
        delivered += 1
    return False, delivered, dropped, None


# mostly sane (so batches of several frames happen), sometimes hostile. Buffers and indirect
# tables never share RAM: a frame the device reads into a buffer that is also a table rewrites
# the table, which the one-at-a-time reference cannot model (the outcome then hangs on the
# frame's bytes)
descriptor = st.tuples(
    st.sampled_from([BUFS] * 4 + [BUFS + 0x10000, BUFS + 0x20000] * 2 + [16 * MiB - 8, 1 << 40, TABLE]),
    st.sampled_from([0, 8, 12, 64, 256, 2048, 2048, 9100, 9100]),
    st.sampled_from([2] * 8 + [3, 3, 0, 1, 4, 6, 7]),  # WRITE; NEXT, readable, INDIRECT
    st.integers(0, 2 * SIZE),  # next: in range or not
).map(
    lambda d: (
        d
        if bool(d[2] & 4) == (d[0] == TABLE) or d[0] > 16 * MiB - 16
        else (TABLE if d[2] & 4 else BUFS, *d[1:])
    )
)
head = st.sampled_from(list(range(SIZE)) * 4 + [SIZE, SIZE + 3])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptor, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptor, min_size=4, max_size=4),
    heads=st.lists(head, max_size=SIZE),
    bogus_idx=st.none() | st.none() | st.none() | st.integers(0, 0xFFFF),
    sizes=st.lists(st.sampled_from([14, 60, 200, 1500, 3000, 9000]), max_size=8),
    mergeable=st.booleans(),
    event_idx=st.booleans(),
)
# found by this test: a chain whose two buffers alias one address, a frame too big for it, no
# second chain: the waiting frame was read back from the aliased RAM, not as it came
@example(
    table=[(1 << 20, 0, 2, 0)] * 7 + [(1 << 20, 8, 3, 15)] + [(1 << 20, 0, 2, 0)] * 7 + [(1 << 20, 8, 2, 0)],
    indirect=[(1 << 20, 0, 2, 0)] * 4,
    heads=[7],
    bogus_idx=None,
    sizes=[14],
    mergeable=True,
    event_idx=False,
)
def test_batched_receive_agrees_with_one_buffer_at_a_time(
    table, indirect, heads, bogus_idx, sizes, mergeable, event_idx
):
    frames = [bytes(VNET_HDR_LEN) + bytes((7 * i + k) & 0xFF for k in range(n)) for i, n in enumerate(sizes)]
    avail_idx = len(heads) if bogus_idx is None else bogus_idx
    mem, ref_mem = GuestMemory(16 * MiB), GuestMemory(16 * MiB)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    dev = VirtioNet(SocketTap(ours), b"\x52\x54\x00\x00\x00\x01", FakeLoop())
    try:
        for m in (mem, ref_mem):
            _ring(m, table, indirect, heads, avail_idx)
        rx = Virtqueue(mem, 0, SIZE, DESC, AVAIL, USED, event_idx=event_idx, indirect=True)
        tx = Virtqueue(mem, 1, SIZE, TX, TX + 0x1000, TX + 0x2000, event_idx=event_idx, indirect=True)
        irq = Interrupts()
        dev.activate(mem, [rx, tx], irq, F_MRG_RXBUF if mergeable else 0)
        for f in frames:
            peer.send(f)
        publishes: list[int] = []
        store = mem.store_u16

        def counting(gpa: int, value: int) -> None:
            if gpa == USED + 2:
                publishes.append(value)
            store(gpa, value)

        mem.store_u16 = counting  # type: ignore[method-assign]
        dev._receive()

        ref_q = Virtqueue(ref_mem, 0, SIZE, DESC, AVAIL, USED, event_idx=event_idx, indirect=True)
        broken, delivered, dropped, waiting = _reference(ref_q, frames, mergeable)
        assert _used(mem) == _used(ref_mem)
        assert dev.broken == broken
        if not broken:
            assert rx.last_avail == ref_q.last_avail  # unused chains were put back
            assert dev._pending == waiting
        assert (dev.stats["rx_frames"], dev.stats["rx_dropped"]) == (delivered, dropped)
        assert len(publishes) <= 1 and len(irq.queue) <= 1
        assert bool(irq.queue) <= bool(_used(mem))  # no interrupt without a completion
        if _used(mem) and not event_idx and not broken:
            assert irq.queue == [0]  # flags 0: the driver wants its interrupt
    finally:
        dev.close()
        peer.close()
        mem.close()
        ref_mem.close()
