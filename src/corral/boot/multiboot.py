"""Multiboot (version 0.6.96) loader.

The header (magic 0x1BADB002, flags, checksum) must lie 4-byte aligned in the first 8192 bytes.
With header flag 16 the address fields say where the file goes ("a.out kludge"); without it the
file must be an ELF, loaded by its program headers. The kernel is entered in 32-bit protected mode
with paging off, %eax = 0x2BADB002 and %ebx = the multiboot_info at layout.MULTIBOOT_INFO.

Layout of the info block (one page, at MULTIBOOT_INFO unless the kernel lies there):
    +0x000  struct multiboot_info (116 bytes)
    +0x090  boot loader name "corral"
    +0x100  memory map (24-byte entries, at most MMAP_MAX_BYTES)
    +0x800  module list (16-byte entries: the initrd, then the other modules; at most 16)
    +0xFF0  the boot stack's top (%esp)
The command line ("KERNEL-PATH ARGS", as GRUB and QEMU pass it) and the module strings follow
each other at layout.CMDLINE, or elsewhere below 1 MiB if the kernel lies there.

Kernels whose ELF segments (or a.out-kludge image) lie in conventional memory below 1 MiB
(real-mode test kernels) load: the info block and the command lines move out of their way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from corral.arch.x86 import layout
from corral.boot import gdt
from corral.boot._common import (
    BootInfo,
    check_kernel_range,
    low_ram_end,
    low_spot,
    place_initrd,
    write_cmdline,
)
from corral.boot.elf import ElfImage, check_entry, is_elf, load_segments, parse_elf
from corral.errors import ConfigError, KernelFormatError
from corral.memory import GuestMemory

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
HEADER_SIZE = 12
ADDR_HEADER_SIZE = 32

FLAG_PAGE_ALIGN = 1 << 0  # modules page aligned: always done
FLAG_MEMORY_INFO = 1 << 1  # mem_* (and mmap) required: always given
FLAG_VIDEO_MODE = 1 << 2  # video mode table required: corral has no framebuffer
FLAG_ADDRESS = 1 << 16  # header carries the load address fields
SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

INFO_SIZE = 116
LOADER_NAME_OFFSET = 0x90
MMAP_OFFSET = 0x100
MMAP_MAX_BYTES = 0x700
MMAP_ENTRY_SIZE = 24
MODS_OFFSET = 0x800
MAX_MODULES = 16
STACK_TOP = 0xFF0
INFO_BLOCK = 0x1000
LOADER_NAME = b"corral\0"


class MultibootHeader(NamedTuple):
    offset: int  # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(image: bytes, what: str = "kernel") -> MultibootHeader | None:
    """The first valid Multiboot header in the file's first 8 KiB, if any."""
    magic = MULTIBOOT_HEADER_MAGIC.to_bytes(4, "little")
    limit = min(len(image), SEARCH_LIMIT)
    pos = image.find(magic, 0, limit)
    while pos >= 0:
        if pos % 4 == 0 and pos + HEADER_SIZE <= limit:
            _, flags, checksum = struct.unpack_from("<III", image, pos)
            if (MULTIBOOT_HEADER_MAGIC + flags + checksum) & 0xFFFFFFFF == 0:
                if flags & FLAG_ADDRESS:
                    if pos + ADDR_HEADER_SIZE > len(image):
                        raise KernelFormatError(
                            f"{what}: the Multiboot header's address fields run past the end of "
                            f"the file: it is truncated"
                        )
                    return MultibootHeader(pos, flags, *struct.unpack_from("<5I", image, pos + 12))
                return MultibootHeader(pos, flags)
        pos = image.find(magic, pos + 1, limit)
    return None


def load_multiboot(
    mem: GuestMemory,
    image: bytes,
    header: MultibootHeader,
    *,
    elf: ElfImage | None = None,
    cmdline: str = "",
    initrd: bytes | None = None,
    rsdp_addr: int = 0,  # unused: Multiboot v1 has no RSDP field; the guest scans for it
    name: str = "kernel",
    argv0: str = "",
    initrd_name: str = "initrd",
    modules: Sequence[tuple[bytes, str]] = (),
) -> BootInfo:
    """Load a Multiboot kernel. `argv0` (the kernel's path) starts the command line, as GRUB and
    QEMU pass it; the initrd is the first module (its string `initrd_name`), then `modules`,
    each (data, its command-line string). Segments may lie below 1 MiB: the info block, its
    stack and the command lines move out of their way."""
    what = name
    required = header.flags & 0xFFFF
    if required & FLAG_VIDEO_MODE:
        raise KernelFormatError(
            f"{what}: the Multiboot header requires a graphics video mode (flag bit 2), which "
            f"corral cannot provide: it has no framebuffer, only a serial console"
        )
    unknown = required & ~SUPPORTED_REQUIRED
    if unknown:
        raise KernelFormatError(
            f"{what}: the Multiboot header requires features corral does not know "
            f"(flags {unknown:#x}); refusing to boot it, as the specification says"
        )
    mods = ([(initrd, initrd_name)] if initrd is not None else []) + list(modules)
    if len(mods) > MAX_MODULES:
        raise ConfigError(f"{len(mods)} Multiboot modules: corral passes at most {MAX_MODULES}")

    if header.flags & FLAG_ADDRESS:
        kernel_range, entry = _load_address_fields(mem, image, header, what)
        busy = [kernel_range]
    else:
        if elf is None:
            if not is_elf(image):
                raise KernelFormatError(
                    f"{what}: the Multiboot header has no address fields (flag bit 16) and the "
                    f"file is not ELF, so corral cannot tell where to load it"
                )
            elf = parse_elf(image, what)
        entry = elf.entry
        check_entry(elf, entry, "Multiboot ELF", what)
        kernel_range = load_segments(mem, elf, image, what, low_ok=True)
        busy = [(s.paddr, s.paddr + s.memsz) for s in elf.segments]

    # the info block (info, module list, strings, memory map, then the stack below its top)
    base = low_spot(busy, INFO_BLOCK, layout.MULTIBOOT_INFO, what, "the Multiboot information")
    busy.append((base, base + INFO_BLOCK))
    full = " ".join(p for p in (argv0, cmdline) if p)
    strings = [s.encode("utf-8") + b"\0" for _, s in mods]
    if any(b"\0" in s[:-1] for s in strings):
        raise ConfigError("a Multiboot module string contains a NUL character: remove it")
    room = len(full.encode("utf-8")) + 1 + sum(len(s) for s in strings)
    if room > layout.CMDLINE_MAX:
        raise ConfigError(
            f"the command line and module strings are {room} bytes; corral passes at most "
            f"{layout.CMDLINE_MAX}: shorten them"
        )
    cmd_at = low_spot(busy, room, layout.CMDLINE, what, "the command line")
    cmd_ptr = write_cmdline(mem, full, None, what, cmd_at)
    string_at = cmd_ptr + len(full.encode("utf-8")) + 1

    page = bytearray(MMAP_OFFSET + MMAP_MAX_BYTES)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    mem_lower = layout.EBDA_START // 1024
    mem_upper = (low_ram_end(mem) - layout.HIMEM_START) // 1024
    struct.pack_into("<III", page, 0, 0, mem_lower, mem_upper)
    struct.pack_into("<I", page, 16, cmd_ptr)

    initrd_range = None
    mod_list = bytearray()
    limit = low_ram_end(mem)
    for i, ((data, _), text) in enumerate(zip(mods, strings, strict=True)):
        start, end = place_initrd(mem, data, kernel_range[1], limit)
        limit = start
        if i == 0 and initrd is not None:
            initrd_range = (start, end)
        mem.write(string_at, text)
        mod_list += struct.pack("<IIII", start, end, string_at, 0)
        string_at += len(text)
    if mods:
        flags |= INFO_MODS
        mem.write(base + MODS_OFFSET, mod_list)
        struct.pack_into("<II", page, 20, len(mods), base + MODS_OFFSET)

    e820 = layout.e820_map(mem.size)
    mmap_len = len(e820) * MMAP_ENTRY_SIZE
    if mmap_len > MMAP_MAX_BYTES:
        raise KernelFormatError(f"{what}: the memory map ({len(e820)} entries) does not fit")
    for i, (addr, size, typ) in enumerate(e820):
        struct.pack_into("<IQQI", page, MMAP_OFFSET + i * MMAP_ENTRY_SIZE, 20, addr, size, typ)
    struct.pack_into("<II", page, 44, mmap_len, base + MMAP_OFFSET)
    page[LOADER_NAME_OFFSET : LOADER_NAME_OFFSET + len(LOADER_NAME)] = LOADER_NAME
    struct.pack_into("<I", page, 64, base + LOADER_NAME_OFFSET)
    struct.pack_into("<I", page, 0, flags)
    mem.write(base, page)

    cpu = gdt.protected_mode_state(mem, entry, {"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": base})
    cpu = cpu._replace(rsp=base + STACK_TOP)
    return BootInfo("multiboot", cpu, kernel_range, initrd_range)


def _load_address_fields(
    mem: GuestMemory, image: bytes, h: MultibootHeader, what: str
) -> tuple[tuple[int, int], int]:
    """Load per the a.out-kludge fields; return ([start, end), entry)."""
    if not h.load_addr <= h.header_addr:
        raise KernelFormatError(
            f"{what}: Multiboot load_addr {h.load_addr:#x} is above header_addr {h.header_addr:#x}"
        )
    file_start = h.offset - (h.header_addr - h.load_addr)
    if file_start < 0:
        raise KernelFormatError(
            f"{what}: Multiboot load_addr {h.load_addr:#x} lies before the start of the file"
        )
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise KernelFormatError(
                f"{what}: Multiboot load_end_addr {h.load_end_addr:#x} is below load_addr {h.load_addr:#x}"
            )
        load_size = h.load_end_addr - h.load_addr
        if file_start + load_size > len(image):
            raise KernelFormatError(
                f"{what}: the Multiboot header asks for {load_size} bytes from file offset "
                f"{file_start:#x} but the file is {len(image)} bytes: it is truncated"
            )
    else:
        load_size = len(image) - file_start
    load_end = h.load_addr + load_size
    if h.bss_end_addr:
        if h.bss_end_addr < load_end:
            raise KernelFormatError(
                f"{what}: Multiboot bss_end_addr {h.bss_end_addr:#x} is below the end of the "
                f"loaded image {load_end:#x}"
            )
        end = h.bss_end_addr
    else:
        end = load_end
    if end == h.load_addr:
        raise KernelFormatError(f"{what}: the Multiboot header describes an empty image")
    check_kernel_range(mem, h.load_addr, end - h.load_addr, what, "the Multiboot image", low_ok=True)
    if not h.load_addr <= h.entry_addr < end:
        raise KernelFormatError(
            f"{what}: the Multiboot entry_addr {h.entry_addr:#x} is outside the loaded image "
            f"{h.load_addr:#x}-{end:#x}"
        )
    mem.write(h.load_addr, memoryview(image)[file_start : file_start + load_size])
    if end > load_end:
        mem.zero(load_end, end - load_end)
    return (h.load_addr, end), h.entry_addr
