"""Kernel loaders: bzImage (Linux 64-bit protocol), PVH ELF, Multiboot, detection, file errors.

Every image here is synthetic, built with struct from the format specifications.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.hostile import fifo

from corral.arch.x86 import layout
from corral.boot import bzimage, gdt, load_kernel, load_kernel_file
from corral.boot.elf import XEN_HVM_START_MAGIC
from corral.errors import ConfigError, CorralError, KernelFormatError
from corral.memory import GuestMemory

MiB = layout.MiB
GiB = layout.GiB
MEM = 64 * MiB


# --- image builders --------------------------------------------------------------------------
def make_bzimage(
    *,
    payload: bytes = b"\xf4" * 0x3000,
    version: int = 0x020F,
    setup_sects: int = 4,
    header_end: int = 0x26C,
    loadflags: int = 0x01,
    xloadflags: int = 0x01 | 0x02,
    pref: int = 16 * MiB,
    init_size: int = 0x10000,
    relocatable: int = 1,
    kernel_alignment: int = 2 * MiB,
    cmdline_size: int = 2048,
    initrd_addr_max: int = 0x7FFFFFFF,
) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 15) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200] = 0xEB
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    setup[0x26B] = 0x5A  # last header byte (kernel_info_offset), to check the copy length
    return bytes(setup) + payload


def xen_note(entry: int, desc_size: int = 8) -> bytes:
    return struct.pack("<III", 4, desc_size, 18) + b"Xen\0" + entry.to_bytes(desc_size, "little")


def mb_header(flags: int = 0, fields: tuple[int, ...] | None = None) -> bytes:
    checksum = (-(0x1BADB002 + flags)) & 0xFFFFFFFF
    out = struct.pack("<III", 0x1BADB002, flags, checksum)
    if fields is not None:
        out += struct.pack("<5I", *fields)
    return out


def make_elf(
    *,
    cls: int = 64,
    segments: list[tuple[int, bytes, int]] = ((0x100000, b"\x90" * 0x100, 0x2000),),
    entry: int = 0x100000,
    pvh_entry: int | None = 0x100010,
    note_in: str = "phdr",
    desc_size: int = 8,
    mb: bytes | None = None,
) -> bytes:
    """ELF with PT_LOAD `segments` (paddr, file bytes, memsz), an optional Xen PVH note (in a
    PT_NOTE segment or only in an SHT_NOTE section) and an optional Multiboot header."""
    is64 = cls == 64
    ehsize, phsize, shsize = (64, 56, 64) if is64 else (52, 32, 40)
    note = xen_note(pvh_entry, desc_size) if pvh_entry is not None else b""
    nph = len(segments) + (1 if note and note_in == "phdr" else 0)
    body = bytearray(ehsize + nph * phsize)
    note_off = len(body)
    body += note
    body += bytes(-len(body) % 4)
    if mb is not None:
        body += mb
    phdrs = []
    for paddr, data, memsz in segments:
        body += bytes(-len(body) % 0x1000)
        phdrs.append((1, len(body), paddr, len(data), memsz))
        body += data
    if note and note_in == "phdr":
        phdrs.append((4, note_off, 0, len(note), len(note)))
    shoff = shnum = 0
    if note and note_in == "shdr":
        body += bytes(-len(body) % 8)
        shoff, shnum = len(body), 2
        body += bytes(shsize)  # null section
        if is64:
            body += struct.pack("<IIQQQQIIQQ", 0, 7, 0, 0, note_off, len(note), 0, 0, 4, 0)
        else:
            body += struct.pack("<IIIIIIIIII", 0, 7, 0, 0, note_off, len(note), 0, 0, 4, 0)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + bytes(9)
    machine = 62 if is64 else 3
    if is64:
        ehdr = ident + struct.pack(
            "<HHIQQQIHHHHHH",
            2,
            machine,
            1,
            entry,
            ehsize,
            shoff,
            0,
            ehsize,
            phsize,
            nph,
            shsize,
            shnum,
            0,
        )
    else:
        ehdr = ident + struct.pack(
            "<HHIIIIIHHHHHH",
            2,
            machine,
            1,
            entry,
            ehsize,
            shoff,
            0,
            ehsize,
            phsize,
            nph,
            shsize,
            shnum,
            0,
        )
    body[:ehsize] = ehdr
    for i, (ptype, off, paddr, filesz, memsz) in enumerate(phdrs):
        pos = ehsize + i * phsize
        if is64:
            struct.pack_into("<IIQQQQQQ", body, pos, ptype, 5, off, paddr, paddr, filesz, memsz, 4)
        else:
            struct.pack_into("<IIIIIIII", body, pos, ptype, off, paddr, paddr, filesz, memsz, 5, 4)
    return bytes(body)


MB_LOAD = 0x200000


def make_multiboot_raw(
    *,
    flags: int = 1 << 16,
    code: bytes = b"\xf4" * 0x800,
    bss: int = 0x1000,
    entry: int | None = None,
    header_off: int = 0x40,
    load_end: int | None = None,
) -> bytes:
    """A flat image loaded at MB_LOAD via the header's address fields (file offset 0 = MB_LOAD)."""
    image = bytearray(header_off) + bytearray(32) + code
    end = MB_LOAD + len(image)
    fields = (
        MB_LOAD + header_off,
        MB_LOAD,
        end if load_end is None else load_end,
        end + bss if bss else 0,
        MB_LOAD + header_off + 32 if entry is None else entry,
    )
    image[header_off : header_off + 32] = mb_header(flags, fields)
    return bytes(image)


@pytest.fixture
def mem():
    with GuestMemory(MEM) as m:
        yield m


def e820_raw(mem_size: int) -> list[tuple[int, int, int]]:
    return layout.e820_map(mem_size)


# --- bzImage -------------------------------------------------------------------------------
def test_bzimage_basic(mem):
    payload = bytes(range(256)) * 48
    image = make_bzimage(payload=payload)
    info = load_kernel(mem, image, cmdline="console=ttyS0 root=/dev/vda", rsdp_addr=0xE0000)
    assert info.protocol == "linux64"
    assert info.kernel_range == (16 * MiB, 16 * MiB + 0x10000)
    assert info.initrd_range is None
    assert mem.read(16 * MiB, len(payload)) == payload

    cpu = info.cpu
    assert cpu.rip == 16 * MiB + 0x200
    assert cpu.gprs == {"rsi": layout.ZERO_PAGE}
    assert cpu.cr0 & 0x80000001 == 0x80000001 and cpu.cr4 & 0x20 and cpu.efer == 0x500
    assert cpu.cr3 == layout.PML4
    assert (cpu.cs.selector, cpu.cs.l, cpu.ds.selector) == (0x10, 1, 0x18)
    assert cpu.rflags & (1 << 9) == 0

    zp = layout.ZERO_PAGE
    assert mem.read(zp + 0x202, 4) == b"HdrS"
    assert mem.read(zp + 0x1F1, 1) == b"\x04"
    assert mem.read(zp + 0x26B, 1) == b"\x5a"  # copied through 0x202 + byte[0x201]
    assert mem.read(zp + 0x210, 1) == b"\xff"  # type_of_loader
    assert mem.read(zp + 0x211, 1)[0] == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert int.from_bytes(mem.read(zp + 0x224, 2), "little") == 0xFE00 - 0x200
    assert mem.read_u32(zp + 0x228) == layout.CMDLINE
    assert mem.read_u32(zp + 0xC8) == 0
    assert mem.read(layout.CMDLINE, 28) == b"console=ttyS0 root=/dev/vda\0"
    assert mem.read_u32(zp + 0x218) == 0 and mem.read_u32(zp + 0x21C) == 0
    assert mem.read_u64(zp + 0x070) == 0xE0000
    entries = e820_raw(MEM)
    assert mem.read(zp + 0x1E8, 1)[0] == len(entries) == 4  # low RAM, BIOS area, RAM, ECAM
    for i, (addr, size, typ) in enumerate(entries):
        off = zp + 0x2D0 + 20 * i
        assert struct.unpack("<QQI", mem.read(off, 20)) == (addr, size, typ)
    # the page tables the long-mode state relies on are in place
    assert mem.read_u64(layout.PML4) == layout.PDPT | 3


# --- bzImage, the 32-bit boot protocol (i386/686 kernels) ---------------------------------------
@pytest.mark.parametrize(
    ("version", "xloadflags", "prefer", "protocol"),
    [
        (0x020F, 0x01 | 0x02, None, "linux64"),
        (0x020F, 0x01 | 0x02, "linux64", "linux64"),
        (0x020F, 0x01 | 0x02, "linux32", "linux32"),  # an x86-64 kernel's startup_32
        (0x020F, 0x00, None, "linux32"),  # a 686 kernel: no XLF_KERNEL_64
        (0x020F, 0x02, None, "linux32"),  # XLF_CAN_BE_LOADED_ABOVE_4G alone is not the 64-bit entry
        (0x020B, 0x01, None, "linux32"),  # before 2.12 xloadflags is not a field: no 64-bit entry
        (0x020A, 0x00, None, "linux32"),  # 2.10 is enough for the 32-bit entry
    ],
)
def test_bzimage_entry_protocol_from_the_header(version, xloadflags, prefer, protocol):
    image = make_bzimage(version=version, xloadflags=xloadflags)
    assert bzimage.entry_protocol(image, prefer) == protocol


def _with_payload(image: bytes, payload: bytes, at: int = 0x40) -> bytes:
    """`image` with `payload` at `at` in its protected-mode part and the header pointing at it."""
    out = bytearray(image)
    setup = (out[0x1F1] + 1) * 512
    out[setup + at : setup + at + len(payload)] = payload
    struct.pack_into("<II", out, 0x248, at, len(payload))
    return bytes(out)


ELF32_HEAD = b"\x7fELF\x01\x01\x01" + bytes(57)
ELF64_HEAD = b"\x7fELF\x02\x01\x01" + bytes(57)


@pytest.mark.parametrize(
    "compress",
    [
        lambda d: gzip.compress(d),
        lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
        lambda d: bz2.compress(d),
        lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    ],
    ids=["gzip", "xz", "bzip2", "lzma"],
)
def test_bzimage_payload_elf_class(compress):
    base = make_bzimage(payload=bytes(0x3000))
    assert bzimage.payload_elf_class(_with_payload(base, compress(ELF32_HEAD))) == 32
    assert bzimage.payload_elf_class(_with_payload(base, compress(ELF64_HEAD))) == 64
    assert bzimage.payload_elf_class(_with_payload(base, compress(b"not an ELF" * 8))) is None
    assert bzimage.payload_elf_class(_with_payload(base, compress(ELF32_HEAD)[:4])) is None  # damaged
    assert bzimage.payload_elf_class(_with_payload(base, b"\x02\x21\x4c\x18" + bytes(60))) is None  # lz4
    # an lzma header that asks for a 4 GiB dictionary is not honoured
    assert bzimage.payload_elf_class(_with_payload(base, b"\x5d\x00\x00\x00\xff" + bytes(59))) is None
    old = bytearray(_with_payload(base, compress(ELF32_HEAD)))
    struct.pack_into("<H", old, 0x206, 0x0207)  # no payload fields before 2.08
    assert bzimage.payload_elf_class(bytes(old)) is None


def test_bzimage_64bit_header_over_a_32bit_kernel_is_refused(mem):
    image = _with_payload(make_bzimage(payload=bytes(0x3000)), gzip.compress(ELF32_HEAD))
    with pytest.raises(KernelFormatError, match="32-bit ELF: the image is damaged"):
        load_kernel(mem, image)
    # the 32-bit entry is right for it; and a pre-3.8 x86-64 kernel (no XLF_KERNEL_64) takes it too
    assert load_kernel(mem, image, prefer="linux32").protocol == "linux32"
    old64 = _with_payload(make_bzimage(payload=bytes(0x3000), xloadflags=0), gzip.compress(ELF64_HEAD))
    assert load_kernel(mem, old64).protocol == "linux32"


def test_bzimage_without_64bit_entry_cannot_be_forced_to_it(mem):
    with pytest.raises(KernelFormatError, match=r"no 64-bit entry point.*linux32"):
        load_kernel(mem, make_bzimage(xloadflags=0), prefer="linux64")


def test_bzimage_32bit_protocol_cpu_state_and_zero_page(mem):
    payload = bytes(range(256)) * 48
    image = make_bzimage(payload=payload, xloadflags=0, pref=16 * MiB)
    info = load_kernel(mem, image, cmdline="console=ttyS0", initrd=b"r" * 5000, rsdp_addr=0xE0000)
    assert info.protocol == "linux32"
    assert mem.read(16 * MiB, len(payload)) == payload
    cpu = info.cpu
    # boot.rst, 32-bit boot protocol: enter at the 32-bit entry (the load address) in protected
    # mode, paging off, flat 4 GiB __BOOT_CS/__BOOT_DS, interrupts off, %esi = boot_params and
    # %ebp/%edi/%ebx zero
    assert cpu.rip == 16 * MiB
    assert cpu.gprs == {"rsi": layout.ZERO_PAGE}
    assert cpu.cr0 & 1 == 1 and cpu.cr0 & 0x80000000 == 0 and cpu.cr4 == 0 and cpu.efer == 0
    assert cpu.rflags & (1 << 9) == 0
    for seg, selector, typ in ((cpu.cs, 0x10, 0xB), (cpu.ds, 0x18, 0x3)):
        assert (seg.selector, seg.base, seg.limit, seg.type) == (selector, 0, 0xFFFFFFFF, typ)
        assert (seg.db, seg.l, seg.g, seg.s, seg.dpl, seg.present) == (1, 0, 1, 1, 0, 1)
    # the descriptors in the GDT are the ones the segment caches say
    for selector, seg in ((0x10, cpu.cs), (0x18, cpu.ds)):
        desc = mem.read_u64(cpu.gdt_base + selector)
        assert gdt.segment_from_descriptor(selector, desc) == seg
    zp = layout.ZERO_PAGE
    assert mem.read_u32(zp + 0x214) == 16 * MiB  # code32_start: where the kernel went
    assert mem.read(zp + 0x210, 1) == b"\xff" and mem.read(zp + 0x211, 1)[0] == 0x81
    assert mem.read(layout.CMDLINE, 14) == b"console=ttyS0\0"
    start, end = info.initrd_range
    assert mem.read_u32(zp + 0x218) == start and mem.read_u32(zp + 0x21C) == 5000 == end - start
    assert end <= 0x80000000 and start >= info.kernel_range[1]
    assert mem.read(zp + 0x1E8, 1)[0] == len(e820_raw(MEM))
    assert mem.read_u64(zp + 0x070) == 0xE0000


def test_bzimage_32bit_relocated_kernel_enters_where_it_was_loaded(mem):
    # the preferred address does not fit 64 MiB: 1 MiB rounded up to kernel_alignment
    info = load_kernel(mem, make_bzimage(xloadflags=0, pref=MEM, kernel_alignment=4 * MiB))
    assert info.protocol == "linux32" and info.cpu.rip == 4 * MiB == info.kernel_range[0]
    assert mem.read_u32(layout.ZERO_PAGE + 0x214) == 4 * MiB


def test_bzimage_32bit_initrd_below_initrd_addr_max():
    with GuestMemory(256 * MiB) as mem:
        info = load_kernel(mem, make_bzimage(xloadflags=0, initrd_addr_max=0x37FFFFF), initrd=b"x" * 0x3000)
    assert info.initrd_range == (0x3800000 - 0x3000, 0x3800000)  # as high as initrd_addr_max allows


def test_bzimage_old_protocol_has_no_rsdp_field(mem):
    load_kernel(mem, make_bzimage(version=0x020C), rsdp_addr=0xE0000)
    assert mem.read_u64(layout.ZERO_PAGE + 0x070) == 0


def test_bzimage_setup_sects_zero_means_four(mem):
    image = bytearray(make_bzimage(setup_sects=4, payload=b"\xab" * 0x1000))
    image[0x1F1] = 0
    info = load_kernel(mem, bytes(image))
    assert mem.read(info.kernel_range[0], 0x1000) == b"\xab" * 0x1000


def test_bzimage_pref_address_not_fitting_falls_back_to_aligned_1mib(mem):
    info = load_kernel(mem, make_bzimage(pref=MEM - 0x8000, kernel_alignment=2 * MiB))
    assert info.kernel_range[0] == 2 * MiB
    assert info.cpu.rip == 2 * MiB + 0x200


def test_bzimage_pref_below_1mib_uses_1mib(mem):
    info = load_kernel(mem, make_bzimage(pref=0x10000, kernel_alignment=0x1000))
    assert info.kernel_range[0] == 1 * MiB


def test_bzimage_non_relocatable_too_big_for_ram(mem):
    with pytest.raises(ConfigError, match="give the guest at least"):
        load_kernel(mem, make_bzimage(pref=60 * MiB, init_size=16 * MiB, relocatable=0))


def test_bzimage_init_size_bigger_than_ram(mem):
    with pytest.raises(ConfigError, match="guest memory"):
        load_kernel(mem, make_bzimage(init_size=100 * MiB))


def test_bzimage_initrd_placed_high_and_aligned(mem):
    initrd = os.urandom(0x5001)
    info = load_kernel(mem, make_bzimage(), initrd=initrd)
    start, end = info.initrd_range
    assert start % 0x1000 == 0 and end - start == len(initrd)
    assert MEM - 0x7000 <= start and end <= MEM
    assert mem.read(start, len(initrd)) == initrd
    zp = layout.ZERO_PAGE
    assert mem.read_u32(zp + 0x218) == start and mem.read_u32(zp + 0x21C) == len(initrd)
    assert mem.read_u32(zp + 0xC0) == 0 and mem.read_u32(zp + 0xC4) == 0


def test_bzimage_initrd_respects_initrd_addr_max(mem):
    info = load_kernel(mem, make_bzimage(initrd_addr_max=32 * MiB - 1), initrd=b"x" * 0x3000)
    start, end = info.initrd_range
    assert end <= 32 * MiB and start == 32 * MiB - 0x3000


def test_bzimage_initrd_too_big(mem):
    with pytest.raises(ConfigError, match="initrd .* does not fit"):
        load_kernel(mem, make_bzimage(), initrd=bytes(60 * MiB))


def test_bzimage_initrd_empty(mem):
    with pytest.raises(ConfigError, match="empty"):
        load_kernel(mem, make_bzimage(), initrd=b"")


def test_bzimage_big_memory_e820_and_initrd_below_hole():
    size = 5 * GiB
    with GuestMemory(size) as big:
        info = load_kernel(big, make_bzimage(initrd_addr_max=0xFFFFFFFF), initrd=b"i" * 0x2000)
        zp = layout.ZERO_PAGE
        assert big.read(zp + 0x1E8, 1)[0] == 5  # low RAM, BIOS area, RAM, ECAM, high RAM
        assert struct.unpack("<QQI", big.read(zp + 0x2D0 + 3 * 20, 20)) == (
            layout.PCI_ECAM_BASE,
            layout.PCI_ECAM_SIZE,
            2,
        )
        last = struct.unpack("<QQI", big.read(zp + 0x2D0 + 4 * 20, 20))
        assert last == (4 * GiB, 2 * GiB, 1)
        start, end = info.initrd_range
        assert end <= layout.MMIO_HOLE_START and start == layout.MMIO_HOLE_START - 0x2000
        assert big.read_u32(zp + 0xC0) == 0


def test_bzimage_cmdline_limits(mem):
    with pytest.raises(ConfigError, match="at most 16"):
        load_kernel(mem, make_bzimage(cmdline_size=16), cmdline="x" * 17)
    load_kernel(mem, make_bzimage(cmdline_size=16), cmdline="x" * 16)
    with pytest.raises(ConfigError, match="at most"):
        load_kernel(mem, make_bzimage(cmdline_size=0x100000), cmdline="x" * layout.CMDLINE_MAX)
    with pytest.raises(ConfigError, match="NUL"):
        load_kernel(mem, make_bzimage(), cmdline="a\0b")


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (make_bzimage()[:0x210], "too short"),
        (make_bzimage(version=0x0206), "too old"),
        (make_bzimage(version=0x0209, xloadflags=0), "needs 2.10 or later"),
        (make_bzimage(loadflags=0), "zImage"),
        (make_bzimage(header_end=0x240), "setup header ends"),
        (make_bzimage(setup_sects=200)[:0x1000], "truncated"),
        (make_bzimage(payload=b"\x90" * 0x10000)[:0x1000], "truncated"),
        (make_bzimage(pref=MEM, kernel_alignment=3), "kernel_alignment"),
        (make_bzimage(pref=0x1000, relocatable=0), "not relocatable"),
    ],
)
def test_bzimage_bad_headers(mem, image, message):
    with pytest.raises(KernelFormatError, match=message):
        load_kernel(mem, image)


# --- PVH -----------------------------------------------------------------------------------
def test_pvh_elf64(mem):
    mem.write(0x100000, b"\xcc" * 0x3000)  # junk that the bss must overwrite
    code = bytes(range(256))
    image = make_elf(segments=[(0x100000, code, 0x2000), (0x300000, b"\x01" * 16, 16)], pvh_entry=0x100040)
    info = load_kernel(mem, image, cmdline="console=hvc0", initrd=b"R" * 0x1800, rsdp_addr=0xE0000)
    assert info.protocol == "pvh"
    assert info.kernel_range == (0x100000, 0x300010)
    assert mem.read(0x100000, 256) == code
    assert mem.read(0x100100, 0x2000 - 0x100) == bytes(0x2000 - 0x100)
    assert mem.read(0x102000, 16) == b"\xcc" * 16  # outside memsz: untouched
    assert mem.read(0x300000, 16) == b"\x01" * 16

    cpu = info.cpu
    assert cpu.rip == 0x100040
    assert cpu.gprs == {"rbx": layout.PVH_START_INFO}
    assert cpu.cr0 == 0x11 and cpu.cr4 == 0 and cpu.efer == 0 and cpu.cr3 == 0
    assert (cpu.cs.l, cpu.cs.db, cpu.cs.base, cpu.cs.limit) == (0, 1, 0, 0xFFFFFFFF)
    assert (cpu.ds.base, cpu.ds.limit, cpu.tr.type) == (0, 0xFFFFFFFF, 0xB)

    si = layout.PVH_START_INFO
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, nmap, res = struct.unpack(
        "<IIIIQQQQII", mem.read(si, 56)
    )
    assert (magic, version, flags, nr_modules) == (XEN_HVM_START_MAGIC, 1, 0, 1)
    assert (cmdline, rsdp, res) == (layout.CMDLINE, 0xE0000, 0)
    assert mem.read(layout.CMDLINE, 13) == b"console=hvc0\0"
    start, end = info.initrd_range
    assert struct.unpack("<QQQQ", mem.read(modlist, 32)) == (start, end - start, 0, 0)
    assert mem.read(start, 0x1800) == b"R" * 0x1800
    entries = e820_raw(MEM)
    assert nmap == len(entries)
    for i, (addr, size, typ) in enumerate(entries):
        assert struct.unpack("<QQII", mem.read(memmap + 24 * i, 24)) == (addr, size, typ, 0)


def test_pvh_elf32_note_in_section_only(mem):
    image = make_elf(cls=32, pvh_entry=0x100020, desc_size=4, note_in="shdr")
    info = load_kernel(mem, image)
    assert info.protocol == "pvh" and info.cpu.rip == 0x100020
    si = layout.PVH_START_INFO
    assert mem.read_u32(si + 12) == 0 and mem.read_u64(si + 16) == 0  # no modules


@pytest.mark.parametrize(
    ("segments", "error", "message"),
    [
        ([(0x8000000, b"x", 0x1000)], ConfigError, "give the guest at least"),
        ([(0x1000, b"x", 0x1000)], KernelFormatError, "below 1 MiB"),
        ([(0xF0000, b"x", 0x20000)], KernelFormatError, "below 1 MiB"),
        ([(0xC0000000, b"x", 0x1000)], KernelFormatError, "MMIO hole"),
        ([(1 << 40, b"x", 0x1000)], KernelFormatError, "MMIO hole"),
    ],
)
def test_pvh_segment_outside_ram(mem, segments, error, message):
    image = make_elf(segments=segments, pvh_entry=segments[0][0])
    with pytest.raises(error, match=message):
        load_kernel(mem, image)


def test_pvh_segment_file_offset_beyond_eof(mem):
    image = make_elf()
    # the first program header: p_offset at +8 (ELF64)
    bad = bytearray(image)
    struct.pack_into("<Q", bad, 64 + 8, len(image) + 0x1000)
    with pytest.raises(KernelFormatError, match="runs past the end"):
        load_kernel(mem, bytes(bad))


def test_pvh_filesz_larger_than_memsz(mem):
    with pytest.raises(KernelFormatError, match="more file bytes"):
        load_kernel(mem, make_elf(segments=[(0x100000, b"x" * 0x100, 0x10)]))


def test_pvh_entry_outside_segments(mem):
    with pytest.raises(KernelFormatError, match="entry point"):
        load_kernel(mem, make_elf(pvh_entry=0x500000))


def test_pvh_truncated_phdr_table(mem):
    image = make_elf()
    with pytest.raises(KernelFormatError, match="truncated"):
        load_kernel(mem, image[:100])


def test_elf_without_pvh_or_multiboot(mem):
    with pytest.raises(KernelFormatError, match="CONFIG_PVH"):
        load_kernel(mem, make_elf(pvh_entry=None))


def test_elf_big_endian_and_wrong_machine(mem):
    image = bytearray(make_elf())
    image[5] = 2
    with pytest.raises(KernelFormatError, match="big-endian"):
        load_kernel(mem, bytes(image))
    image = bytearray(make_elf())
    struct.pack_into("<H", image, 18, 40)  # EM_ARM
    with pytest.raises(KernelFormatError, match="not x86"):
        load_kernel(mem, bytes(image))


# --- Multiboot -----------------------------------------------------------------------------
def check_multiboot_info(mem, info, cmdline: bytes, mem_size: int = MEM) -> int:
    mbi = layout.MULTIBOOT_INFO
    flags = mem.read_u32(mbi)
    assert flags & 0x245 == 0x245  # mem, cmdline, mmap, loader name
    assert mem.read_u32(mbi + 4) == 639
    assert mem.read_u32(mbi + 8) == (min(mem_size, layout.MMIO_HOLE_START) - MiB) // 1024
    assert mem.read_u32(mbi + 16) == layout.CMDLINE
    assert mem.read(layout.CMDLINE, len(cmdline) + 1) == cmdline + b"\0"
    assert mem.read_cstr(mem.read_u32(mbi + 64), 64) == b"corral"
    mmap_len, mmap_addr = mem.read_u32(mbi + 44), mem.read_u32(mbi + 48)
    entries = e820_raw(mem_size)
    assert mmap_addr == mbi + 0x100 and mmap_len == 24 * len(entries)
    for i, (addr, size, typ) in enumerate(entries):
        assert struct.unpack("<IQQI", mem.read(mmap_addr + 24 * i, 24)) == (20, addr, size, typ)
    cpu = info.cpu
    assert cpu.gprs == {"rax": 0x2BADB002, "rbx": mbi}
    assert cpu.cr0 == 0x11 and cpu.efer == 0 and cpu.cs.db == 1 and cpu.cs.l == 0
    return flags


def test_multiboot_raw_address_fields(mem):
    mem.write(MB_LOAD, b"\xcc" * 0x4000)
    image = make_multiboot_raw(bss=0x1000)
    info = load_kernel(mem, image, cmdline="hello world", initrd=b"M" * 0x1234)
    assert info.protocol == "multiboot"
    end = MB_LOAD + len(image)
    assert info.kernel_range == (MB_LOAD, end + 0x1000)
    assert info.cpu.rip == MB_LOAD + 0x40 + 32
    assert mem.read(MB_LOAD, len(image)) == image
    assert mem.read(end, 0x1000) == bytes(0x1000)
    flags = check_multiboot_info(mem, info, b"hello world")
    assert flags & 0x8
    mbi = layout.MULTIBOOT_INFO
    assert mem.read_u32(mbi + 20) == 1
    mod = struct.unpack("<IIII", mem.read(mem.read_u32(mbi + 24), 16))
    start, stop = info.initrd_range
    assert mod[:2] == (start, stop) and start % 0x1000 == 0 and mod[3] == 0
    assert mem.read_cstr(mod[2], 64) == b"initrd"
    assert mem.read(start, 0x1234) == b"M" * 0x1234


def test_multiboot_raw_load_end_zero_means_whole_file(mem):
    image = make_multiboot_raw(load_end=0, bss=0)
    info = load_kernel(mem, image)
    assert info.kernel_range == (MB_LOAD, MB_LOAD + len(image))
    flags = check_multiboot_info(mem, info, b"")
    assert not flags & 0x8


def test_multiboot_elf32(mem):
    image = make_elf(cls=32, pvh_entry=None, entry=0x100004, mb=mb_header(0x3))
    info = load_kernel(mem, image, cmdline="x")
    assert info.protocol == "multiboot" and info.cpu.rip == 0x100004
    assert info.kernel_range == (0x100000, 0x102000)
    check_multiboot_info(mem, info, b"x")


def test_elf_with_both_prefers_pvh_unless_asked(mem):
    image = make_elf(cls=32, pvh_entry=0x100010, desc_size=4, entry=0x100004, mb=mb_header(0))
    assert load_kernel(mem, image).protocol == "pvh"
    info = load_kernel(mem, image, prefer="multiboot")
    assert info.protocol == "multiboot" and info.cpu.rip == 0x100004
    assert load_kernel(mem, make_elf(), prefer="multiboot").protocol == "pvh"  # soft preference
    with pytest.raises(ConfigError, match="unknown boot protocol"):
        load_kernel(mem, image, prefer="uefi")


def test_multiboot_optional_flags_ignored(mem):
    info = load_kernel(mem, make_multiboot_raw(flags=(1 << 16) | (1 << 20) | 0x3))
    assert info.protocol == "multiboot"


@pytest.mark.parametrize(
    ("flags", "message"),
    [((1 << 16) | 0x4, "video mode"), ((1 << 16) | 0x100, "does not know")],
)
def test_multiboot_required_flags_refused(mem, flags, message):
    with pytest.raises(KernelFormatError, match=message):
        load_kernel(mem, make_multiboot_raw(flags=flags))


def test_multiboot_header_problems(mem):
    bad_sum = bytearray(make_multiboot_raw())
    bad_sum[0x40 + 8] ^= 1
    with pytest.raises(KernelFormatError, match="not a bzImage"):
        load_kernel(mem, bytes(bad_sum))
    # a header past the first 8 KiB is not a header
    far = make_multiboot_raw(header_off=8192)
    with pytest.raises(KernelFormatError, match="not a bzImage"):
        load_kernel(mem, far)
    # unaligned header
    with pytest.raises(KernelFormatError, match="not a bzImage"):
        load_kernel(mem, b"\0\0" + mb_header(1 << 16, (0, 0, 0, 0, 0)))
    with pytest.raises(KernelFormatError, match="not ELF"):
        load_kernel(mem, bytes(8) + mb_header(0) + bytes(100))
    with pytest.raises(KernelFormatError, match="truncated"):
        load_kernel(mem, make_multiboot_raw(load_end=MB_LOAD + 0x10000))
    with pytest.raises(KernelFormatError, match="run past the end"):
        load_kernel(mem, bytes(8) + mb_header(1 << 16) + bytes(4))
    with pytest.raises(KernelFormatError, match="entry_addr"):
        load_kernel(mem, make_multiboot_raw(entry=MB_LOAD - 4))
    with pytest.raises(ConfigError, match="give the guest"):
        load_kernel(mem, make_multiboot_raw(bss=100 * MiB))


# --- detection and files ------------------------------------------------------------------
def test_detection_errors(mem):
    with pytest.raises(KernelFormatError, match="empty"):
        load_kernel(mem, b"")
    with pytest.raises(KernelFormatError, match="not a bzImage, an ELF with a PVH entry note"):
        load_kernel(mem, b"MZ" + bytes(4000), name="kernel file '/k'")
    wrong_magic = bytearray(make_bzimage())
    wrong_magic[0x202:0x206] = b"HdrX"
    with pytest.raises(KernelFormatError, match="not a bzImage"):
        load_kernel(mem, bytes(wrong_magic))


def test_load_kernel_file(tmp_path, mem):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"I" * 5000)
    info = load_kernel_file(mem, kernel, cmdline="quiet", initrd=str(initrd))
    assert info.protocol == "linux64" and info.initrd_range[1] - info.initrd_range[0] == 5000


def test_load_kernel_file_errors(tmp_path, mem):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as exc:
        load_kernel_file(mem, missing)
    msg = str(exc.value)
    assert msg.startswith(f"kernel: kernel file '{missing}' does not exist: give a path")
    assert exc.value.field == "kernel"
    assert "\n" not in msg

    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="is empty"):
        load_kernel_file(mem, empty)
    with pytest.raises(ConfigError, match="is a directory"):
        load_kernel_file(mem, tmp_path)

    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(MEM + 1)
    with pytest.raises(ConfigError, match="more than the guest"):
        load_kernel_file(mem, huge)

    good = tmp_path / "bzImage"
    good.write_bytes(make_bzimage())
    with pytest.raises(
        ConfigError, match="^initrd: initrd file .* does not exist: give a path to an initramfs"
    ):
        load_kernel_file(mem, good, initrd=tmp_path / "missing.img")
    with pytest.raises(ConfigError, match="initrd file .* more than the guest"):
        load_kernel_file(mem, good, initrd=huge)

    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    with pytest.raises(KernelFormatError, match=f"kernel file '{junk}': not a bzImage"):
        load_kernel_file(mem, junk)


def test_kernel_and_initrd_must_be_regular_files(tmp_path, mem):
    """A FIFO would hang the read and a device would be read to the guest's size: both are
    refused by type, with one line, before anything is read."""
    good = tmp_path / "bzImage"
    good.write_bytes(make_bzimage())
    with fifo(tmp_path / "pipe") as pipe:
        with pytest.raises(ConfigError) as exc:
            load_kernel_file(mem, pipe)
        assert str(exc.value) == (
            f"kernel: kernel file '{pipe}' is not a regular file: "
            "give a path to a bzImage, vmlinux or Multiboot ELF"
        )
        with pytest.raises(ConfigError, match="^initrd: initrd file .* is not a regular file: give a path"):
            load_kernel_file(mem, good, initrd=pipe)
    with pytest.raises(ConfigError, match="^kernel: kernel file '/dev/zero' is not a regular file"):
        load_kernel_file(mem, "/dev/zero")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_load_kernel_file_unreadable(tmp_path, mem):
    kernel = tmp_path / "secret"
    kernel.write_bytes(make_bzimage())
    kernel.chmod(0)
    with pytest.raises(ConfigError, match="cannot read kernel file"):
        load_kernel_file(mem, kernel)


# --- fuzzing: garbage never escapes as anything but a CorralError -------------------------
_FUZZ_MEM: list[GuestMemory] = []


def fuzz_mem() -> GuestMemory:
    if not _FUZZ_MEM:
        _FUZZ_MEM.append(GuestMemory(32 * MiB))
    return _FUZZ_MEM[0]


VALID_IMAGES = [
    make_bzimage(payload=b"\x90" * 0x400, init_size=0x1000),
    make_bzimage(payload=b"\x90" * 0x400, init_size=0x1000, xloadflags=0, version=0x020A),
    make_elf(segments=[(0x100000, b"\x90" * 0x40, 0x100)]),
    make_elf(cls=32, desc_size=4, note_in="shdr", segments=[(0x100000, b"\x90" * 0x40, 0x100)]),
    make_elf(
        cls=32,
        pvh_entry=None,
        entry=0x100004,
        mb=mb_header(0x3),
        segments=[(0x100000, b"\x90" * 0x40, 0x100)],
    ),
    make_multiboot_raw(code=b"\xf4" * 0x40, bss=0x100),
]


def _try_load(image: bytes, **kw) -> None:
    try:
        load_kernel(fuzz_mem(), image, **kw)
    except CorralError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data):
    _try_load(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_with_magic(data):
    _try_load(b"\x7fELF" + data)
    _try_load(data[:0x202].ljust(0x202, b"\0") + b"HdrS" + data[0x202:])


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(VALID_IMAGES))),
    st.lists(st.tuples(st.integers(0, 0x2FF), st.integers(0, 255)), min_size=1, max_size=8),
    st.sampled_from([None, 0x10, 0x300, 0x2000, 0x10000]),
    st.booleans(),
    st.booleans(),
)
def test_fuzz_mutated_headers(which, edits, cut, with_initrd, prefer_mb):
    image = bytearray(VALID_IMAGES[which])
    for pos, value in edits:
        if pos < len(image):
            image[pos] = value
    if cut is not None:
        image = image[:cut]
    _try_load(
        bytes(image), initrd=b"i" * 100 if with_initrd else None, prefer="multiboot" if prefer_mb else None
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(VALID_IMAGES))),
    st.lists(
        st.tuples(
            st.integers(0, 0x2FC),
            st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x100000, 0xC0000000, 0x80000000, 0x1000]),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_fuzz_mutated_words(which, edits):
    image = bytearray(VALID_IMAGES[which])
    for pos, value in edits:
        if pos + 4 <= len(image):
            struct.pack_into("<I", image, pos, value)
    _try_load(bytes(image), cmdline="console=ttyS0")


# --- Multiboot: kernels below 1 MiB, argv[0], module strings ------------------------------------
def test_multiboot_low_segments_move_the_info_block_and_command_line(mem):
    # one segment over the info block (0x8000), one over the command line (0x20000)
    segs = [(0x8000, b"\xf4" * 0x10, 0x1000), (0x20000, b"\x90" * 0x10, 0x800)]
    image = make_elf(cls=32, segments=segs, entry=0x8000, pvh_entry=None, mb=mb_header(0x3))
    info = load_kernel(mem, image, cmdline="low", initrd=b"R" * 0x100)
    assert info.kernel_range == (0x8000, 0x20800)
    mbi = info.cpu.gprs["rbx"]
    assert mbi not in range(0x8000 - 0xFFF, 0x9000) and 0x1000 <= mbi < layout.EBDA_START
    assert info.cpu.rsp == mbi + 0xFF0
    cmd = mem.read_u32(mbi + 16)
    assert not 0x20000 - 4 <= cmd < 0x20800 and mem.read_cstr(cmd, 16) == b"low"
    assert mem.read(0x8000, 0x10) == b"\xf4" * 0x10 and mem.read(0x20000, 0x10) == b"\x90" * 0x10
    assert mem.read_cstr(mem.read_u32(mbi + 64), 16) == b"corral"


@pytest.mark.parametrize("start,size", [(0x800, 0x100), (0x9F000, 0x1000), (0xE0000, 0x100)])
def test_multiboot_low_segments_outside_conventional_memory_are_refused(mem, start, size):
    image = make_elf(cls=32, segments=[(start, b"x", size)], entry=start, pvh_entry=None, mb=mb_header(0x3))
    with pytest.raises(KernelFormatError, match="below 1 MiB"):
        load_kernel(mem, image)


def test_pvh_still_refuses_low_segments(mem):
    image = make_elf(segments=[(0x10000, b"x", 0x1000)], pvh_entry=0x10000)
    with pytest.raises(KernelFormatError, match="below 1 MiB"):
        load_kernel(mem, image)


def test_multiboot_argv0_and_module_strings_from_files(mem, tmp_path):
    kernel = tmp_path / "kern.elf"
    kernel.write_bytes(make_elf(cls=32, pvh_entry=None, entry=0x100004, mb=mb_header(0x3)))
    initrd, m1 = tmp_path / "rd", tmp_path / "m1"
    initrd.write_bytes(b"R" * 10)
    m1.write_bytes(b"1" * 0x2000)
    info = load_kernel_file(mem, kernel, cmdline="a b", initrd=initrd, modules=[(m1, "x=1 y")])
    mbi = info.cpu.gprs["rbx"]
    assert mem.read_cstr(mem.read_u32(mbi + 16), 256) == f"{kernel} a b".encode()
    assert mem.read_u32(mbi + 20) == 2
    mods = [struct.unpack("<IIII", mem.read(mem.read_u32(mbi + 24) + 16 * i, 16)) for i in range(2)]
    assert [mem.read_cstr(m[2], 256) for m in mods] == [str(initrd).encode(), f"{m1} x=1 y".encode()]
    assert mem.read(mods[1][0], 0x2000) == b"1" * 0x2000 and mods[1][1] - mods[1][0] == 0x2000
    assert mods[1][1] <= mods[0][0] or mods[0][1] <= mods[1][0]  # no overlap


def test_modules_are_refused_for_other_protocols(mem):
    with pytest.raises(ConfigError, match="only a Multiboot kernel takes modules"):
        load_kernel(mem, make_elf(), modules=[(b"m", "m")])
