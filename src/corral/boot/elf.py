"""ELF parsing and loading, and the PVH boot protocol (Xen's direct boot, used by Linux vmlinux).

A kernel with a XEN_ELFNOTE_PHYS32_ENTRY note ("Xen", type 18) is entered at that address in
32-bit protected mode with paging off, %ebx pointing at a struct hvm_start_info
(xen/include/public/arch-x86/hvm/start_info.h) written at layout.PVH_START_INFO.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from corral.arch.x86 import layout
from corral.boot import gdt
from corral.boot._common import (
    BootInfo,
    check_kernel_range,
    low_ram_end,
    place_initrd,
    unpack,
    write_cmdline,
)
from corral.errors import KernelFormatError
from corral.memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
SHT_NOTE = 7
MAX_NOTES_BYTES = 16 * layout.MiB

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1
HVM_START_INFO_SIZE = 56
HVM_MODLIST_OFFSET = 0x40  # modlist and memmap follow start_info in its page
HVM_MEMMAP_OFFSET = 0x80
HVM_MODLIST_ENTRY_SIZE = 32
HVM_MEMMAP_ENTRY_SIZE = 24


class ElfSegment(NamedTuple):
    paddr: int
    offset: int
    filesz: int
    memsz: int


class ElfNote(NamedTuple):
    name: bytes
    type: int
    desc: bytes


class ElfImage(NamedTuple):
    elf_class: int  # 32 or 64
    entry: int
    segments: tuple[ElfSegment, ...]  # PT_LOAD with memsz > 0
    notes: tuple[ElfNote, ...]  # from PT_NOTE segments and SHT_NOTE sections

    def pvh_entry(self) -> int | None:
        for note in self.notes:
            if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(note.desc) >= 8:
                    return int.from_bytes(note.desc[:8], "little")
                if len(note.desc) >= 4:
                    return int.from_bytes(note.desc[:4], "little")
        return None


def is_elf(image: bytes) -> bool:
    return image[:4] == ELF_MAGIC


def parse_elf(image: bytes, what: str) -> ElfImage:
    """Parse an x86 little-endian ELF32/ELF64 executable; every offset is checked."""
    if not is_elf(image):
        raise KernelFormatError(f"{what}: not an ELF file")
    ei_class, ei_data = unpack("<BB", image, 4, what)
    if ei_class not in (ELFCLASS32, ELFCLASS64):
        raise KernelFormatError(f"{what}: unknown ELF class {ei_class}")
    if ei_data != ELFDATA2LSB:
        raise KernelFormatError(f"{what}: a big-endian ELF file: not an x86 kernel")
    is64 = ei_class == ELFCLASS64
    if is64:
        (_, machine, _, entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = unpack(
            "<HHIQQQIHHHHHH", image, 16, what
        )
        ph_fmt, ph_min = "<IIQQQQQQ", 56
        sh_fmt, sh_min = "<IIQQQQIIQQ", 64
    else:
        (_, machine, _, entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _) = unpack(
            "<HHIIIIIHHHHHH", image, 16, what
        )
        ph_fmt, ph_min = "<IIIIIIII", 32
        sh_fmt, sh_min = "<IIIIIIIIII", 40
    if machine not in (EM_386, EM_X86_64):
        raise KernelFormatError(f"{what}: an ELF file for machine {machine}, not x86")

    segments: list[ElfSegment] = []
    notes: list[ElfNote] = []
    note_budget = [MAX_NOTES_BYTES]
    for i, fields in enumerate(
        _header_table(image, phoff, phentsize, phnum, ph_fmt, ph_min, "program", what)
    ):
        if is64:
            p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, p_align = fields
        else:
            p_type, p_offset, _, p_paddr, p_filesz, p_memsz, _, p_align = fields
        if p_type == PT_LOAD:
            if p_filesz > p_memsz:
                raise KernelFormatError(
                    f"{what}: ELF segment {i} has more file bytes ({p_filesz}) than memory bytes ({p_memsz})"
                )
            _check_file_range(image, p_offset, p_filesz, f"ELF segment {i}", what)
            if p_memsz:
                segments.append(ElfSegment(p_paddr, p_offset, p_filesz, p_memsz))
        elif p_type == PT_NOTE:
            _check_file_range(image, p_offset, p_filesz, f"ELF note segment {i}", what)
            notes += _parse_notes(image, p_offset, p_filesz, p_align, note_budget, what)
    for i, fields in enumerate(
        _header_table(image, shoff, shentsize, shnum, sh_fmt, sh_min, "section", what)
    ):
        _, sh_type, _, _, sh_offset, sh_size, _, _, sh_addralign, _ = fields
        if sh_type == SHT_NOTE:
            _check_file_range(image, sh_offset, sh_size, f"ELF note section {i}", what)
            notes += _parse_notes(image, sh_offset, sh_size, sh_addralign, note_budget, what)
    return ElfImage(64 if is64 else 32, entry, tuple(segments), tuple(notes))


def _header_table(
    image: bytes, off: int, entsize: int, num: int, fmt: str, min_entsize: int, kind: str, what: str
) -> list[tuple]:
    """The unpacked entries of the ELF `kind` ("program" or "section") header table, after
    checking that its entries are large enough and that the table fits in the file."""
    if num:
        if entsize < min_entsize:
            raise KernelFormatError(f"{what}: ELF {kind} header size {entsize} is too small")
        if off + entsize * num > len(image):
            raise KernelFormatError(
                f"{what}: the ELF {kind} header table ({num} x {entsize} bytes at {off:#x}) runs "
                f"past the end of the {len(image)}-byte file: the file is truncated or damaged"
            )
    return [unpack(fmt, image, off + i * entsize, what) for i in range(num)]


def _check_file_range(image: bytes, off: int, size: int, part: str, what: str) -> None:
    if off + size > len(image):
        raise KernelFormatError(
            f"{what}: {part} ({size} bytes at file offset {off:#x}) runs past the end of the "
            f"{len(image)}-byte file: the file is truncated or damaged"
        )


def _parse_notes(
    image: bytes, off: int, size: int, align: int, budget: list[int], what: str
) -> list[ElfNote]:
    """Notes in image[off:off+size]; names and descriptors are padded to 4 (or 8) bytes."""
    pad = 8 if align == 8 else 4
    budget[0] -= size
    if budget[0] < 0:
        raise KernelFormatError(f"{what}: the ELF note areas are implausibly large")
    notes = []
    pos, end = off, off + size
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", image, pos)
        name_off = pos + 12
        desc_off = name_off + _pad(namesz, pad)
        next_pos = desc_off + _pad(descsz, pad)
        if desc_off + descsz > end:
            raise KernelFormatError(
                f"{what}: an ELF note at file offset {pos:#x} runs past the end of its note area"
            )
        name = bytes(image[name_off : name_off + namesz]).rstrip(b"\0")
        notes.append(ElfNote(name, ntype, bytes(image[desc_off : desc_off + descsz])))
        pos = next_pos
    return notes


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def load_segments(
    mem: GuestMemory, elf: ElfImage, image: bytes, what: str, *, low_ok: bool = False
) -> tuple[int, int]:
    """Copy every PT_LOAD segment to its physical address; return the [start, end) they span.
    `low_ok`: segments may lie in conventional memory below 1 MiB (see check_kernel_range)."""
    if not elf.segments:
        raise KernelFormatError(f"{what}: the ELF file has no loadable segments")
    for i, seg in enumerate(elf.segments):
        check_kernel_range(mem, seg.paddr, seg.memsz, what, f"ELF segment {i}", low_ok=low_ok)
    for seg in elf.segments:
        mem.write(seg.paddr, memoryview(image)[seg.offset : seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:
            mem.zero(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    start = min(s.paddr for s in elf.segments)
    end = max(s.paddr + s.memsz for s in elf.segments)
    return start, end


def check_entry(elf: ElfImage, entry: int, kind: str, what: str) -> None:
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in elf.segments):
        raise KernelFormatError(f"{what}: the {kind} entry point {entry:#x} is not inside any loaded segment")


def load_pvh(
    mem: GuestMemory,
    image: bytes,
    elf: ElfImage,
    *,
    cmdline: str = "",
    initrd: bytes | None = None,
    rsdp_addr: int = 0,
    name: str = "kernel",
) -> BootInfo:
    what = name
    entry = elf.pvh_entry()
    if entry is None:
        raise KernelFormatError(
            f"{what}: the ELF file has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build Linux "
            f"with CONFIG_PVH=y"
        )
    check_entry(elf, entry, "PVH", what)
    kernel_range = load_segments(mem, elf, image, what)
    cmd_ptr = write_cmdline(mem, cmdline, None, what)

    base = layout.PVH_START_INFO
    page = bytearray(0x1000)
    initrd_range = None
    nr_modules = modlist = 0
    if initrd is not None:
        initrd_range = place_initrd(mem, initrd, kernel_range[1], low_ram_end(mem))
        start, end = initrd_range
        struct.pack_into("<QQQQ", page, HVM_MODLIST_OFFSET, start, end - start, 0, 0)
        nr_modules, modlist = 1, base + HVM_MODLIST_OFFSET
    e820 = layout.e820_map(mem.size)
    if HVM_MEMMAP_OFFSET + len(e820) * HVM_MEMMAP_ENTRY_SIZE > len(page):
        raise KernelFormatError(f"{what}: the memory map does not fit in the start-info page")
    for i, (addr, size, typ) in enumerate(e820):
        struct.pack_into("<QQII", page, HVM_MEMMAP_OFFSET + i * HVM_MEMMAP_ENTRY_SIZE, addr, size, typ, 0)
    struct.pack_into(
        "<IIIIQQQQII",
        page,
        0,
        XEN_HVM_START_MAGIC,
        HVM_START_INFO_VERSION,
        0,
        nr_modules,
        modlist,
        cmd_ptr,
        rsdp_addr,
        base + HVM_MEMMAP_OFFSET,
        len(e820),
        0,
    )
    mem.write(base, page)
    cpu = gdt.protected_mode_state(mem, entry, {"rbx": base})
    return BootInfo("pvh", cpu, kernel_range, initrd_range)
