"""QEMU's firmware configuration interface (fw_cfg): how firmware and test kernels learn the
machine they run on (CPU count, RAM size, memory map, boot order, the kernel to boot).

Why: SeaBIOS, OVMF and many test kernels read these items instead of probing hardware; with the
same ports and items as QEMU they run under corral unchanged. Facts from QEMU's
docs/specs/fw_cfg.rst (x86 I/O ports):

    0x510  selector (16-bit write): the item to read; bit 15 picks the arch-local table,
           bit 14 (the old write channel) is ignored; selecting rewinds the offset to 0
    0x511  data (8-bit read): the next byte of the item; past its end (or of no item) reads 0;
           writes are ignored (as in QEMU since 2.4)
    0x514  DMA address (8 bytes, big-endian): a 32-bit write at 0x514 latches the high half,
           one at 0x518 the low half and starts the transfer; reads give "QEMU CFG"

A DMA transfer reads a `FWCfgDmaAccess` from guest memory (big-endian: u32 control, u32
length, u64 address). Control bits: SELECT (selector in bits 16-31) first, then one of READ
(copy item bytes to `address`, zeros past the item's end), SKIP (advance the offset), WRITE
(only into writable items, never past their end). When done the device writes control back:
0, or ERROR (bit 0) when the descriptor, the guest range or the request was bad. Every guest
address goes through GuestMemory's checked accessors; lengths are u32, copies are chunked, so a
hostile descriptor costs the guest time and the VMM no memory. No access raises.

Items are little-endian integers or bytes; the file directory (key 0x19) is big-endian: u32
count, then per file u32 size, u16 select, u16 reserved, char name[56], sorted by name, files
numbered from 0x20 in that order. An item's data may be given as a callable: it is called once,
on the guest's first access (the kernel for firmware-driven boot is read only if firmware asks).

A firmware machine also gets `etc/acpi/tables`, `etc/acpi/rsdp` and `etc/table-loader` (corral's
ACPI tables and QEMU's linker/loader script for them, arch/x86/acpi_loader.py) and
`etc/smbios/smbios-tables` + `etc/smbios/smbios-anchor` (arch/x86/smbios.py): add_firmware_tables.

State: the items are built from the machine config again on restore; only the selector, the
offset into the item and the latched DMA high half are guest state.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar

from corral.arch.x86 import layout
from corral.devices.base import U16, U32, DeviceState
from corral.devices.legacy._common import ONES
from corral.errors import CorralError
from corral.lazymodel import Field

if TYPE_CHECKING:
    from corral.memory import GuestMemory

log = logging.getLogger(__name__)

BASE_PORT = layout.FW_CFG_PORT
SPAN = layout.FW_CFG_PORTS  # 0x510-0x51B: selector, data, (2 unused), DMA address
SELECTOR_OFFSET = 0
DATA_OFFSET = 1
DMA_OFFSET = 4
DMA_SIGNATURE = b"QEMU CFG"

# keys (QEMU's FW_CFG_*)
SIGNATURE = 0x0000
ID = 0x0001
RAM_SIZE = 0x0003
NOGRAPHIC = 0x0004
NB_CPUS = 0x0005
KERNEL_ADDR = 0x0007
KERNEL_SIZE = 0x0008
KERNEL_CMDLINE = 0x0009
INITRD_ADDR = 0x000A
INITRD_SIZE = 0x000B
BOOT_MENU = 0x000E
MAX_CPUS = 0x000F
KERNEL_DATA = 0x0011
INITRD_DATA = 0x0012
CMDLINE_ADDR = 0x0013
CMDLINE_SIZE = 0x0014
CMDLINE_DATA = 0x0015
SETUP_ADDR = 0x0016
SETUP_SIZE = 0x0017
SETUP_DATA = 0x0018
FILE_DIR = 0x0019
FILE_FIRST = 0x0020
WRITE_CHANNEL = 0x4000
ARCH_LOCAL = 0x8000
KEY_MASK = 0x3FFF
MAX_FILES = KEY_MASK + 1 - FILE_FIRST
FILE_NAME_MAX = 55  # name[56] with its NUL

ID_TRADITIONAL = 1 << 0
ID_DMA = 1 << 1

# DMA control bits
DMA_ERROR = 1 << 0
DMA_READ = 1 << 1
DMA_SKIP = 1 << 2
DMA_SELECT = 1 << 3
DMA_WRITE = 1 << 4
DMA_ACCESS = struct.Struct(">IIQ")
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)

Data = bytes | bytearray | Callable[[], bytes]


class _Item:
    __slots__ = ("data", "writable")

    def __init__(self, data: Data, writable: bool = False) -> None:
        self.data = data
        self.writable = writable

    def resolve(self, key: int) -> bytes | bytearray:
        """The item's bytes, fetched on first use; a fetch that fails leaves it empty."""
        if callable(self.data):
            try:
                self.data = bytes(self.data())
            except (CorralError, OSError) as exc:
                log.warning("fw_cfg item %#x could not be read: %s", key, exc)
                self.data = b""
        return self.data


def le(value: int, size: int) -> bytes:
    """A little-endian integer item."""
    return value.to_bytes(size, "little")


def e820_blob(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """`etc/e820`: packed struct e820_entry {le64 address; le64 length; le32 type}."""
    return b"".join(struct.pack("<QQI", addr, size, typ) for addr, size, typ in entries)


class FwCfgState(DeviceState):
    selector: U16 = Field(default=0, description="the selected key, as the guest wrote it")
    offset: U32 = Field(default=0, description="the next byte of the item the data port reads")
    dma_high: U32 = Field(default=0, description="the latched high half of the DMA address")


class FwCfg:
    """fw_cfg on ports 0x510-0x51B (offsets from BASE_PORT), with DMA into `memory`."""

    state_model: ClassVar[type[FwCfgState]] = FwCfgState

    def __init__(self, memory: GuestMemory) -> None:
        self._mem = memory
        self._lock = threading.Lock()
        self._items: dict[int, _Item] = {}
        self._files: dict[str, _Item] = {}
        self._selector = 0
        self._offset = 0
        self._dma_high = 0
        self.add(SIGNATURE, b"QEMU")
        self.add(ID, le(ID_TRADITIONAL | ID_DMA, 4))
        self._build_directory()

    # -- building (before the guest runs) ---------------------------------------------------------
    def add(self, key: int, data: Data, *, writable: bool = False) -> None:
        """Item `key` (ARCH_LOCAL set for the arch table); `data` may be a callable."""
        if key & WRITE_CHANNEL or (key & KEY_MASK) >= FILE_FIRST:
            raise ValueError(f"fw_cfg key {key:#x} is not a numbered item below {FILE_FIRST:#x}")
        self._items[key] = _Item(data if callable(data) else bytes(data), writable)

    def add_file(self, name: str, data: bytes | bytearray, *, writable: bool = False) -> None:
        """A named file in the directory; files get their selectors in name order."""
        raw = name.encode()
        if not raw or len(raw) > FILE_NAME_MAX or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r}: give 1 to {FILE_NAME_MAX} bytes, no NUL")
        if name in self._files or len(self._files) >= MAX_FILES:
            raise ValueError(f"fw_cfg file {name!r}: already there, or the directory is full")
        self._files[name] = _Item(bytearray(data) if writable else bytes(data), writable)
        self._build_directory()

    def _build_directory(self) -> None:
        for key in [k for k in self._items if FILE_FIRST <= k <= KEY_MASK]:
            del self._items[key]
        entries = [struct.pack(">I", len(self._files))]
        for i, name in enumerate(sorted(self._files)):
            item = self._files[name]
            data = item.data
            assert not callable(data)
            key = FILE_FIRST + i
            self._items[key] = item
            entries.append(struct.pack(">IHH56s", len(data), key, 0, name.encode()))
        self._items[FILE_DIR] = _Item(b"".join(entries))

    def files(self) -> dict[str, int]:
        """name -> selector, as the directory lists them."""
        return {name: FILE_FIRST + i for i, name in enumerate(sorted(self._files))}

    # -- port I/O ----------------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if offset == DATA_OFFSET:
            with self._lock:
                data = self._read(size)
            return int.from_bytes(data, "little")
        if DMA_OFFSET <= offset < DMA_OFFSET + len(DMA_SIGNATURE):
            start = offset - DMA_OFFSET
            sig = DMA_SIGNATURE[start : start + size].ljust(size, b"\xff")
            return int.from_bytes(sig, "little")
        return ONES[size]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR_OFFSET and size >= 2:
            with self._lock:
                self._select(value & 0xFFFF)
        elif offset == DMA_OFFSET and size == 4:
            with self._lock:
                self._dma_high = _swap32(value)
        elif offset == DMA_OFFSET + 4 and size == 4:
            with self._lock:
                addr = (self._dma_high << 32) | _swap32(value)
                self._dma_high = 0
                self._dma(addr)
        elif offset == DMA_OFFSET and size == 8:
            with self._lock:
                self._dma_high = 0
                self._dma(int.from_bytes(value.to_bytes(8, "little"), "big"))

    # -- the item machinery (lock held) ------------------------------------------------------------
    def _select(self, selector: int) -> None:
        self._selector, self._offset = selector, 0
        if selector & (ARCH_LOCAL | KEY_MASK) not in self._items:  # what a firmware wants and lacks
            log.debug("fw_cfg: unknown selector %#x (reads zeros)", selector)

    def _current(self) -> _Item | None:
        key = self._selector & (ARCH_LOCAL | KEY_MASK)
        return self._items.get(key)

    def _read(self, length: int) -> bytes:
        """`length` item bytes from the offset on (zeros past the end); advances the offset."""
        item = self._current()
        data = item.resolve(self._selector) if item is not None else b""
        out = bytes(data[self._offset : self._offset + length]).ljust(length, b"\0")
        self._offset = min(self._offset + length, 0xFFFF_FFFF)
        return out

    def _dma(self, addr: int) -> None:
        """One DMA transfer described at `addr`; control written back with 0 or ERROR."""
        try:
            control, length, target = DMA_ACCESS.unpack(self._mem.read(addr, DMA_ACCESS.size))
        except CorralError:
            return  # no descriptor to report the error in
        ok = self._transfer(control, length, target)
        try:
            self._mem.write(addr, struct.pack(">I", 0 if ok else DMA_ERROR))
        except CorralError:
            pass

    def _transfer(self, control: int, length: int, target: int) -> bool:
        if control & DMA_SELECT:
            self._select(control >> 16)
        item = self._current()
        if control & DMA_READ:
            data = item.resolve(self._selector) if item is not None else b""
            return self._copy_out(data, length, target)
        if control & DMA_SKIP:
            self._offset = min(self._offset + length, 0xFFFF_FFFF)
            return True
        if control & DMA_WRITE:
            if item is None or not item.writable or not isinstance(item.data, bytearray):
                return False
            if self._offset + length > len(item.data):
                return False
            try:
                src = self._mem.view(target, length)
            except CorralError:
                return False
            item.data[self._offset : self._offset + length] = src
            self._offset += length
            return True
        return True  # SELECT alone, or nothing to do

    def _copy_out(self, data: bytes | bytearray, length: int, target: int) -> bool:
        try:
            dst = self._mem.view(target, length)
        except CorralError:
            return False
        src = memoryview(data)[self._offset : self._offset + length]
        dst[: len(src)] = src
        for pos in range(len(src), length, _CHUNK):
            n = min(_CHUNK, length - pos)
            dst[pos : pos + n] = _ZEROS[:n]
        self._offset = min(self._offset + length, 0xFFFF_FFFF)
        return True

    # -- state -----------------------------------------------------------------------------------------
    def save_state(self) -> FwCfgState:
        with self._lock:
            return FwCfgState(selector=self._selector, offset=self._offset, dma_high=self._dma_high)

    def load_state(self, state: FwCfgState) -> None:
        with self._lock:
            self._selector, self._offset, self._dma_high = state.selector, state.offset, state.dma_high


def _swap32(value: int) -> int:
    """A 32-bit port value as the big-endian number its bytes spell."""
    return int.from_bytes((value & 0xFFFF_FFFF).to_bytes(4, "little"), "big")


def linux_split(kernel: bytes) -> tuple[bytes, bytes]:
    """(setup, kernel) as QEMU's SETUP_DATA/KERNEL_DATA hold them: a bzImage's real-mode setup
    ((setup_sects or 4) + 1 sectors) and its protected-mode part; other kernels whole."""
    if len(kernel) >= 0x206 and kernel[0x202:0x206] == b"HdrS":
        setup = ((kernel[0x1F1] or 4) + 1) * 512
        if setup < len(kernel):
            return kernel[:setup], kernel[setup:]
    return b"", kernel


def add_kernel_items(
    fw: FwCfg, kernel: Callable[[], bytes], initrd: Callable[[], bytes] | None, cmdline: str
) -> None:
    """The legacy kernel/initrd/cmdline items for firmware-driven direct boot (QEMU's -kernel).
    The files are read on the guest's first access to any of them, so direct boot pays nothing."""
    cache: dict[str, tuple[bytes, bytes]] = {}

    def parts() -> tuple[bytes, bytes]:
        if "k" not in cache:
            cache["k"] = linux_split(kernel())
        return cache["k"]

    def rd() -> bytes:
        if "i" not in cache:
            cache["i"] = (initrd() if initrd is not None else b"", b"")
        return cache["i"][0]

    cmd = cmdline.encode() + b"\0"
    fw.add(SETUP_SIZE, lambda: le(len(parts()[0]), 4))
    fw.add(SETUP_DATA, lambda: parts()[0])
    fw.add(KERNEL_SIZE, lambda: le(len(parts()[1]), 4))
    fw.add(KERNEL_DATA, lambda: parts()[1])
    fw.add(INITRD_SIZE, lambda: le(len(rd()), 4))
    fw.add(INITRD_DATA, rd)
    fw.add(CMDLINE_SIZE, le(len(cmd), 4))
    fw.add(CMDLINE_DATA, cmd)


def machine_fw_cfg(
    memory: GuestMemory,
    *,
    cpus: int,
    e820: Iterable[tuple[int, int, int]],
    bootorder: Iterable[str] = (),
    serial_port: int = 0x3F8,
) -> FwCfg:
    """fw_cfg with the items every corral machine offers."""
    fw = FwCfg(memory)
    fw.add(RAM_SIZE, le(memory.size, 8))
    fw.add(NB_CPUS, le(cpus, 2))
    fw.add(MAX_CPUS, le(cpus, 2))
    fw.add(NOGRAPHIC, le(1, 2))
    fw.add(BOOT_MENU, le(0, 2))
    fw.add_file("etc/e820", e820_blob(e820))
    order = "\n".join(bootorder)
    fw.add_file("bootorder", order.encode() + b"\0" if order else b"")
    fw.add_file("etc/sercon-port", le(serial_port, 2))
    return fw


def add_firmware_tables(fw: FwCfg, *, cpus: int, mem_size: int) -> None:
    """corral's ACPI tables with their linker/loader script (arch/x86/acpi_loader.py) and its
    SMBIOS tables (arch/x86/smbios.py), for a firmware to install instead of its own.
    Imported here, for a firmware's machine only (listed in corral.builder.LAZY_MODULES)."""
    from corral.arch.x86 import smbios
    from corral.arch.x86.acpi_loader import firmware_acpi

    for name, data in {
        **firmware_acpi(cpus, mem_size).files(),
        **smbios.firmware_smbios(cpus, mem_size),
    }.items():
        fw.add_file(name, data)
