import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.devices.bus import BusConflictError, MmioBus, PioBus


class Rec:
    def __init__(self):
        self.log = []

    def pio_read(self, off, size):
        self.log.append(("r", off, size))
        return 0x5A

    def pio_write(self, off, size, v):
        self.log.append(("w", off, size, v))

    mmio_read = pio_read
    mmio_write = pio_write


def test_pio_routes_with_relative_offsets():
    bus, d = PioBus(), Rec()
    bus.register(0x3F8, 8, d)
    assert bus.read(0x3FD, 1) == 0x5A
    bus.write(0x3F8, 1, 0x41)
    assert d.log == [("r", 5, 1), ("w", 0, 1, 0x41)]


def test_unclaimed_ports_read_all_ones():
    bus = PioBus()
    assert bus.read(0x1234, 1) == 0xFF and bus.read(0x1234, 4) == 0xFFFFFFFF
    bus.write(0x1234, 2, 7)  # ignored


def test_overlaps_are_refused():
    bus = PioBus()
    bus.register(0x60, 1, Rec(), "a")
    with pytest.raises(BusConflictError, match="overlaps a"):
        bus.register(0x5F, 4, Rec(), "b")
    m = MmioBus()
    m.register(0x1000, 0x100, Rec(), "x")
    with pytest.raises(BusConflictError):
        m.register(0x10F0, 0x100, Rec(), "y")
    with pytest.raises(BusConflictError):
        m.register(0xF80, 0x100, Rec(), "z")


def test_mmio_lookup_and_edges():
    m, a, b = MmioBus(), Rec(), Rec()
    m.register(0x2000, 0x1000, b)
    m.register(0x1000, 0x1000, a)
    assert m.read(0x1FFC, 4) == 0x5A and a.log == [("r", 0xFFC, 4)]
    assert m.read(0x1FFE, 4) == 0xFFFFFFFF  # straddles the end: nobody answers
    m.write(0x2000, 8, 1)
    assert b.log == [("w", 0, 8, 1)]
    assert m.read(0x3000, 1) == 0xFF


@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF))
def test_any_port_access_is_safe(port, size, value):
    bus = PioBus()
    bus.register(0x3F8, 8, Rec())
    bus.write(port, size, value)
    assert 0 <= bus.read(port, size) < (1 << (size * 8))


def test_a_port_reaches_its_device_at_its_offset_and_a_missing_method_fails_when_used():
    """PioBus.ports binds each port's methods at registration (what the compiled vCPU loop
    reads); a device without pio_read fails a read as it did when looked up per access."""

    class WriteOnly:
        def __init__(self) -> None:
            self.log: list[tuple[int, int, int]] = []

        def pio_write(self, offset: int, size: int, value: int) -> None:
            self.log.append((offset, size, value))

    bus, dev = PioBus(), WriteOnly()
    bus.register(0x500, 8, dev)
    bus.write(0x505, 2, 0xBEEF)
    assert dev.log == [(5, 2, 0xBEEF)] and bus.ports[0x505][0] == 5
    with pytest.raises(AttributeError, match="pio_read"):
        bus.read(0x505, 1)
    assert bus.read(0x508, 1) == 0xFF  # past its ports: nobody's
