"""Port-I/O and MMIO address maps: route a guest access to the device that owns the address.

The buses are part of the device layer (the PCI root remaps BARs on the MMIO bus); vCPU exit
handling and the machine sit above and only call `read`/`write`/`register`.

Port lookups are O(1) through a dict of the ports in use (a few dozen; a 64 K list cost 512 KiB
per VM, see bench/density_bench.py);
MMIO lookups bisect a sorted list of ranges. Accesses nobody owns read as all-ones and are
otherwise ignored, as on a PC bus.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any, NamedTuple

from corral.devices.base import MmioDevice, PioDevice


class BusConflictError(ValueError):
    """Two devices were placed on overlapping addresses (a VMM bug, not a guest error)."""


class Mapping(NamedTuple):
    """One device's range on a bus: a tuple with `end` stored, as every MMIO exit reads it."""

    base: int
    size: int
    device: Any
    name: str
    end: int


# a port's entry in PioBus.ports: (offset in its device, the device's pio_read, its pio_write),
# or None for a sink's port
PortEntry = tuple[int, Callable[[int, int], int], Callable[[int, int, int], None]] | None


def _method(device: object, name: str) -> Callable[..., Any]:
    """device.name, bound now; one the device lacks raises its AttributeError when called, as
    looking it up at the access did."""
    found = getattr(device, name, None)
    if found is not None:
        return found

    def missing(*args: int) -> Any:
        return getattr(device, name)(*args)

    return missing


class PioBus:
    """The 64 KiB x86 I/O port space."""

    def __init__(self) -> None:
        self._table: dict[int, Mapping] = {}
        self.mappings: list[Mapping] = []
        # per port: (offset in its device, the device's pio_read, its pio_write), what an exit
        # needs and nothing else, or None for a sink's port (a device with `pio_sink` set keeps
        # nothing: reads all ones, writes dropped, served here without a call); the compiled
        # vCPU loop (vstate/_exitloop.c) reads it too
        self.ports: dict[int, PortEntry] = {}

    def register(self, base: int, size: int, device: PioDevice, name: str = "") -> None:
        if base < 0 or size <= 0 or base + size > 0x10000:
            raise BusConflictError(f"port range {base:#x}+{size} is outside the I/O space")
        m = Mapping(base, size, device, name or type(device).__name__, base + size)
        for port in range(base, base + size):
            held = self._table.get(port)
            if held is not None:
                raise BusConflictError(f"port {port:#x}: {m.name} overlaps {held.name}")
        sink = getattr(device, "pio_sink", False) is True
        read, write = _method(device, "pio_read"), _method(device, "pio_write")
        for port in range(base, base + size):
            self._table[port] = m
            self.ports[port] = None if sink else (port - base, read, write)
        self.mappings.append(m)

    def read(self, port: int, size: int) -> int:
        e = self.ports.get(port)
        if e is None:
            return (1 << (size * 8)) - 1
        return e[1](e[0], size)

    def write(self, port: int, size: int, value: int) -> None:
        e = self.ports.get(port)
        if e is not None:
            e[2](e[0], size, value)


class MmioBus:
    """Guest-physical MMIO ranges (everything that is not RAM)."""

    def __init__(self) -> None:
        # (starts, mappings) replaced as one tuple, never changed in place, so lock-free readers
        # (read and write below, the compiled vCPU loop in vstate/_exitloop.c) see a consistent pair
        self.index: tuple[list[int], list[Mapping]] = ([], [])
        self._lock = threading.Lock()

    def register(self, base: int, size: int, device: MmioDevice, name: str = "") -> None:
        m = Mapping(base, size, device, name or type(device).__name__, base + size)
        with self._lock:
            starts, maps = self.index[0][:], self.index[1][:]
            i = bisect_right(starts, base)
            if i > 0 and maps[i - 1].end > base:
                raise BusConflictError(f"MMIO {base:#x}: {m.name} overlaps {maps[i - 1].name}")
            if i < len(maps) and maps[i].base < m.end:
                raise BusConflictError(f"MMIO {base:#x}: {m.name} overlaps {maps[i].name}")
            starts.insert(i, base)
            maps.insert(i, m)
            self.index = (starts, maps)

    def unregister(self, base: int) -> None:
        """Remove the mapping that starts at `base` (a PCI BAR the guest moved)."""
        with self._lock:
            starts, maps = self.index[0][:], self.index[1][:]
            i = bisect_left(starts, base)
            if i == len(starts) or starts[i] != base:
                raise KeyError(f"no MMIO mapping starts at {base:#x}")
            del starts[i], maps[i]
            self.index = (starts, maps)

    @property
    def mappings(self) -> list[Mapping]:
        return list(self.index[1])

    def _find(self, addr: int, size: int) -> Mapping | None:
        """The mapping that holds [addr, addr + size), or None (nobody's, or straddling an end).
        The compiled vCPU loop does the same lookup itself (vstate/_exitloop.c, mmio_find)."""
        starts, maps = self.index
        i = bisect_right(starts, addr) - 1
        if i >= 0:
            m = maps[i]
            if addr < m.end and addr + size <= m.end:
                return m
        return None

    def read(self, addr: int, size: int) -> int:
        m = self._find(addr, size)
        if m is None:
            return (1 << (size * 8)) - 1
        return m.device.mmio_read(addr - m.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        m = self._find(addr, size)
        if m is not None:
            m.device.mmio_write(addr - m.base, size, value)
