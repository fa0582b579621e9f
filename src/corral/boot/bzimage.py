"""Linux bzImage loader, 64-bit boot protocol (Documentation/arch/x86/boot.rst).

The protected-mode kernel is copied to its preferred address (or 1 MiB rounded up to
kernel_alignment when it is relocatable), a struct boot_params ("zero page") is built at
layout.ZERO_PAGE from the image's setup header, and the boot CPU enters startup_64 (load address
+ 0x200) in long mode with %rsi pointing at the zero page.
"""

from __future__ import annotations

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

# setup header offsets (in the image file and, identically, in boot_params)
OFF_SETUP_SECTS = 0x1F1
OFF_SYSSIZE = 0x1F4
OFF_JUMP = 0x200
OFF_MAGIC = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
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


def is_bzimage(image: bytes) -> bool:
    return image[OFF_MAGIC : OFF_MAGIC + 4] == HDRS_MAGIC


def load_bzimage(
    mem: GuestMemory,
    image: bytes,
    *,
    cmdline: str = "",
    initrd: bytes | None = None,
    rsdp_addr: int = 0,
    name: str = "kernel",
) -> BootInfo:
    what = name
    if len(image) < SETUP_HEADER_MIN_END:
        raise KernelFormatError(f"{what}: too short ({len(image)} bytes) to hold a Linux setup header")
    if not is_bzimage(image):
        raise KernelFormatError(f"{what}: no 'HdrS' signature at offset 0x202: not a bzImage")
    version = u16(image, OFF_VERSION, what)
    if version < MIN_VERSION:
        raise KernelFormatError(
            f"{what}: Linux boot protocol {version >> 8}.{version & 0xFF:02d} is too old: corral "
            f"needs 2.12 or later (Linux 3.8+) for the 64-bit entry point"
        )
    setup_sects = u8(image, OFF_SETUP_SECTS, what) or 4
    setup_size = (setup_sects + 1) * 512
    header_end = OFF_MAGIC + u8(image, OFF_JUMP + 1, what)
    if header_end < SETUP_HEADER_MIN_END:
        raise KernelFormatError(
            f"{what}: the setup header ends at {header_end:#x}, before the fields boot protocol "
            f"2.12 defines: the image is damaged"
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
    xloadflags = u16(image, OFF_XLOADFLAGS, what)
    if not xloadflags & XLF_KERNEL_64:
        raise KernelFormatError(
            f"{what}: the kernel has no 64-bit entry point (XLF_KERNEL_64 clear): corral boots "
            f"x86-64 kernels only"
        )
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

    cpu = gdt.long_mode_state(mem, load + 0x200, {"rsi": layout.ZERO_PAGE})
    return BootInfo("linux64", cpu, (load, kernel_end), initrd_range)


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
