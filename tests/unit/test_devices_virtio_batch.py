"""Batched virtqueue service (issue 16): a device takes every request posted before a kick in
one pass, completes them with one used-index publish and at most one interrupt, and the batched
walk (`Virtqueue.pop_into`) agrees with the one-at-a-time reference (`pop`) on any ring a
hostile driver can build, down to where it stops and what it refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.virtio_driver import Driver, blk_image_file

from corral.backends.disk import open_disk
from corral.devices.virtio import fastpath
from corral.devices.virtio.base import F_EVENT_IDX, STATUS_NEEDS_RESET
from corral.devices.virtio.blk import HEADER, S_OK, T_IN, T_OUT, VirtioBlock
from corral.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from corral.memory import GuestMemory

MiB = 1 << 20
QD = 32


@pytest.fixture
def drv(tmp_path):
    d = Driver(VirtioBlock(open_disk(str(blk_image_file(tmp_path / "disk.img")))))
    yield d
    d.close()


def _post_reads(d: Driver, n: int) -> list[tuple[int, int, int]]:
    """n 4 KiB reads of sectors 8*i, posted without a kick: (head, buffer, status address)."""
    posted = []
    for i in range(n):
        hdr = d.alloc(HEADER.pack(T_IN, 0, 8 * i))
        buf, st_ = d.alloc(4096), d.alloc(1)
        head = d.submit(0, [(hdr, False), (buf, True), (st_, True)], head=3 * i, kick=False)
        posted.append((head, buf[0], st_[0]))
    return posted


@pytest.mark.parametrize("event_idx", [True, False])
def test_n_requests_then_one_kick_give_n_completions_one_publish_one_interrupt(drv, event_idx, monkeypatch):
    # the stores are counted through GuestMemory.store_u16, which only the Python path calls
    # (the compiled drain stores the index once per pass in C: test_fastring.py compares them)
    monkeypatch.setattr(fastpath, "ENABLED", False)
    drv.setup(features=None if event_idx else ~F_EVENT_IDX, queue_size=128)
    assert bool(drv.features & F_EVENT_IDX) == event_idx
    posted = _post_reads(drv, QD)
    publishes = drv.count_used_publishes(0)
    raised = drv.irq.raised
    drv.kick(0)
    done = drv.used(0)
    assert [h for h, _ in done] == [h for h, _, _ in posted]  # ring order
    assert all(n == 4096 + 1 for _, n in done)
    for i, (_, buf, status) in enumerate(posted):
        assert drv.mem.read(status, 1)[0] == S_OK
        assert struct.unpack("<Q", drv.mem.read(buf, 8))[0] == 8 * i  # sector 8i holds 8i
    assert publishes == [QD]  # one used-index store for the whole batch
    assert drv.irq.raised - raised == 1


def test_event_idx_the_device_asks_for_the_next_kick_past_the_batch(drv):
    drv.setup(queue_size=128)
    _post_reads(drv, QD)
    drv.kick(0)
    _, _, used = drv.rings(0)
    avail_event = struct.unpack("<H", drv.mem.read(used + 4 + 8 * 128, 2))[0]
    assert avail_event == QD  # published once the batch was taken: kick me for request QD on


def test_event_idx_no_interrupt_until_the_driver_asks(drv):
    drv.setup(queue_size=128)
    _, avail, _ = drv.rings(0)
    drv.mem.write(avail + 4 + 2 * 128, struct.pack("<H", 2 * QD - 1))  # used_event: after 2 batches
    _post_reads(drv, QD)
    raised = drv.irq.raised
    drv.kick(0)
    assert len(drv.used(0)) == QD and drv.irq.raised == raised  # not yet
    for i in range(QD):  # the same requests again
        drv.put_avail(0, 3 * i, kick=False)
    drv.kick(0)
    assert len(drv.used(0)) == QD and drv.irq.raised == raised + 1


def test_a_bad_chain_mid_batch_completes_those_before_it_then_needs_reset(drv):
    drv.setup(queue_size=128)
    posted = _post_reads(drv, 4)
    drv.put_avail(0, 200, kick=False)  # head past the queue size
    hdr = drv.alloc(HEADER.pack(T_OUT, 0, 1))
    drv.submit(0, [(hdr, False), (drv.alloc(512), False), (drv.alloc(1), True)], head=60, kick=False)
    drv.kick(0)
    assert [h for h, _ in drv.used(0)] == [h for h, _, _ in posted]
    assert drv.status() & STATUS_NEEDS_RESET


# -- the batched walk against the reference, on rings a hostile driver builds -----------------
SIZE = 16
DESC, AVAIL, USED, BUFS = 0x10000, 0x20000, 0x30000, 0x40000


def _chains(q: Virtqueue, batched: bool) -> tuple[list[tuple], str | None, int]:
    out: list[DescriptorChain] = []
    error = None
    try:
        if batched:
            q.pop_into(out, SIZE)
        else:
            while len(out) < SIZE and (c := q.pop()) is not None:
                out.append(c)
    except VirtqueueError as exc:
        error = str(exc)
    return [(c.head, c.readable, c.writable) for c in out], error, q.last_avail


descriptor = st.tuples(
    st.sampled_from([BUFS, BUFS + 0x1000, 16 * MiB - 8, 1 << 40, 0x50000]),  # RAM, edge, outside, table
    st.sampled_from([0, 1, 16, 64, 4096]),
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT
    st.integers(0, 2 * SIZE),  # next: in range or not
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(descriptor, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(descriptor, min_size=4, max_size=4),
    heads=st.lists(st.integers(0, SIZE + 3), max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF),
)
def test_pop_into_agrees_with_pop_on_hostile_rings(table, indirect, heads, avail_idx):
    results = []
    for batched in (False, True):
        mem = GuestMemory(16 * MiB)
        try:
            mem.write(DESC, b"".join(struct.pack("<QIHH", *d) for d in table))
            mem.write(0x50000, b"".join(struct.pack("<QIHH", *d) for d in indirect))
            for i, h in enumerate(heads):
                mem.write(AVAIL + 4 + 2 * i, struct.pack("<H", h))
            idx = len(heads) if avail_idx % 4 else avail_idx  # mostly sane, sometimes bogus
            mem.write(AVAIL + 2, struct.pack("<H", idx))
            q = Virtqueue(mem, 0, SIZE, DESC, AVAIL, USED, event_idx=True, indirect=True)
            results.append(_chains(q, batched))
            results.append(mem.read(USED + 4 + 8 * SIZE, 2))  # the avail event published
        finally:
            mem.close()
    assert results[0] == results[2] and results[1] == results[3]
