"""virtio-balloon driven by the Python driver: pages the guest gives up (inflate, free page
reports) really leave the host's memory (the memfd behind guest RAM shrinks)."""

from __future__ import annotations

import struct

from support.fakes import FakeLoop
from support.virtio_driver import Driver

from corral.devices.virtio.balloon import F_PAGE_REPORTING, F_STATS_VQ, VirtioBalloon

MiB = 1 << 20
REGION = 8 * MiB  # the guest's pages to give away


def filled(d: Driver) -> int:
    d.mem.write(REGION, b"\xa5" * (4 * MiB))
    return d.mem.resident_bytes()


def test_inflate_returns_pages_to_the_host():
    dev = VirtioBalloon()
    d = Driver(dev)
    try:
        d.setup()
        before = filled(d)
        generation = d.fn.config_generation
        dev.set_target_bytes(4 * MiB)
        assert d.fn.config_generation == generation + 1  # the driver was told
        assert d.config(0, 4) == 1024  # num_pages for the driver
        pfns = [(REGION >> 12) + i for i in range(1024)]
        d.submit(0, [(d.alloc(struct.pack(f"<{len(pfns)}I", *pfns)), False)])
        d.fn.bar_write(0, 0x2000 + 4, 4, 1024)  # driver writes `actual`
        assert d.mem.resident_bytes() <= before - 4 * MiB + 64 * 1024  # (ring pages come and go)
        assert d.mem.read(REGION, 16) == bytes(16)  # gone: reads as zeros
        assert dev.counters["inflated"] == 1024 and dev.actual_pages == 1024
        info = dev.info(d.mem.resident_bytes(), None, timeout=0)
        assert info.target_bytes == info.actual_bytes == 4 * MiB and info.inflated == 1024
        # deflate: the pages come back on use
        d.submit(1, [(d.alloc(struct.pack("<4I", *pfns[:4])), False)])
        d.mem.write(REGION, b"back")
        assert d.mem.read(REGION, 4) == b"back" and dev.counters["deflated"] == 4
    finally:
        d.close()


def test_free_page_reporting_and_stats():
    dev = VirtioBalloon()
    d = Driver(dev)
    try:
        d.setup()
        assert d.features & F_PAGE_REPORTING and d.features & F_STATS_VQ
        before = filled(d)
        # a report: the writable buffers are the free ranges themselves (queue 3 with stats on)
        d.submit(3, [((REGION, 2 * MiB), True), ((REGION + 2 * MiB, 2 * MiB), True)])
        assert d.mem.resident_bytes() <= before - 4 * MiB + 64 * 1024  # (ring pages come and go)
        assert dev.counters["reported_bytes"] == 4 * MiB
        assert [h for h, _ in d.used(3)] == [0]
        # stats: the driver's buffer is kept; handing it back asks for new numbers
        d.submit(2, [(d.alloc(struct.pack("<HQHQ", 4, 100 * MiB, 5, 256 * MiB)), False)])
        assert dev.stats == {"free_memory": 100 * MiB, "total_memory": 256 * MiB}
        assert d.used(2) == []
        assert dev.request_stats() and len(d.used(2)) == 1
        # info(): asks for fresh numbers through the loop, reports the latest it has
        d.submit(2, [(d.alloc(struct.pack("<HQ", 4, 99 * MiB)), False)])
        asked = []
        info = dev.info(12345, lambda fn: asked.append(fn), timeout=0.01)
        assert len(asked) == 1 and d.used(2) == []  # on the loop, not yet
        asked[0]()
        assert len(d.used(2)) == 1  # the buffer went back
        assert info.stats == {"free_memory": 99 * MiB} and info.host_resident_bytes == 12345
        assert info.reported_bytes == 4 * MiB and info.target_bytes == 0
    finally:
        d.close()


def test_hostile_page_numbers_are_skipped():
    dev = VirtioBalloon()
    d = Driver(dev)
    try:
        d.setup()
        bad = [0xFFFF_FFFF, (16 * MiB) >> 12, 0x12345678]  # outside the 16 MiB of RAM
        d.submit(0, [(d.alloc(struct.pack("<3I", *bad)), False)])
        assert dev.counters["bad_pfns"] == 3 and dev.counters["inflated"] == 0
        assert not dev.broken
        # a report whose buffer runs past RAM is a malformed descriptor: NEEDS_RESET, nothing freed
        before = filled(d)
        d.submit(3, [((15 * MiB, 4 * MiB), True)])
        assert dev.broken and d.status() & 64
        assert d.mem.resident_bytes() >= before
    finally:
        d.close()


def test_queue_numbers_follow_negotiated_features():
    dev = VirtioBalloon()
    d = Driver(dev)
    try:
        d.setup(features=~F_STATS_VQ & (1 << 64) - 1)  # reporting, no stats
        before = filled(d)
        d.submit(2, [((REGION, 4 * MiB), True)])  # reporting is queue 2 now
        assert d.mem.resident_bytes() <= before - 4 * MiB + 64 * 1024  # (ring pages come and go)
    finally:
        d.close()


def test_stats_queue_serves_a_queues_worth_per_wake():
    """A guest that hands each stats buffer straight back while it is read would hold the
    device loop forever: one wake takes at most a queue's worth, the rest on later turns."""
    dev = VirtioBalloon()
    d = Driver(dev, loop=FakeLoop())
    taken = []

    class Refill:  # stands in for stats_updated: the guest re-posts the buffer at once
        def set(self) -> None:
            taken.append(1)
            if len(taken) < 10 * 64:
                d.put_avail(2, dev._stats_chain.head, kick=False)

        def clear(self) -> None:
            pass

    try:
        d.setup(queue_size=64)
        dev.stats_updated = Refill()
        d.fn.loop.held = True
        d.submit(2, [(d.alloc(struct.pack("<HQ", 4, MiB)), False)])
        d.fn.loop.callbacks.pop(0)()  # the kick: one turn of the loop
        assert len(taken) == 64
        assert len(d.fn.loop.callbacks) == 1  # the rest is rescheduled behind other work
        turns = 1
        while d.fn.loop.callbacks:
            d.fn.loop.callbacks.pop(0)()
            turns += 1
        assert len(taken) == 10 * 64 and turns == 10
        assert not dev.broken
    finally:
        d.close()


def test_a_stats_buffer_replaced_by_a_newer_one_comes_back_with_an_interrupt():
    """A driver that posts a second stats buffer gets the first back: in the used ring and
    with an interrupt, or it would wait on that buffer unseen."""
    dev = VirtioBalloon()
    d = Driver(dev)
    try:
        d.setup()
        first = d.submit(2, [(d.alloc(struct.pack("<HQ", 4, MiB)), False)])
        assert d.used(2) == [] and dev.stats == {"free_memory": MiB}  # kept: nothing to say yet
        raised = d.irq.raised
        d.submit(2, [(d.alloc(struct.pack("<HQ", 4, 2 * MiB)), False)])
        assert d.used(2) == [(first, 0)] and dev.stats == {"free_memory": 2 * MiB}
        assert d.irq.raised == raised + 1
    finally:
        d.close()
