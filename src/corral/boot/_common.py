"""Helpers shared by the kernel loaders: bounds-checked field reads, placement, the command line.

Everything a kernel file says (offsets, sizes, addresses) is treated as hostile: a read past the
end of the file raises KernelFormatError, never IndexError or struct.error.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from corral.arch.x86 import layout
from corral.boot.cpu_state import BootCpuState
from corral.errors import ConfigError, FieldError, KernelFormatError
from corral.memory import GuestMemory

PAGE = 0x1000


class BootInfo(NamedTuple):
    """What a loader did: the protocol, the boot CPU state, and where the images went.

    `kernel_range` and `initrd_range` are half-open guest-physical [start, end) ranges;
    `kernel_range` covers the memory the kernel owns at entry (for a bzImage: load address
    up to load address + max(init_size, payload size)).
    """

    protocol: str  # "linux64" | "linux32" | "pvh" | "multiboot"
    cpu: BootCpuState
    kernel_range: tuple[int, int]
    initrd_range: tuple[int, int] | None


def unpack(fmt: str, buf: bytes | memoryview, off: int, what: str) -> tuple[int, ...]:
    """struct.unpack_from that raises KernelFormatError when the field lies past the end."""
    size = struct.calcsize(fmt)
    if off < 0 or off + size > len(buf):
        raise KernelFormatError(
            f"{what}: the file is truncated ({len(buf)} bytes; a field at offset {off:#x} needs {size} bytes)"
        )
    return struct.unpack_from(fmt, buf, off)


def u8(buf: bytes, off: int, what: str) -> int:
    return unpack("<B", buf, off, what)[0]


def u16(buf: bytes, off: int, what: str) -> int:
    return unpack("<H", buf, off, what)[0]


def u32(buf: bytes, off: int, what: str) -> int:
    return unpack("<I", buf, off, what)[0]


def u64(buf: bytes, off: int, what: str) -> int:
    return unpack("<Q", buf, off, what)[0]


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def align_down(value: int, align: int) -> int:
    return value & ~(align - 1)


def low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM below the 32-bit MMIO hole (the only RAM 32-bit entry points can reach)."""
    return min(mem.size, layout.MMIO_HOLE_START)


LOW_KERNEL_START = 0x1000  # below: the real-mode IVT, the BIOS data area and the boot GDT/IDT


def check_kernel_range(
    mem: GuestMemory, start: int, size: int, what: str, part: str, *, low_ok: bool = False
) -> None:
    """Check a range the kernel image wants to occupy: above 1 MiB and inside low guest RAM.
    With `low_ok` (Multiboot: real-mode test kernels) it may also lie in the conventional
    memory LOW_KERNEL_START..EBDA_START; the boot structures then move out of its way.

    A range that would fit a bigger guest is a ConfigError (give more memory); one that can never
    fit (below 1 MiB, over the low structures, in or above the MMIO hole) is a KernelFormatError.
    """
    end = start + size
    if low_ok and start < layout.HIMEM_START:
        if start < LOW_KERNEL_START or end > layout.EBDA_START:
            raise KernelFormatError(
                f"{what}: {part} at {start:#x}-{end:#x} lies over memory corral keeps below 1 MiB "
                f"(the first 4 KiB, and the BIOS area from {layout.EBDA_START:#x}); link it within "
                f"{LOW_KERNEL_START:#x}-{layout.EBDA_START:#x} or at 1 MiB and above"
            )
        return
    if start < layout.HIMEM_START:
        raise KernelFormatError(
            f"{what}: {part} at {start:#x}-{end:#x} lies below 1 MiB, over the memory "
            f"corral keeps for boot structures; link the kernel at 1 MiB or above"
        )
    if end > layout.MMIO_HOLE_START:
        raise KernelFormatError(
            f"{what}: {part} at {start:#x}-{end:#x} reaches past "
            f"{layout.MMIO_HOLE_START:#x}, where the 32-bit MMIO hole starts; no guest RAM is "
            f"there"
        )
    if end > low_ram_end(mem) or not mem.contains(start, size):
        raise ConfigError(
            f"{what}: {part} at {start:#x}-{end:#x} does not fit in "
            f"{mem.size // layout.MiB} MiB of guest memory: give the guest at least "
            f"{-(-end // layout.MiB)} MiB"
        )


def place_initrd(mem: GuestMemory, initrd: bytes, lowest: int, limit: int) -> tuple[int, int]:
    """Copy the initrd page-aligned as high as possible in [lowest, limit); return its range."""
    if not initrd:
        raise FieldError("initrd", "the initrd is empty: give a non-empty initramfs or leave it out")
    limit = min(limit, low_ram_end(mem))
    lowest = align_up(max(lowest, layout.HIMEM_START), PAGE)
    size = len(initrd)
    addr = align_down(limit - size, PAGE) if limit >= size else -1
    if addr < lowest:
        room = max(0, align_down(limit, PAGE) - lowest)
        raise ConfigError(
            f"the initrd ({size} bytes) does not fit in guest memory: only {room} bytes are free "
            f"between the kernel's end ({lowest:#x}) and {limit:#x}; give the guest more memory "
            f"or use a smaller initrd"
        )
    mem.write(addr, initrd)
    return addr, addr + size


def low_spot(busy: list[tuple[int, int]], size: int, preferred: int, what: str, part: str) -> int:
    """Where a boot structure of `size` bytes goes: at `preferred` unless that overlaps a
    [start, end) range in `busy` (the kernel's segments), else the lowest free page-aligned
    place in LOW_KERNEL_START..EBDA_START."""

    def free(at: int) -> bool:
        return all(at + size <= s or at >= e for s, e in busy)

    if free(preferred):
        return preferred
    for at in range(LOW_KERNEL_START, layout.EBDA_START - size + 1, PAGE):
        if free(at):
            return at
    raise KernelFormatError(
        f"{what}: the kernel's segments below 1 MiB leave no room for {part} ({size} bytes): "
        f"leave some of {LOW_KERNEL_START:#x}-{layout.EBDA_START:#x} free"
    )


def write_cmdline(
    mem: GuestMemory, cmdline: str, limit: int | None, what: str, addr: int = layout.CMDLINE
) -> int:
    """Write the NUL-terminated command line at `addr` (layout.CMDLINE); return its address.

    `limit` is the longest command line (without the NUL) the kernel accepts, if it says.
    """
    data = cmdline.encode("utf-8", errors="strict") if cmdline else b""
    if b"\0" in data:
        raise ConfigError("the kernel command line contains a NUL character: remove it")
    if len(data) + 1 > layout.CMDLINE_MAX:
        raise ConfigError(
            f"the kernel command line is {len(data)} bytes; corral passes at most "
            f"{layout.CMDLINE_MAX - 1}: shorten it"
        )
    if limit is not None and len(data) > limit:
        raise ConfigError(
            f"the kernel command line is {len(data)} bytes but {what} accepts at most {limit}: shorten it"
        )
    mem.write(addr, data + b"\0")
    return addr
