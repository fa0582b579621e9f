"""virtio-pci transport and split virtqueue, driven from a Python driver through virtio-blk and
virtio-rng; what the blk and rng devices do with requests is in test_devices_virtio_blk.py and
test_devices_virtio_rng.py."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import FakeDoorbells, FakeLoop, FakeVector
from support.virtio_driver import BLK_SECTORS as SECTORS
from support.virtio_driver import Driver, blk_request

from corral.backends.disk import open_disk
from corral.devices.base import StateError
from corral.devices.pci.config import CAP_ID_MSIX
from corral.devices.virtio.base import F_VERSION_1, STATUS_FEATURES_OK, STATUS_NEEDS_RESET
from corral.devices.virtio.blk import F_FLUSH, F_RO, S_OK, T_IN, VirtioBlock
from corral.devices.virtio.pci import MSIX_PBA_OFF, MSIX_TABLE_OFF, NOTIFY_OFF
from corral.devices.virtio.rng import VirtioRng


def test_identity_and_features(blk):
    assert blk.fn.config.read(0, 4) == (0x1042 << 16) | 0x1AF4  # modern virtio-blk
    assert blk.fn.config.read(0x08, 1) == 1  # revision 1
    f = blk.device_features()
    assert f & F_VERSION_1 and f & F_FLUSH and not f & F_RO
    assert blk.config(0, 8) == SECTORS  # capacity in sectors


def test_features_never_offered_are_refused(blk_image):
    d = Driver(VirtioBlock(open_disk(str(blk_image))))
    try:
        d.wr(0x14, 1, 3)
        d.wr(0x08, 4, 1)
        d.wr(0x0C, 4, 1 | (1 << 20))  # VERSION_1 plus an unknown high bit
        d.wr(0x14, 1, 3 | STATUS_FEATURES_OK)
        assert not d.status() & STATUS_FEATURES_OK
    finally:
        d.close()


def test_interrupt_through_isr(blk):
    before = blk.irq.raised
    blk_request(blk, T_IN, 0, read_len=512)
    assert blk.irq.raised == before + 1 and blk.irq.level
    assert blk.isr() == 1 and not blk.irq.level  # reading acknowledges
    assert blk.isr() == 0


def test_event_idx_suppresses_interrupts(blk_image):
    d = Driver(VirtioBlock(open_disk(str(blk_image))))
    d.setup()
    try:
        _, avail, used = d.rings(0)
        # used_event = 5: only the completion that moves used idx past 5 interrupts
        d.mem.write(avail + 4 + 2 * d.sizes[0], struct.pack("<H", 5))
        raised = []
        for _i in range(8):
            before = d.irq.raised
            blk_request(d, T_IN, 0, read_len=512)
            d.isr()
            raised.append(d.irq.raised - before)
        assert raised == [0, 0, 0, 0, 0, 1, 0, 0]
        # the device publishes avail_event = how far it has read
        assert struct.unpack("<H", d.mem.read(used + 4 + 8 * d.sizes[0], 2))[0] == 8
    finally:
        d.close()


def test_a_kick_that_overtakes_activation_is_not_lost():
    """DRIVER_OK activates the queues on the loop (call_soon), while the driver's first kick
    arrives through an ioeventfd, which the loop may serve first. The request must still be
    served: it was lost before, and a probe waited for ever on its first transmit."""
    loop, doorbells = FakeLoop(), FakeDoorbells()
    d = Driver(VirtioRng(), loop=loop, doorbells=doorbells)
    try:
        d.fn.bars_moved([0xE000_0000])
        d.setup(driver_ok=False)
        loop.held = True
        d.driver_ok()  # activation queued, not run
        buf = d.alloc(64)
        head = d.submit(0, [(buf, True)], kick=False)
        doorbells.callbacks[0xE000_0000 + NOTIFY_OFF]()  # the ioeventfd's callback runs first
        assert d.used(0) == []  # nothing active yet: nothing served
        loop.run()  # then the activation
        assert d.used(0) == [(head, 64)]
    finally:
        d.close()


def test_a_reset_the_loop_runs_late_does_not_undo_the_drivers_setup():
    """A driver resets (status 0), reads 0 back and sets the device up while the loop has not
    run yet. The reset must not land after the set-up: it used to wipe the queues the driver had
    just enabled, and the probe's first transmit was never served."""
    loop = FakeLoop()
    d = Driver(VirtioRng(), loop=loop)
    try:
        loop.held = True
        d.setup()  # reset, ..., DRIVER_OK: all queued
        assert d.status() & STATUS_FEATURES_OK
        loop.run()
        buf = d.alloc(64)
        head = d.submit(0, [(buf, True)])
        loop.run()
        assert d.used(0) == [(head, 64)]
    finally:
        d.close()


def test_reset_returns_to_initial_state(blk):
    blk.wr(0x14, 1, 0)
    assert blk.status() == 0
    blk.setup()
    assert blk_request(blk, T_IN, 1, read_len=512)[0] == S_OK


# -- hostile drivers ---------------------------------------------------------------------------
def test_looping_chain_marks_needs_reset_and_vmm_survives(blk):
    desc, _, _ = blk.rings(0)
    blk.mem.write(desc, struct.pack("<QIHH", 0x100000, 16, 1, 1))
    blk.mem.write(desc + 16, struct.pack("<QIHH", 0x100000, 16, 1, 0))  # 0 -> 1 -> 0 ...
    blk.put_avail(0, 0)
    assert blk.status() & STATUS_NEEDS_RESET
    blk.setup()  # a reset recovers
    assert blk_request(blk, T_IN, 1, read_len=512)[0] == S_OK


@pytest.mark.parametrize(
    "desc",
    [
        struct.pack("<QIHH", 0xFFFF_FFFF_0000, 512, 0, 0),  # outside RAM
        struct.pack("<QIHH", 15 * (1 << 20), 2 << 20, 0, 0),  # runs off the end of RAM
        struct.pack("<QIHH", 0x100000, 16, 1, 999),  # next beyond the table
        struct.pack("<QIHH", 0x100000, 17, 4, 0),  # indirect table not whole descriptors
    ],
)
def test_bad_descriptors_never_raise(blk, desc):
    d0, _, _ = blk.rings(0)
    blk.mem.write(d0, desc)
    blk.put_avail(0, 0)
    assert blk.status() & STATUS_NEEDS_RESET


def test_bad_head_and_runaway_avail_index(blk):
    _, avail, _ = blk.rings(0)
    blk.put_avail(0, 1000)  # head beyond the queue
    assert blk.status() & STATUS_NEEDS_RESET
    blk.setup()
    blk.mem.write(avail + 2, struct.pack("<H", 500))  # 500 entries "available" in a 64 queue
    blk.kick(0)
    assert blk.status() & STATUS_NEEDS_RESET


def test_rings_outside_ram_fail_activation(blk_image):
    d = Driver(VirtioBlock(open_disk(str(blk_image))))
    try:
        d.wr(0x14, 1, 3)
        d.wr(0x08, 4, 1)
        d.wr(0x0C, 4, 1)
        d.wr(0x14, 1, 11)
        d.wr(0x16, 2, 0)
        d.wr(0x20, 4, 0xFFFF_0000)  # descriptor table in the MMIO hole
        d.wr(0x1C, 2, 1)
        d.wr(0x14, 1, 15)
        assert d.status() & STATUS_NEEDS_RESET
    finally:
        d.close()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1 << 25), st.integers(0, 1 << 21), st.integers(0, 7), st.integers(0, 70)),
        min_size=1,
        max_size=64,
    ),
    st.lists(st.integers(0, 70), min_size=1, max_size=8),
)
def test_random_rings_never_break_the_vmm(tmp_path_factory, descs, heads):
    path = tmp_path_factory.mktemp("fuzz") / "d.img"
    path.write_bytes(bytes(64 * 512))
    for dev in (VirtioBlock(open_disk(str(path))), VirtioRng()):
        d = Driver(dev)
        d.setup()
        try:
            table, _, _ = d.rings(0)
            for i, (addr, n, flags, nxt) in enumerate(descs):
                d.mem.write(table + 16 * i, struct.pack("<QIHH", addr, n, flags, nxt))
            for h in heads:
                d.put_avail(0, h)
            # whatever happened, the transport still answers and a reset brings it back
            d.status()
            d.setup()
            if isinstance(dev, VirtioBlock):
                assert blk_request(d, T_IN, 0, read_len=512)[0] == S_OK
        finally:
            d.close()
    assert os.path.getsize(path) == 64 * 512


# -- MSI-X --------------------------------------------------------------------------------------


def msix_cap(d: Driver) -> int:
    cap = d.fn.config.read(0x34, 1)
    while cap:
        if d.fn.config.read(cap, 1) == CAP_ID_MSIX:
            return cap
        cap = d.fn.config.read(cap + 1, 1)
    raise AssertionError("no MSI-X capability")


def test_msix_vectors_deliver_queue_interrupts(blk_image):
    vectors = [FakeVector(), FakeVector()]
    d = Driver(VirtioBlock(open_disk(str(blk_image))), vectors=vectors)
    try:
        cap = msix_cap(d)
        assert d.fn.config.read(cap + 2, 2) & 0x7FF == 1  # table size 2
        assert d.fn.config.read(cap + 4, 4) == MSIX_TABLE_OFF  # table in BAR 0
        d.setup(features=~(1 << 29) & (1 << 64) - 1)  # no EVENT_IDX: every completion
        d.wr(0x16, 2, 0)
        d.wr(0x1A, 2, 1)  # queue 0 -> vector 1
        assert d.rd(0x1A, 2) == 1
        d.wr(0x1A, 2, 7)  # no such vector: refused
        assert d.rd(0x1A, 2) == 0xFFFF
        d.wr(0x1A, 2, 1)
        # program vector 1 (address, data, unmasked), then enable MSI-X in config space
        for off, val in ((0, 0xFEE0_0000), (4, 0), (8, 0x41), (12, 0)):
            d.fn.bar_write(0, MSIX_TABLE_OFF + 16 + off, 4, val)
        d.fn.config.write(cap + 2, 2, 1 << 15)
        d.fn.config_written(cap + 2, 2)
        assert (vectors[1].address, vectors[1].data, vectors[1].masked) == (0xFEE0_0000, 0x41, False)
        blk_request(d, T_IN, 0, read_len=512)
        assert vectors[1].fired == 1 and d.irq.raised == 0  # MSI-X, not INTx
        # function mask: the interrupt waits in the PBA and arrives on unmask
        d.fn.config.write(cap + 2, 2, (1 << 15) | (1 << 14))
        d.fn.config_written(cap + 2, 2)
        blk_request(d, T_IN, 0, read_len=512)
        assert vectors[1].fired == 1 and d.fn.bar_read(0, MSIX_PBA_OFF, 8) == 0b10
        d.fn.config.write(cap + 2, 2, 1 << 15)
        d.fn.config_written(cap + 2, 2)
        assert vectors[1].fired == 2 and d.fn.bar_read(0, MSIX_PBA_OFF, 8) == 0
    finally:
        d.close()


def test_without_msix_enabled_interrupts_use_intx(blk_image):
    vectors = [FakeVector(), FakeVector()]
    d = Driver(VirtioBlock(open_disk(str(blk_image))), vectors=vectors)
    try:
        d.setup()
        d.wr(0x16, 2, 0)
        d.wr(0x1A, 2, 1)
        blk_request(d, T_IN, 0, read_len=512)
        assert d.irq.raised == 1 and vectors[1].fired == 0
    finally:
        d.close()


def test_state_carries_a_live_device_to_a_new_one(blk_image):
    """Save a device mid-run (one request made available but not yet kicked), build a fresh
    device on the same RAM, load: the pending request is served and the rings carry on."""

    from corral.devices.virtio.pci import VirtioPciDevice, VirtioPciState

    vectors = [FakeVector(), FakeVector()]
    d = Driver(VirtioBlock(open_disk(str(blk_image))), vectors=vectors)
    try:
        d.setup(features=~(1 << 29) & (1 << 64) - 1)
        for _ in range(3):
            assert blk_request(d, T_IN, 1, read_len=512)[0] == S_OK
        st_buf = d.alloc(1)
        rd = d.alloc(512)
        head = d.submit(
            0, [(d.alloc(struct.pack("<IIQ", T_IN, 0, 5)), False), (rd, True), (st_buf, True)], kick=False
        )
        state = VirtioPciState.model_validate_json(d.fn.save_state().model_dump_json())
        config = bytes(d.fn.config.data)
        d.device.close()

        new_vectors = [FakeVector(), FakeVector()]
        fn = VirtioPciDevice(
            VirtioBlock(open_disk(str(blk_image))), d.mem, d.irq, FakeLoop(), FakeDoorbells(), new_vectors
        )
        fn.config.data[:] = config
        fn.load_state(state)
        d.fn, d.device = fn, fn.device
        assert d.used(0) == [(head, 513)]  # served on load
        assert d.mem.read(st_buf[0], 1)[0] == S_OK and d.mem.read(*rd)[:8] == struct.pack("<Q", 5)
        assert d.status() == state.status and d.device_features() == d.fn.offered
        status, data, _ = blk_request(d, T_IN, 7, read_len=512)
        assert status == S_OK and data[:8] == struct.pack("<Q", 7)
    finally:
        d.close()


def test_state_of_a_device_with_a_bad_queue_layout_is_refused(blk_image):
    from corral.devices.virtio.pci import VirtioPciState

    d = Driver(VirtioBlock(open_disk(str(blk_image))))
    try:
        d.setup()
        state = d.fn.save_state()
        bad = VirtioPciState.model_validate({**state.model_dump(), "queues": state.queues * 2})
        with pytest.raises(StateError, match="queue layout"):
            d.fn.load_state(bad)
    finally:
        d.close()


@pytest.mark.parametrize("size", [32768, 96])
def test_state_with_a_queue_larger_than_the_device_offers_is_refused(blk_image, size):
    """A snapshot or migration stream is hostile: it may not give a queue more entries than the
    device offers (nor a size that is no power of two), as a guest's queue_size write may not."""
    from corral.devices.virtio.pci import VirtioPciState

    d = Driver(VirtioBlock(open_disk(str(blk_image))))
    try:
        d.setup()
        state = d.fn.save_state().model_dump()
        state["queues"][0]["size"] = size
        bad = VirtioPciState.model_validate(state)
        with pytest.raises(StateError, match=f"queue 0 has {size} entries"):
            d.fn.load_state(bad)
        assert d.fn.queues[0].size != size  # nothing changed
    finally:
        d.close()
