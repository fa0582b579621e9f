"""Linux bzImage loader, the 64-bit and 32-bit boot protocols (Documentation/arch/x86/boot.rst).

The protected-mode kernel is copied to its preferred address (or 1 MiB rounded up to
kernel_alignment when it is relocatable), a struct boot_params ("zero page") is built at
layout.ZERO_PAGE from the image's setup header, and the boot CPU enters with %esi/%rsi pointing
at the zero page:

* an x86-64 kernel (xloadflags has XLF_KERNEL_64) at startup_64, load address + 0x200, in long
  mode with the first 4 GiB identity mapped;
* a 32-bit kernel (i386/686: no XLF_KERNEL_64) at its 32-bit entry, the load address (written
  back as code32_start, as the protocol asks of a loader that moves the kernel), in protected
  mode with paging off, flat 4 GiB __BOOT_CS (0x10) / __BOOT_DS (0x18), interrupts off and
  %ebp/%edi/%ebx zero. An x86-64 kernel can be entered there too (`prefer="linux32"`): its
  startup_32 builds its own page tables, as it does under a 32-bit boot loader.

Both need only the header fields through init_size (protocol 2.10); the 64-bit entry is
advertised from 2.12. CPUID is the machine's either way: a 686 kernel runs on a 64-bit CPU.
"""

from __future__ import annotations

import bz2
import lzma
import zlib

from corral.arch.x86 import layout
from corral.boot import gdt
from corral.boot._common import (
    BootInfo,
    align_up,
    check_kernel_range,
    low_ram_end,
    place_initrd,
    u8,
    u16,
    u32,
    u64,
    write_cmdline,
)
from corral.errors import KernelFormatError
from corral.memory import GuestMemory

HDRS_MAGIC = b"HdrS"
MIN_VERSION = 0x020C  # 2.12: xloadflags, the 64-bit entry point is advertised
MIN_VERSION_32 = 0x020A  # 2.10: pref_address and init_size, which place the kernel

# setup header offsets (in the image file and, identically, in boot_params)
OFF_SETUP_SECTS = 0x1F1
OFF_SYSSIZE = 0x1F4
OFF_JUMP = 0x200
OFF_MAGIC = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PAYLOAD_OFFSET = 0x248  # 2.08+: the compressed vmlinux, from the protected-mode code
OFF_PAYLOAD_LENGTH = 0x24C
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
SETUP_HEADER_MIN_END = 0x264  # through init_size
SETUP_HEADER_MAX_END = 0x290  # boot_params.edd_mbr_sig_buffer follows the header area

# boot_params fields outside the setup header
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY_SIZE = 20
BOOT_PARAMS_SIZE = 0x1000

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
TYPE_OF_LOADER_UNDEFINED = 0xFF
HEAP_END_PTR = 0xFE00 - 0x200
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: assume this when the header has no value
SYSSIZE_SLACK = 0x1000  # tolerated difference between syssize and the file


ENTRY_64_OFFSET = 0x200  # startup_64 from the load address


def is_bzimage(image: bytes) -> bool:
    return image[OFF_MAGIC : OFF_MAGIC + 4] == HDRS_MAGIC


ELF_HEAD = 5  # "\x7fELF" and EI_CLASS
ELFCLASS_BITS = {1: 32, 2: 64}
PEEK_INPUT = 1 << 20  # compressed bytes read for the ELF header: a few hundred suffice
PEEK_MEMLIMIT = 64 << 20  # the kernel's xz dictionary is 32 MiB; a hostile header wants more


def payload_elf_class(image: bytes) -> int | None:
    """32 or 64: the class of the vmlinux ELF inside the payload, for the compressions Python
    reads (gzip, xz, bzip2, lzma); None when it cannot tell (lz4, lzo, zstd; protocol before
    2.08; a damaged payload). Only the first bytes are decompressed."""
    try:
        if u16(image, OFF_VERSION, "") < 0x0208:
            return None
        start = (u8(image, OFF_SETUP_SECTS, "") or 4) * 512 + 512 + u32(image, OFF_PAYLOAD_OFFSET, "")
        data = image[start : start + min(u32(image, OFF_PAYLOAD_LENGTH, ""), PEEK_INPUT)]
        if data[:2] == b"\x1f\x8b":
            head = zlib.decompressobj(wbits=31).decompress(data, ELF_HEAD)
        elif data[:6] == b"\xfd7zXZ\x00":
            head = lzma.LZMADecompressor(lzma.FORMAT_XZ, PEEK_MEMLIMIT).decompress(data, ELF_HEAD)
        elif data[:3] == b"BZh":
            head = bz2.BZ2Decompressor().decompress(data, ELF_HEAD)
        elif data[:3] == b"\x5d\x00\x00":
            head = lzma.LZMADecompressor(lzma.FORMAT_ALONE, PEEK_MEMLIMIT).decompress(data, ELF_HEAD)
        else:
            return None
    except (KernelFormatError, zlib.error, lzma.LZMAError, OSError, EOFError, ValueError, MemoryError):
        return None
    return ELFCLASS_BITS.get(head[4]) if head[:4] == b"\x7fELF" and len(head) == ELF_HEAD else None


def entry_protocol(image: bytes, prefer: str | None = None, name: str = "kernel") -> str:
    """The entry to use: "linux64" when the setup header advertises the 64-bit entry
    (XLF_KERNEL_64, protocol 2.12+), else "linux32"; `prefer="linux32"` enters a 64-bit kernel
    at its 32-bit entry (so does a pre-3.8 x86-64 kernel, which advertised none). A header that
    claims the 64-bit entry for a 32-bit vmlinux (payload_elf_class) is refused. The minimum
    version is checked here, so callers trust the fields."""
    what = name
    version = u16(image, OFF_VERSION, what)
    has_64 = version >= MIN_VERSION and bool(u16(image, OFF_XLOADFLAGS, what) & XLF_KERNEL_64)
    if prefer == "linux64" and not has_64:
        raise KernelFormatError(
            f"{what}: the kernel has no 64-bit entry point (XLF_KERNEL_64 clear or protocol "
            f"before 2.12): boot it with the 32-bit protocol (linux32)"
        )
    protocol = "linux64" if has_64 and prefer != "linux32" else "linux32"
    if protocol == "linux64" and payload_elf_class(image) == 32:
        raise KernelFormatError(
            f"{what}: the header advertises a 64-bit entry but the kernel inside is a 32-bit ELF: "
            f"the image is damaged"
        )
    if version < MIN_VERSION_32:
        raise KernelFormatError(
            f"{what}: Linux boot protocol {version >> 8}.{version & 0xFF:02d} is too old: corral "
            f"needs 2.10 or later (Linux 2.6.31+) for pref_address and init_size"
        )
    return protocol


def load_bzimage(
    mem: GuestMemory,
    image: bytes,
    *,
    cmdline: str = "",
    initrd: bytes | None = None,
    rsdp_addr: int = 0,
    name: str = "kernel",
    prefer: str | None = None,
) -> BootInfo:
    """Load a bzImage; `prefer` ("linux64" | "linux32") picks the entry (see entry_protocol)."""
    what = name
    if len(image) < SETUP_HEADER_MIN_END:
        raise KernelFormatError(f"{what}: too short ({len(image)} bytes) to hold a Linux setup header")
    if not is_bzimage(image):
        raise KernelFormatError(f"{what}: no 'HdrS' signature at offset 0x202: not a bzImage")
    version = u16(image, OFF_VERSION, what)
    protocol = entry_protocol(image, prefer, what)
    setup_sects = u8(image, OFF_SETUP_SECTS, what) or 4
    setup_size = (setup_sects + 1) * 512
    header_end = OFF_MAGIC + u8(image, OFF_JUMP + 1, what)
    if header_end < SETUP_HEADER_MIN_END:
        raise KernelFormatError(
            f"{what}: the setup header ends at {header_end:#x}, before the fields boot protocol "
            f"2.10 defines: the image is damaged"
        )
    header_end = min(header_end, SETUP_HEADER_MAX_END)
    if header_end > setup_size or setup_size >= len(image):
        raise KernelFormatError(
            f"{what}: the setup code ({setup_size} bytes) does not fit in the {len(image)}-byte "
            f"file: the image is truncated or damaged"
        )
    loadflags = u8(image, OFF_LOADFLAGS, what)
    if not loadflags & LOADED_HIGH:
        raise KernelFormatError(f"{what}: a zImage (loaded below 1 MiB); corral boots only bzImage kernels")
    payload = memoryview(image)[setup_size:]
    syssize = u32(image, OFF_SYSSIZE, what)
    if syssize * 16 > len(payload) + SYSSIZE_SLACK:
        raise KernelFormatError(
            f"{what}: the header says the kernel is {syssize * 16} bytes but the file holds only "
            f"{len(payload)} after the setup code: the image is truncated"
        )

    init_size = u32(image, OFF_INIT_SIZE, what)
    span = align_up(max(init_size, len(payload)), 0x1000)
    pref = u64(image, OFF_PREF_ADDRESS, what)
    relocatable = u8(image, OFF_RELOCATABLE, what) != 0
    load = _choose_load_address(mem, pref, span, relocatable, image, what)
    check_kernel_range(mem, load, span, what, "the kernel (init_size)")
    mem.write(load, payload)
    kernel_end = load + span

    # --- boot_params -----------------------------------------------------------------------
    zp = bytearray(BOOT_PARAMS_SIZE)
    zp[OFF_SETUP_SECTS:header_end] = image[OFF_SETUP_SECTS:header_end]
    zp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    zp[OFF_LOADFLAGS] = loadflags | CAN_USE_HEAP
    _put(zp, OFF_CODE32_START, load, 4)  # where the 32-bit entry now is
    _put(zp, OFF_HEAP_END_PTR, HEAP_END_PTR, 2)

    cmdline_size = u32(image, OFF_CMDLINE_SIZE, what)
    cmd_ptr = write_cmdline(mem, cmdline, cmdline_size, f"{what} (cmdline_size)")
    _put(zp, OFF_CMD_LINE_PTR, cmd_ptr & 0xFFFFFFFF, 4)
    _put(zp, BP_EXT_CMD_LINE_PTR, cmd_ptr >> 32, 4)

    initrd_range = None
    if initrd is not None:
        addr_max = u32(image, OFF_INITRD_ADDR_MAX, what) or DEFAULT_INITRD_ADDR_MAX
        limit = min(addr_max + 1, low_ram_end(mem), layout.MMIO_HOLE_START)
        initrd_range = place_initrd(mem, initrd, kernel_end, limit)
        start, end = initrd_range
        _put(zp, OFF_RAMDISK_IMAGE, start & 0xFFFFFFFF, 4)
        _put(zp, OFF_RAMDISK_SIZE, (end - start) & 0xFFFFFFFF, 4)
        _put(zp, BP_EXT_RAMDISK_IMAGE, start >> 32, 4)
        _put(zp, BP_EXT_RAMDISK_SIZE, (end - start) >> 32, 4)

    e820 = layout.e820_map(mem.size)
    if len(e820) > E820_MAX_ENTRIES:
        raise KernelFormatError(f"{what}: the memory map has {len(e820)} entries, over 128")
    zp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, typ) in enumerate(e820):
        off = BP_E820_TABLE + i * E820_ENTRY_SIZE
        _put(zp, off, addr, 8)
        _put(zp, off + 8, size, 8)
        _put(zp, off + 16, typ, 4)

    if rsdp_addr and version >= 0x020E:
        _put(zp, BP_ACPI_RSDP_ADDR, rsdp_addr, 8)
    mem.write(layout.ZERO_PAGE, zp)

    if protocol == "linux64":
        cpu = gdt.long_mode_state(mem, load + ENTRY_64_OFFSET, {"rsi": layout.ZERO_PAGE})
    else:  # %ebp, %edi, %ebx start at zero like every register not named
        cpu = gdt.protected_mode_state(mem, load, {"rsi": layout.ZERO_PAGE})
    return BootInfo(protocol, cpu, (load, kernel_end), initrd_range)


def _put(buf: bytearray, off: int, value: int, size: int) -> None:
    buf[off : off + size] = value.to_bytes(size, "little")


def _choose_load_address(
    mem: GuestMemory, pref: int, span: int, relocatable: bool, image: bytes, what: str
) -> int:
    """pref_address when it is above 1 MiB and fits, else 1 MiB rounded up to kernel_alignment."""
    if pref >= layout.HIMEM_START and pref + span <= low_ram_end(mem):
        return pref
    if not relocatable:
        if pref < layout.HIMEM_START:
            raise KernelFormatError(
                f"{what}: the kernel is not relocatable and its preferred address {pref:#x} is below 1 MiB"
            )
        return pref  # check_kernel_range explains why it does not fit
    align = u32(image, OFF_KERNEL_ALIGNMENT, what)
    if align == 0 or align & (align - 1) or align > layout.GiB:
        raise KernelFormatError(
            f"{what}: kernel_alignment {align:#x} is not a power of two up to 1 GiB: the image is damaged"
        )
    return align_up(layout.HIMEM_START, align)
