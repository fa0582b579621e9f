"""The split virtqueue (corral.devices.virtio.queue) against chains built to cost the device time:
a chain holds at most the queue size in buffers, direct and indirect together, so a huge indirect
table, an oversized one or a looping one is refused at once; and a device serves at most a queue's
worth of requests per wake, leaving the rest for the loop's next turn."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import FakeLoop
from support.virtio_driver import Driver

from corral.devices.virtio.queue import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
)
from corral.devices.virtio.rng import VirtioRng
from corral.memory import GuestMemory

MiB = 1 << 20
DESC, AVAIL, USED = 0x10000, 0x20000, 0x30000
TABLE = 0x100000  # indirect tables from 1 MiB on
BUF = 0x80000  # every descriptor points at the same 16 bytes: sizes are the point, not data
FAST = 0.5  # seconds: generous for a refusal that takes a few steps, far below a 65,536-step walk


@pytest.fixture
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def make_queue(mem: GuestMemory, size: int = 256) -> Virtqueue:
    return Virtqueue(mem, 0, size, DESC, AVAIL, USED, event_idx=False, indirect=True)


def desc(addr: int, length: int, flags: int = 0, nxt: int = 0) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, nxt)


def chain_table(mem: GuestMemory, at: int, n: int, *, loop_to: int | None = None) -> None:
    """n buffer descriptors at `at`, linked 0 -> 1 -> ... -> n-1 (-> `loop_to`, if given)."""
    raw = bytearray()
    for i in range(n):
        if i < n - 1:
            raw += desc(BUF, 16, F_NEXT, i + 1)
        elif loop_to is None:
            raw += desc(BUF, 16)
        else:
            raw += desc(BUF, 16, F_NEXT, loop_to)
    mem.write(at, bytes(raw))


def offer(mem: GuestMemory, head: int = 0) -> None:
    mem.write(AVAIL + 4, struct.pack("<H", head))
    mem.write(AVAIL + 2, struct.pack("<H", 1))


def refused(q: Virtqueue, match: str) -> None:
    start = time.monotonic()
    with pytest.raises(VirtqueueError, match=match):
        q.pop()
    assert time.monotonic() - start < FAST


def test_a_65536_entry_indirect_table_is_refused_at_once(mem):
    q = make_queue(mem)
    chain_table(mem, TABLE, 65536)  # a well-formed chain of 65,536 buffers: 1 MiB of table
    mem.write(DESC, desc(TABLE, 65536 * 16, F_INDIRECT))
    offer(mem)
    refused(q, "indirect table of 65536 descriptors is larger than the queue size 256")


def test_a_table_larger_than_the_queue_is_refused(mem):
    q = make_queue(mem)
    chain_table(mem, TABLE, 4096)
    mem.write(DESC, desc(TABLE, 4096 * 16, F_INDIRECT))
    offer(mem)
    refused(q, "4096 descriptors is larger than the queue size 256")


def test_direct_and_indirect_together_may_not_exceed_the_queue(mem):
    q = make_queue(mem)
    # 100 direct buffers, then a table of 157: 257 buffers in a 256 queue
    chain_table(mem, DESC, 101)
    mem.write(DESC + 100 * 16, desc(TABLE, 157 * 16, F_INDIRECT))
    chain_table(mem, TABLE, 157)
    offer(mem)
    refused(q, "longer than the queue size 256")
    # one fewer fits exactly: a chain of the queue size is what a driver may build
    chain_table(mem, TABLE, 156)
    mem.write(DESC + 100 * 16, desc(TABLE, 156 * 16, F_INDIRECT))
    mem.write(AVAIL + 4 + 2, struct.pack("<H", 0))
    mem.write(AVAIL + 2, struct.pack("<H", 2))
    chain = q.pop()
    assert chain is not None and len(chain.readable) == 256


def test_a_full_size_indirect_table_is_served(mem):
    # Linux virtio-blk's largest request: header, seg_max (254) data buffers and the status
    q = make_queue(mem)
    chain_table(mem, TABLE, 255)
    mem.write(TABLE + 255 * 16, desc(BUF, 1, F_WRITE))
    mem.write(TABLE + 254 * 16, desc(BUF, 16, F_NEXT, 255))
    mem.write(DESC, desc(TABLE, 256 * 16, F_INDIRECT))
    offer(mem)
    chain = q.pop()
    assert chain is not None and (len(chain.readable), len(chain.writable)) == (255, 1)


@pytest.mark.parametrize("entries", [256, 2])
def test_a_loop_inside_an_indirect_table_is_refused(mem, entries):
    q = make_queue(mem)
    chain_table(mem, TABLE, entries, loop_to=0)
    mem.write(DESC, desc(TABLE, entries * 16, F_INDIRECT))
    offer(mem)
    refused(q, "longer than the queue size 256 \\(or a loop\\)")


def test_nested_and_chained_indirect_tables_are_refused(mem):
    q = make_queue(mem)
    mem.write(TABLE, desc(TABLE + 0x1000, 16, F_INDIRECT))  # a table pointing at another
    mem.write(DESC, desc(TABLE, 16, F_INDIRECT))
    offer(mem)
    refused(q, "indirect descriptor not allowed here")
    mem.write(DESC, desc(TABLE, 16, F_INDIRECT | F_NEXT, 1))  # INDIRECT with NEXT
    mem.write(AVAIL + 4 + 2, struct.pack("<H", 0))
    mem.write(AVAIL + 2, struct.pack("<H", 2))
    refused(q, "bad indirect table")


@settings(max_examples=30, deadline=None)
@given(
    size=st.sampled_from([16, 256, 1024]),
    direct=st.integers(0, 2000),
    entries=st.integers(1, 65536),
    loop_to=st.none() | st.integers(0, 65535),
)
def test_any_chain_costs_at_most_the_queue_size(size, direct, entries, loop_to):
    with GuestMemory(16 * MiB) as mem:
        q = make_queue(mem, size)
        d = direct % size  # direct buffers before the indirect descriptor
        chain_table(mem, DESC, d + 1)
        mem.write(DESC + d * 16, desc(TABLE, entries * 16, F_INDIRECT))
        chain_table(mem, TABLE, entries, loop_to=None if loop_to is None else loop_to % entries)
        offer(mem)
        start = time.monotonic()
        try:
            chain = q.pop()
        except VirtqueueError:
            chain = None
        assert time.monotonic() - start < FAST
        ok = entries <= size and d + entries <= size and loop_to is None
        assert (chain is not None) == ok
        if chain is not None:
            assert len(chain.readable) == d + entries


class RefillingRng(VirtioRng):
    """An rng whose guest hands every buffer straight back while it is being served, as a vCPU
    refilling the ring concurrently would, `refills` times in all."""

    def __init__(self, refills: int) -> None:
        super().__init__()
        self.driver: Driver | None = None
        self.refills = refills
        self.served = 0

    def _fill(self, chain: DescriptorChain) -> int:
        self.served += 1
        if self.refills and self.driver is not None:
            self.refills -= 1
            self.driver.put_avail(0, chain.head, kick=False)
        return super()._fill(chain)


def test_a_device_serves_a_queues_worth_per_wake_then_yields():
    loop = FakeLoop()
    dev = RefillingRng(refills=10 * 64)
    d = Driver(dev, loop=loop)
    dev.driver = d
    try:
        d.setup(queue_size=64)
        for _ in range(8):
            d.submit(0, [(d.alloc(16), True)], kick=False)
        loop.held = True
        d.kick(0)
        loop.callbacks.pop(0)()  # the kick: one turn of the loop
        assert dev.served == 64  # a queue's worth, though the guest keeps refilling
        assert len(loop.callbacks) == 1  # the rest is rescheduled, behind other work
        turns = 1
        while loop.callbacks:
            loop.callbacks.pop(0)()
            turns += 1
        assert dev.served == 8 + 10 * 64 and turns == 11
        assert len(d.used(0)) == dev.served
    finally:
        d.close()
