"""One PCI function's configuration space: 4 KiB of registers with per-bit write masks.

The guest reads and writes any byte range; what it may change is decided by `wmask` (writable
bits) and `w1c` (write-one-to-clear status bits), so BAR sizing falls out of the masks: writing
all-ones to a BAR reads back ~(size - 1) plus its flag bits, exactly as on real hardware.
Extended space (0x100-0xFFF) reads as zero unless a capability lives there; reaching it needs ECAM.
"""

from __future__ import annotations

from typing import NamedTuple

CONFIG_SIZE = 4096
CONVENTIONAL_SIZE = 256

# Header registers (type 0)
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, CLASS_DEVICE = 0x08, 0x09, 0x0A
HEADER_TYPE, BAR0, SUBSYS_VENDOR, SUBSYS_ID = 0x0E, 0x10, 0x2C, 0x2E
CAP_PTR, INTERRUPT_LINE, INTERRUPT_PIN = 0x34, 0x3C, 0x3D

CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_INTX_DISABLE = 1 << 0, 1 << 1, 1 << 2, 1 << 10
STATUS_INTERRUPT, STATUS_CAP_LIST = 1 << 3, 1 << 4

BAR_IO, BAR_MEM64, BAR_PREFETCH = 0x1, 0x4, 0x8
CAP_ID_VENDOR, CAP_ID_MSIX = 0x09, 0x11


class Bar(NamedTuple):
    """A base address register: `size` bytes (a power of two) of memory or I/O space."""

    number: int  # 0-5: BAR0-BAR5
    size: int
    mem64: bool = False
    prefetchable: bool = False
    io: bool = False

    @property
    def flags(self) -> int:
        if self.io:
            return BAR_IO
        return (BAR_MEM64 if self.mem64 else 0) | (BAR_PREFETCH if self.prefetchable else 0)


class PciConfig:
    """The configuration space of one type-0 function."""

    def __init__(
        self,
        *,
        vendor: int,
        device: int,
        class_code: int,
        revision: int = 0,
        subsys_vendor: int = 0,
        subsys_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1c = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self._cap_tail = CAP_PTR  # where the next capability's offset is linked in
        self._cap_next = 0x40  # first free byte for a capability
        self._set(VENDOR_ID, 2, vendor)
        self._set(DEVICE_ID, 2, device)
        self._set(REVISION, 1, revision)
        self._set(CLASS_PROG, 3, class_code)
        self._set(SUBSYS_VENDOR, 2, subsys_vendor)
        self._set(SUBSYS_ID, 2, subsys_id)
        self._set(INTERRUPT_PIN, 1, interrupt_pin)
        self._mask(COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE)
        self._mask(INTERRUPT_LINE, 1, 0xFF)

    # -- building (VMM side) -----------------------------------------------------------------
    def _set(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    def _mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def add_bar(self, bar: Bar) -> None:
        i = bar.number
        if not 0 <= i < 6 or (bar.mem64 and i == 5) or self.bars[i] is not None:
            raise ValueError(f"BAR {i} is not free")
        if bar.size & (bar.size - 1) or bar.size < (4 if bar.io else 16):
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two of at least 16")
        self.bars[i] = bar
        addr_mask = ~(bar.size - 1) & (0xFFFF_FFFF_FFFF_FFFF if bar.mem64 else 0xFFFF_FFFF)
        low_flags = 0x3 if bar.io else 0xF
        self._set(BAR0 + 4 * i, 4, bar.flags)
        self._mask(BAR0 + 4 * i, 4, addr_mask & 0xFFFF_FFFF & ~low_flags)
        if bar.mem64:
            self._mask(BAR0 + 4 * (i + 1), 4, addr_mask >> 32)

    def set_bar_address(self, index: int, address: int) -> None:
        bar = self.bars[index]
        assert bar is not None and address % bar.size == 0
        self._set(BAR0 + 4 * index, 4, (address & 0xFFFF_FFF0) | bar.flags)
        if bar.mem64:
            self._set(BAR0 + 4 * (index + 1), 4, address >> 32)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"") -> int:
        """Append a capability (its id and next pointer come first, then `body`); returns its
        offset. `wmask` gives the writable bits of `body`, byte for byte."""
        offset = self._cap_next
        end = offset + 2 + len(body)
        if end > CONVENTIONAL_SIZE:
            raise ValueError("capabilities do not fit in the conventional configuration space")
        self.data[offset] = cap_id
        self.data[offset + 2 : end] = body
        self.wmask[offset + 2 : offset + 2 + len(wmask)] = wmask
        self.data[self._cap_tail] = offset  # link it in (CAP_PTR or previous next)
        self._cap_tail = offset + 1
        self._cap_next = (end + 3) & ~3
        self._set(STATUS, 2, self.read(STATUS, 2) | STATUS_CAP_LIST)
        return offset

    # -- guest access --------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < 0 or size not in (1, 2, 4) or offset + size > CONFIG_SIZE:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> bool:
        """Apply a guest write through the masks; True when the command register or a BAR
        changed (the owner then remaps the function's BARs)."""
        if offset < 0 or size not in (1, 2, 4) or offset + size > CONFIG_SIZE:
            return False
        remap = False
        for i in range(size):
            o = offset + i
            byte = (value >> (8 * i)) & 0xFF
            old = self.data[o]
            new = (old & ~self.wmask[o]) | (byte & self.wmask[o])
            new &= ~(byte & self.w1c[o]) & 0xFF
            if new != old:
                self.data[o] = new
                if COMMAND <= o < COMMAND + 2 or BAR0 <= o < BAR0 + 24:
                    remap = True
        return remap

    # -- decoding --------------------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self.read(COMMAND, 2)

    def bar_address(self, index: int) -> int | None:
        """The address BAR `index` decodes now, or None (decoding off, or mid-sizing)."""
        bar = self.bars[index]
        if bar is None or not self.command & (CMD_IO if bar.io else CMD_MEMORY):
            return None
        addr = self.read(BAR0 + 4 * index, 4) & ~(0x3 if bar.io else 0xF)
        if bar.mem64:
            addr |= self.read(BAR0 + 4 * (index + 1), 4) << 32
        mask = (1 << (64 if bar.mem64 else 32)) - 1
        # an all-ones BAR is one being sized, not a real placement
        if addr == 0 or addr == (~(bar.size - 1) & mask):
            return None
        return addr
