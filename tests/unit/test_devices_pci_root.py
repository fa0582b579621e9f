"""PCI bus 0 (corral.devices.pci.root): configuration access through 0xCF8/0xCFC and ECAM, BAR
sizing and mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.devices.bus import MmioBus
from corral.devices.pci.config import BAR0, CMD_MEMORY, COMMAND, Bar, PciConfig
from corral.devices.pci.root import ConfigPorts, Ecam, PciRoot


class Dummy:
    """A function with a 32-bit BAR0 (4 KiB) and a 64-bit BAR2 (16 KiB) that echoes offsets."""

    def __init__(self) -> None:
        self.config = PciConfig(vendor=0x1AF4, device=0x1234, class_code=0xFF0000, interrupt_pin=1)
        self.config.add_bar(Bar(0, 0x1000))
        self.config.add_bar(Bar(2, 0x4000, mem64=True, prefetchable=True))
        self.moves: list[list[int | None]] = []
        self.writes: list[tuple[int, int, int]] = []
        self.config_writes: list[tuple[int, int]] = []

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (index << 16) | offset

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        self.writes.append((index, offset, value))

    def bars_moved(self, addresses: list[int | None]) -> None:
        self.moves.append(addresses)

    def config_written(self, offset: int, size: int) -> None:
        self.config_writes.append((offset, size))


@pytest.fixture
def bus():
    mmio = MmioBus()
    root = PciRoot(mmio)
    return mmio, root, ConfigPorts(root), Ecam(root)


def cf8_read(ports: ConfigPorts, slot: int, reg: int, size: int = 4) -> int:
    ports.pio_write(0, 4, 0x8000_0000 | (slot << 11) | (reg & 0xFC))
    return ports.pio_read(4 + (reg & 3), size)


def cf8_write(ports: ConfigPorts, slot: int, reg: int, size: int, value: int) -> None:
    ports.pio_write(0, 4, 0x8000_0000 | (slot << 11) | (reg & 0xFC))
    ports.pio_write(4 + (reg & 3), size, value)


def test_host_bridge_through_both_mechanisms(bus):
    _, _, ports, ecam = bus
    assert cf8_read(ports, 0, 0) == ecam.mmio_read(0, 4) == 0x0008_1B36
    assert cf8_read(ports, 0, 0x08) >> 8 == 0x060000  # class: host bridge
    assert cf8_read(ports, 0, 0x0A, 2) == ecam.mmio_read(0x0A, 2) == 0x0600


def test_empty_slots_functions_and_buses_read_all_ones(bus):
    _, _, ports, ecam = bus
    assert cf8_read(ports, 5, 0) == 0xFFFF_FFFF
    assert ecam.mmio_read(5 << 15, 2) == 0xFFFF
    assert ecam.mmio_read(1 << 12, 4) == 0xFFFF_FFFF  # function 1 of the bridge
    ports.pio_write(0, 4, 0x8001_0000)  # bus 1
    assert ports.pio_read(4, 4) == 0xFFFF_FFFF


def test_config_address_latch(bus):
    _, _, ports, _ = bus
    ports.pio_write(0, 4, 0x8000_0003 | (3 << 11))
    assert ports.pio_read(0, 4) == 0x8000_0000 | (3 << 11)  # low two bits are not stored
    ports.pio_write(0, 1, 0)  # byte writes are not cycles
    assert ports.pio_read(0, 4) == 0x8000_0000 | (3 << 11)
    ports.pio_write(0, 4, 0)  # enable bit clear
    assert ports.pio_read(4, 4) == 0xFFFF_FFFF


def test_read_only_registers_stay(bus):
    _, root, ports, ecam = bus
    slot = root.add(Dummy())
    cf8_write(ports, slot, 0, 4, 0)
    ecam.mmio_write(slot << 15 | 0x08, 4, 0)
    assert cf8_read(ports, slot, 0) == 0x1234_1AF4
    assert cf8_read(ports, slot, 0x3D, 1) == 1  # interrupt pin
    cf8_write(ports, slot, 0x3C, 1, 11)  # interrupt line is writable
    assert cf8_read(ports, slot, 0x3C, 1) == 11
    assert root.slots[slot].config_writes[-1] == (0x3C, 1)  # the function hears of writes


def test_bar_sizing_and_mapping(bus):
    mmio, root, _ports, ecam = bus
    dev = Dummy()
    slot = root.add(dev)
    base = slot << 15
    # sizing: all-ones reads back the size mask with the flag bits
    ecam.mmio_write(base + BAR0, 4, 0xFFFF_FFFF)
    assert ecam.mmio_read(base + BAR0, 4) == 0xFFFF_F000
    ecam.mmio_write(base + BAR0 + 8, 4, 0xFFFF_FFFF)
    ecam.mmio_write(base + BAR0 + 12, 4, 0xFFFF_FFFF)
    assert ecam.mmio_read(base + BAR0 + 8, 4) == 0xFFFF_C000 | 0xC  # 64-bit, prefetchable
    assert ecam.mmio_read(base + BAR0 + 12, 4) == 0xFFFF_FFFF
    # placing them maps nothing until memory decoding is on
    ecam.mmio_write(base + BAR0, 4, 0xC000_0000)
    ecam.mmio_write(base + BAR0 + 8, 4, 0x0000_0000)
    ecam.mmio_write(base + BAR0 + 12, 4, 0x10)  # 0x10_0000_0000
    assert mmio.read(0xC000_0010, 4) == 0xFFFF_FFFF
    ecam.mmio_write(base + COMMAND, 2, CMD_MEMORY)
    assert dev.moves[-1] == [0xC000_0000, None, 0x10_0000_0000, None, None, None]
    assert mmio.read(0xC000_0010, 4) == 0x10
    assert mmio.read(0x10_0000_0020, 4) == (2 << 16) | 0x20
    mmio.write(0xC000_0004, 4, 7)
    assert dev.writes == [(0, 4, 7)]
    # moving BAR0 unmaps the old place
    ecam.mmio_write(base + BAR0, 4, 0xC010_0000)
    assert mmio.read(0xC000_0010, 4) == 0xFFFF_FFFF
    assert mmio.read(0xC010_0010, 4) == 0x10
    # decoding off unmaps everything
    ecam.mmio_write(base + COMMAND, 2, 0)
    assert dev.moves[-1] == [None] * 6
    assert mmio.read(0xC010_0010, 4) == 0xFFFF_FFFF


def test_bar_over_another_mapping_stays_unmapped(bus):
    mmio, root, _, ecam = bus
    mmio.register(0xD000_0000, 0x1000, _Const(), "other")
    dev = Dummy()
    slot = root.add(dev)
    ecam.mmio_write((slot << 15) + BAR0, 4, 0xD000_0000)
    ecam.mmio_write((slot << 15) + COMMAND, 2, CMD_MEMORY)
    assert dev.moves[-1][0] is None
    assert mmio.read(0xD000_0000, 4) == 0x5A


class _Const:
    def mmio_read(self, offset: int, size: int) -> int:
        return 0x5A

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, (1 << 20) - 1),
            st.sampled_from([1, 2, 4, 3, 8]),
            st.integers(0, 0xFFFF_FFFF),
        ),
        max_size=60,
    )
)
def test_random_config_traffic_never_breaks_the_vmm(ops):
    mmio = MmioBus()
    root = PciRoot(mmio)
    dev = Dummy()
    root.add(dev)
    ports, ecam = ConfigPorts(root), Ecam(root)
    for via_ports, offset, size, value in ops:
        if via_ports:
            port = offset & 7
            ports.pio_write(port, size if size in (1, 2, 4) else 4, value)
            ports.pio_read(port, size if size in (1, 2, 4) else 4)
        else:
            ecam.mmio_write(offset, size, value & ((1 << (8 * size)) - 1))
            ecam.mmio_read(offset, size)
    # identity registers survive whatever the guest wrote
    assert ecam.mmio_read(0, 4) == 0x0008_1B36
    assert ecam.mmio_read(1 << 15, 4) == 0x1234_1AF4
    # every mapping on the bus is a decoded BAR of the dummy
    for m in mmio.mappings:
        assert m.name.startswith("pci 00:01.0 BAR")
