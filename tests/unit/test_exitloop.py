"""The compiled vCPU loop (vstate/_exitloop.c) against the Python reference (Vcpu._loop): for
the same exit in the run page, the same bus calls in the same order, the same bytes written
back, the same error when a bus read returns what no register holds. The C loop runs over a
stand-in for KVM_RUN (FIOCLEX on /dev/null: an ioctl that succeeds and leaves the page as it
is), the Python one over the scripted fd the other vCPU tests use."""

from __future__ import annotations

import errno
import os
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.kvm_fakes import FakeVcpuFd, RecordingDevice, RecordingHost, io_exit, mmio_exit, plain_exit

from corral.devices.bus import MmioBus, PioBus
from corral.devices.legacy.post import PostSink
from corral.kvm import constants as K
from corral.kvm import structs as S
from corral.vstate import vcpu as vcpu_mod
from corral.vstate.vcpu import Vcpu

_exitloop = pytest.importorskip("corral.vstate._exitloop", reason="the compiled vCPU loop is not built")

FIOCLEX = 0x5451
PORT_BASE, MMIO_BASE = 0x3F8, 0xD000_0000
BUDGET_SPENT, RUN_FAILED = -1, -2


class Reads(RecordingDevice):
    """Answers every read with the next of `values` (0 once they run out)."""

    def __init__(self, values: list[int]) -> None:
        super().__init__()
        self.values = list(values)

    def _read(self, op: str, offset: int, size: int) -> int:
        value = self.values.pop(0) if self.values else 0
        self.accesses.append((op, offset, size, value))
        return value


class Sink(PostSink):
    """A sink neither loop may call: its ports are served from the bus's table."""

    def pio_read(self, offset: int, size: int) -> int:
        raise AssertionError("a sink was called")

    pio_write = pio_read  # type: ignore[assignment]


def _buses(dev: RecordingDevice) -> tuple[PioBus, MmioBus]:
    pio, mmio = PioBus(), MmioBus()
    pio.register(PORT_BASE, 8, dev)
    pio.register(PORT_BASE + 8, 2, Sink())
    mmio.register(MMIO_BASE, 0x1000, dev)
    return pio, mmio


def python_loop(exit, reads: list[int]):
    """Vcpu._loop over one scripted exit, then a halt: (accesses, page after, error)."""
    dev = Reads(reads)
    pio, mmio = _buses(dev)
    fd = FakeVcpuFd([exit, plain_exit(K.EXIT_HLT)])
    host = RecordingHost()
    vcpu = Vcpu(fd, 0, pio, mmio, host)
    saved, vcpu_mod.EXIT_LOOP = vcpu_mod.EXIT_LOOP, False
    error = None
    try:
        vcpu._loop()
    except (OverflowError, TypeError) as exc:  # what _thread_main would report
        error = type(exc)
    finally:
        vcpu_mod.EXIT_LOOP = saved
    page = fd.pages[1] if len(fd.pages) > 1 else bytes(fd.run_buf)
    return dev.accesses, page, error


def compiled_loop(exit, reads: list[int], budget: int = 1):
    dev = Reads(reads)
    pio, mmio = _buses(dev)
    page = bytearray(S.RUN_SIZE)
    exit(memoryview(page))
    null = os.open("/dev/null", os.O_RDONLY)
    error = None
    try:
        got = _exitloop.run(
            null, memoryview(page), pio.ports, mmio,
            budget, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None,
        )  # fmt: skip
        assert got == (budget, BUDGET_SPENT, 0)
    except (OverflowError, TypeError) as exc:
        error = type(exc)
    finally:
        os.close(null)
    return dev.accesses, bytes(page), error


size = st.sampled_from([1, 2, 4])
value = st.integers(0, 2**32 - 1)
read_value = st.one_of(st.integers(0, 2**32 - 1), st.integers(-3, 2**70))  # some fit no register


@st.composite
def exits(draw):
    kind = draw(st.sampled_from(["io_out", "io_in", "mmio_write", "mmio_read"]))
    if kind.startswith("io"):
        n, count = draw(size), draw(st.integers(1, 6))
        port = draw(st.integers(PORT_BASE - 2, PORT_BASE + 11))  # some a sink's, some nobody's
        at = draw(st.integers(64, 2048))
        values = [draw(value) & ((1 << 8 * n) - 1) for _ in range(count)]
        return io_exit(port, n, kind == "io_out", values, count, at), count
    length = draw(st.sampled_from([0, 1, 2, 4, 8, 9, 200]))  # a length past 8 is cut to 8
    addr = draw(st.sampled_from([MMIO_BASE, MMIO_BASE + 0x10, MMIO_BASE + 0xFFF, MMIO_BASE - 4, 0xFEE0_0000]))
    return mmio_exit(addr, length, kind == "mmio_write", draw(st.integers(0, 2**64 - 1))), 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exit=exits(), reads=st.lists(read_value, max_size=8))
def test_both_loops_make_the_same_calls_and_write_the_same_bytes(exit, reads):
    fill, _count = exit
    ours, theirs = compiled_loop(fill, reads), python_loop(fill, reads)
    assert ours[2] == theirs[2]  # the same error, or none
    assert ours[0] == theirs[0]
    if ours[2] is None:
        # the page as the next KVM_RUN finds it (from the exit reason on: the scripted fd
        # clears the rest of the header for its next exit)
        assert ours[1][:4096] == theirs[1][:4096]


def test_an_exit_it_does_not_serve_goes_back_with_its_reason():
    page = bytearray(S.RUN_SIZE)
    plain_exit(K.EXIT_SHUTDOWN)(memoryview(page))
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        got = _exitloop.run(null, memoryview(page), {}, None, 100, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None)
    finally:
        os.close(null)
    assert got == (1, K.EXIT_SHUTDOWN, 0)


def test_a_failed_kvm_run_goes_back_with_its_errno_and_no_exit_counted():
    page = bytearray(S.RUN_SIZE)
    got = _exitloop.run(-1, memoryview(page), {}, None, 100, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None)
    assert got == (0, RUN_FAILED, errno.EBADF)


def test_the_budget_bounds_a_call_and_stamps_time_each_run():
    dev = RecordingDevice()
    pio, mmio = _buses(dev)
    page = bytearray(S.RUN_SIZE)
    io_exit(PORT_BASE, 1, True, [7])(memoryview(page))
    stamps = array("q", bytes(16 * 5))  # room for 5 of the 7 runs: the rest go unstamped
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        got = _exitloop.run(
            null, memoryview(page), pio.ports, mmio,
            7, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, memoryview(stamps),
        )  # fmt: skip
    finally:
        os.close(null)
    assert got == (7, BUDGET_SPENT, 0) and dev.accesses == [("pio_write", 0, 1, 7)] * 7
    assert all(0 < stamps[i] <= stamps[i + 1] for i in range(9))


def test_io_outside_the_run_page_is_refused_not_read():
    page = bytearray(S.RUN_SIZE)
    struct.pack_into("<I", page, S.RUN_EXIT_REASON, K.EXIT_IO)
    struct.pack_into("<BBHIQ", page, S.RUN_IO_DIRECTION, 1, 4, PORT_BASE, 0x4000_0000, 64)
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(RuntimeError, match="outside the run page"):
            _exitloop.run(null, memoryview(page), {}, None, 1, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None)
    finally:
        os.close(null)


def test_a_device_exception_propagates_from_the_compiled_loop():
    class Broken:
        def pio_write(self, offset, size, value):
            raise ValueError("device bug")

    pio = PioBus()
    pio.register(0x80, 1, Broken())
    page = bytearray(S.RUN_SIZE)
    io_exit(0x80, 1, True, [1])(memoryview(page))
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="device bug"):
            _exitloop.run(
                null,
                memoryview(page),
                pio.ports,
                None,
                1,
                FIOCLEX,
                K.EXIT_IO,
                K.EXIT_MMIO,
                None,
            )
    finally:
        os.close(null)


def test_a_mapping_moved_by_a_device_call_is_seen_at_the_next_exit():
    """The compiled loop reads the buses' tables afresh at each exit: a guest moving a BAR
    (the device's write unregisters it and registers it elsewhere) is seen at once, as by the
    Python loop, and a port registered by a device call is reached at the next exit."""

    class Moves(RecordingDevice):
        def mmio_write(self, offset, size, value):
            super().mmio_write(offset, size, value)
            mmio.unregister(MMIO_BASE)
            mmio.register(MMIO_BASE + 0x10000, 0x1000, self)

        def pio_write(self, offset, size, value):
            super().pio_write(offset, size, value)
            if 0x80 not in pio.ports:
                pio.register(0x80, 1, self)

    dev = Moves()
    pio, mmio = PioBus(), MmioBus()
    mmio.register(MMIO_BASE, 0x1000, dev)
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        page = bytearray(S.RUN_SIZE)
        mmio_exit(MMIO_BASE + 8, 4, True, 7)(memoryview(page))
        got = _exitloop.run(null, memoryview(page), pio.ports, mmio, 3, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None)
        assert got == (3, BUDGET_SPENT, 0)
        assert dev.accesses == [("mmio_write", 8, 4, 7)]  # then nobody's: the mapping moved
        pio.register(0x70, 1, dev)
        io_exit(0x70, 1, True, [5])(memoryview(page))
        _exitloop.run(null, memoryview(page), pio.ports, mmio, 1, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None)
        io_exit(0x80, 1, True, [6])(memoryview(page))
        _exitloop.run(null, memoryview(page), pio.ports, mmio, 1, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, None)
        assert dev.accesses[1:] == [("pio_write", 0, 1, 5), ("pio_write", 0, 1, 6)]
    finally:
        os.close(null)
