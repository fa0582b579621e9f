"""PCI bus 0: the root complex, its host bridge, and the two ways to reach configuration space.

* Configuration mechanism #1: the guest writes an address to port 0xCF8 (32-bit writes only;
  bit 31 enables) and accesses the data window 0xCFC-0xCFF.
* PCIe ECAM: a 1 MiB MMIO window for bus 0, one 4 KiB page per function, announced in the ACPI
  MCFG table; the only way to reach extended space (0x100-0xFFF).

Both land in the same `PciConfig`. When a write moves a BAR or toggles decoding, the root
remaps that BAR on the MMIO bus and tells the function (virtio re-registers its ioeventfds).
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, ClassVar, Protocol, runtime_checkable

from corral.devices.base import U32, DeviceState, StateBytes, StateError
from corral.devices.bus import BusConflictError, MmioBus
from corral.devices.pci.config import PciConfig
from corral.lazymodel import Field

log = logging.getLogger(__name__)

HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE = 0x1B36, 0x0008  # generic PCIe host bridge ids
CLASS_HOST_BRIDGE = 0x060000
SLOTS = 32


@runtime_checkable
class PciFunction(Protocol):
    """A function on bus 0: its configuration space and the MMIO behind its memory BARs."""

    config: PciConfig

    def bar_read(self, index: int, offset: int, size: int) -> int: ...

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None: ...

    def bars_moved(self, addresses: list[int | None]) -> None:
        """Decoded address of each BAR (None: not decoding) after the guest changed them."""

    def config_written(self, offset: int, size: int) -> None:
        """The guest wrote configuration space (capabilities with side effects look here)."""


class HostBridge:
    """00:00.0: identifies the root complex; it has no BARs."""

    def __init__(self) -> None:
        self.config = PciConfig(
            vendor=HOST_BRIDGE_VENDOR, device=HOST_BRIDGE_DEVICE, class_code=CLASS_HOST_BRIDGE
        )

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def bars_moved(self, addresses: list[int | None]) -> None:
        pass

    def config_written(self, offset: int, size: int) -> None:
        pass


class _BarWindow:
    """Presents one BAR of a function on the MMIO bus."""

    __slots__ = ("fn", "index")

    def __init__(self, fn: PciFunction, index: int) -> None:
        self.fn, self.index = fn, index

    def mmio_read(self, offset: int, size: int) -> int:
        return self.fn.bar_read(self.index, offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.fn.bar_write(self.index, offset, size, value)


Slot = Annotated[int, Field(ge=0, lt=SLOTS)]


class PciBusState(DeviceState):
    config: dict[Slot, StateBytes] = Field(
        description="configuration space of each populated slot on bus 0 (function 0), by slot number"
    )


class ConfigPortsState(DeviceState):
    address: U32 = Field(description="the CONFIG_ADDRESS latch at port 0xCF8")


class PciRoot:
    """Bus 0 with up to 32 single-function devices (slot 0 is the host bridge)."""

    state_model: ClassVar[type[PciBusState]] = PciBusState

    def __init__(self, mmio: MmioBus, host_bridge: PciFunction | None = None) -> None:
        """`host_bridge`: the function at 00:00.0 (default: the generic one; firmware boots
        get an i440FX, devices/pci/i440fx.py)."""
        self.mmio = mmio
        self.slots: list[PciFunction | None] = [None] * SLOTS
        self._mapped: dict[tuple[int, int], int] = {}  # (slot, bar) -> base on the MMIO bus
        self._lock = threading.Lock()
        # functions 1-7 of a multi-function device: BAR-less chipset pieces only (piix.py)
        self.functions: dict[tuple[int, int], PciFunction] = {}
        self.add(host_bridge or HostBridge(), slot=0)

    def add(self, fn: PciFunction, slot: int | None = None) -> int:
        if slot is None:
            slot = next((s for s in range(1, SLOTS) if self.slots[s] is None), -1)
            if slot < 0:
                raise ValueError("PCI bus 0 is full (31 devices)")
        if self.slots[slot] is not None:
            raise ValueError(f"PCI slot {slot} is taken")
        self.slots[slot] = fn
        self._remap(slot)
        return slot

    def add_function(self, fn: PciFunction, slot: int, func: int) -> None:
        """`fn` as function `func` (1-7) of the device in `slot`, whose function 0 says it is
        multi-function. It must have no BARs: they are never mapped."""
        if not 1 <= func < 8 or self.slots[slot] is None or (slot, func) in self.functions:
            raise ValueError(f"PCI 00:{slot:02x}.{func} cannot be added")
        if any(b is not None for b in fn.config.bars):
            raise ValueError("a function other than 0 cannot have BARs here")
        self.functions[(slot, func)] = fn

    # -- configuration access ------------------------------------------------------------------
    def config_read(self, bus: int, slot: int, func: int, offset: int, size: int) -> int:
        fn = self._function(bus, slot, func)
        if fn is None:
            return (1 << (8 * size)) - 1
        return fn.config.read(offset, size)

    def config_write(self, bus: int, slot: int, func: int, offset: int, size: int, value: int) -> None:
        fn = self._function(bus, slot, func)
        if fn is None:
            return
        if fn.config.write(offset, size, value) and func == 0:
            self._remap(slot)
        fn.config_written(offset, size)

    def _function(self, bus: int, slot: int, func: int) -> PciFunction | None:
        if bus != 0 or not 0 <= slot < SLOTS:
            return None
        return self.slots[slot] if func == 0 else self.functions.get((slot, func))

    # -- BAR placement -----------------------------------------------------------------------------
    # -- state -------------------------------------------------------------------------------------
    def save_state(self) -> PciBusState:
        """The configuration space of every function; functions with more state (virtio)
        are walked separately by the machine."""
        return PciBusState(
            config={s: bytes(fn.config.data) for s, fn in enumerate(self.slots) if fn is not None}
        )

    def load_state(self, state: PciBusState) -> None:
        for slot, data in state.config.items():
            fn = self.slots[slot]
            if fn is None or len(data) != len(fn.config.data):
                raise StateError(f"PCI state names slot {slot}, which this machine does not have")
            fn.config.data[:] = data
        for slot, fn in enumerate(self.slots):
            if fn is not None:
                self._remap(slot)

    def _remap(self, slot: int) -> None:
        fn = self.slots[slot]
        assert fn is not None
        with self._lock:
            addresses: list[int | None] = []
            for i, bar in enumerate(fn.config.bars):
                addr = fn.config.bar_address(i) if bar is not None and not bar.io else None
                old = self._mapped.get((slot, i))
                if old != addr:
                    if old is not None:
                        self.mmio.unregister(old)
                        del self._mapped[(slot, i)]
                    if addr is not None and bar is not None:
                        try:
                            self.mmio.register(
                                addr, bar.size, _BarWindow(fn, i), f"pci 00:{slot:02x}.0 BAR{i}"
                            )
                            self._mapped[(slot, i)] = addr
                        except BusConflictError as exc:
                            # the guest placed it over something else: it stays unreachable
                            log.warning("PCI 00:%02x.0 BAR%d at %#x not mapped: %s", slot, i, addr, exc)
                            addr = None
                addresses.append(self._mapped.get((slot, i)))
        fn.bars_moved(addresses)


class ConfigPorts:
    """Ports 0xCF8 (address latch, register with `ADDRESS_OFFSET`) and 0xCFC-0xCFF (data)."""

    ADDRESS_OFFSET, DATA_OFFSET = 0, 4
    state_model: ClassVar[type[ConfigPortsState]] = ConfigPortsState

    def __init__(self, root: PciRoot) -> None:
        self.root = root
        self.address = 0

    def pio_read(self, offset: int, size: int) -> int:
        if offset == self.ADDRESS_OFFSET:
            return self.address if size == 4 else (1 << (8 * size)) - 1
        target = self._target(offset - self.DATA_OFFSET, size)
        if target is None:
            return (1 << (8 * size)) - 1
        return self.root.config_read(*target, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == self.ADDRESS_OFFSET:
            if size == 4:  # byte/word writes to 0xCF8 are not config cycles
                self.address = value & 0x80FF_FFFC
            return
        target = self._target(offset - self.DATA_OFFSET, size)
        if target is not None:
            self.root.config_write(*target, size, value)

    def save_state(self) -> ConfigPortsState:
        return ConfigPortsState(address=self.address)

    def load_state(self, state: ConfigPortsState) -> None:
        self.address = state.address & 0x80FF_FFFC

    def _target(self, data_offset: int, size: int) -> tuple[int, int, int, int] | None:
        a = self.address
        if not a & 0x8000_0000 or not 0 <= data_offset < 4 or data_offset + size > 4:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + data_offset


class Ecam:
    """The memory-mapped configuration window of bus 0 (4 KiB per function)."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def _target(self, offset: int, size: int) -> tuple[int, int, int, int] | None:
        reg = offset & 0xFFF
        if size not in (1, 2, 4) or reg % size:  # no accesses that straddle registers
            return None
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, reg

    def mmio_read(self, offset: int, size: int) -> int:
        target = self._target(offset, size)
        if target is None:
            return (1 << (8 * size)) - 1
        return self.root.config_read(*target, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        target = self._target(offset, size)
        if target is not None:
            self.root.config_write(*target, size, value)
