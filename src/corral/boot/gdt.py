"""Boot descriptor tables, identity page tables and the CPU states loaders hand to the vCPU.

The boot GDT at layout.BOOT_GDT has four 8-byte entries (32 bytes, ending at BOOT_IDT):

    0x00  null
    0x08  TSS     32-bit busy TSS (type 0xB), base 0, limit 0x67 -- only so TR is valid for KVM
    0x10  code    flat 4 GiB execute/read; 64-bit (L=1) for the Linux 64-bit boot protocol,
                  32-bit (D=1) for PVH and Multiboot
    0x18  data    flat 4 GiB read/write, 32-bit (D/B=1)

0x10/0x18 are the __BOOT_CS/__BOOT_DS the Linux boot protocol requires; PVH and Multiboot leave
the selector values unspecified, so they use the same ones. The IDT at layout.BOOT_IDT is empty
(limit 0): an exception before the kernel installs its own IDT shuts the guest down.

Segment values handed to the vCPU are decoded from the very descriptors written to the GDT, so the
hidden segment caches always match the table. `Segment.limit` is the byte-granular limit (as KVM's
kvm_segment wants it): 0xFFFFFFFF for the flat segments.
"""

from __future__ import annotations

from corral.arch.x86 import layout
from corral.boot.cpu_state import BootCpuState, Segment
from corral.memory import GuestMemory

NULL_SELECTOR = 0x00
TSS_SELECTOR = 0x08
CODE_SELECTOR = 0x10  # __BOOT_CS
DATA_SELECTOR = 0x18  # __BOOT_DS
GDT_ENTRIES = 4
GDT_LIMIT = GDT_ENTRIES * 8 - 1
IDT_LIMIT = 0

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 is always set; IF (bit 9) stays clear

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7  # 2 MiB page in a PD entry
PD_PAGES = 4  # 4 page directories x 512 x 2 MiB = 4 GiB identity mapped


def make_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor: `limit` is the 20-bit raw limit, `flags` = G D/B L AVL."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


def segment_from_descriptor(selector: int, desc: int) -> Segment:
    """The segment-register cache contents a CPU would load from `desc`."""
    base = ((desc >> 16) & 0xFFFFFF) | ((desc >> 56) & 0xFF) << 24
    raw_limit = (desc & 0xFFFF) | ((desc >> 48) & 0xF) << 16
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    g = (flags >> 3) & 1
    return Segment(
        base=base,
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        selector=selector,
        type=access & 0xF,
        present=(access >> 7) & 1,
        dpl=(access >> 5) & 3,
        db=(flags >> 2) & 1,
        s=(access >> 4) & 1,
        l=(flags >> 1) & 1,
        g=g,
    )


# access bytes: P | DPL0 | S | type (accessed bit set, as after a load)
CODE64_DESC = make_descriptor(0, 0xFFFFF, 0x9B, 0b1010)  # G, L
CODE32_DESC = make_descriptor(0, 0xFFFFF, 0x9B, 0b1100)  # G, D
DATA_DESC = make_descriptor(0, 0xFFFFF, 0x93, 0b1100)  # G, B
TSS_DESC = make_descriptor(0, 0x67, 0x8B, 0b0000)  # P, S=0, 32-bit busy TSS


def gdt_entries(long_mode: bool) -> list[int]:
    return [0, TSS_DESC, CODE64_DESC if long_mode else CODE32_DESC, DATA_DESC]


def write_boot_gdt(mem: GuestMemory, *, long_mode: bool) -> tuple[Segment, Segment, Segment]:
    """Write the boot GDT and empty IDT; return the (code, data, tss) segment caches."""
    entries = gdt_entries(long_mode)
    mem.write(layout.BOOT_GDT, b"".join(e.to_bytes(8, "little") for e in entries))
    mem.write(layout.BOOT_IDT, bytes(8))
    return (
        segment_from_descriptor(CODE_SELECTOR, entries[CODE_SELECTOR >> 3]),
        segment_from_descriptor(DATA_SELECTOR, entries[DATA_SELECTOR >> 3]),
        segment_from_descriptor(TSS_SELECTOR, entries[TSS_SELECTOR >> 3]),
    )


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages (PML4 -> PDPT -> 4 PDs); return CR3."""
    pml4 = bytearray(0x1000)
    pml4[0:8] = (layout.PDPT | PTE_PRESENT | PTE_WRITE).to_bytes(8, "little")
    pdpt = bytearray(0x1000)
    for i in range(PD_PAGES):
        pdpt[i * 8 : i * 8 + 8] = (layout.PD + i * 0x1000 | PTE_PRESENT | PTE_WRITE).to_bytes(8, "little")
    pd = b"".join(
        ((i << 21) | PTE_PRESENT | PTE_WRITE | PTE_PS).to_bytes(8, "little") for i in range(512 * PD_PAGES)
    )
    mem.write(layout.PML4, pml4)
    mem.write(layout.PDPT, pdpt)
    mem.write(layout.PD, pd)
    return layout.PML4


def long_mode_state(mem: GuestMemory, rip: int, gprs: dict[str, int]) -> BootCpuState:
    """Write GDT, IDT and page tables; return a 64-bit long-mode CPU state entering at `rip`."""
    return _flat_state(mem, rip, gprs, long_mode=True)


def protected_mode_state(mem: GuestMemory, rip: int, gprs: dict[str, int]) -> BootCpuState:
    """Write GDT and IDT; return a 32-bit protected-mode, paging-off CPU state entering at `rip`."""
    return _flat_state(mem, rip, gprs, long_mode=False)


def _flat_state(mem: GuestMemory, rip: int, gprs: dict[str, int], *, long_mode: bool) -> BootCpuState:
    code, data, tss = write_boot_gdt(mem, long_mode=long_mode)
    if long_mode:
        cr0, cr3, cr4, efer = (
            CR0_PE | CR0_ET | CR0_PG,
            write_identity_page_tables(mem),
            CR4_PAE,
            EFER_LME | EFER_LMA,
        )
    else:
        cr0, cr3, cr4, efer = CR0_PE | CR0_ET, 0, 0, 0
    return BootCpuState(
        rip=rip,
        cr0=cr0,
        cr3=cr3,
        cr4=cr4,
        efer=efer,
        cs=code,
        ds=data,
        tr=tss,
        gdt_base=layout.BOOT_GDT,
        gdt_limit=GDT_LIMIT,
        idt_base=layout.BOOT_IDT,
        idt_limit=IDT_LIMIT,
        rsp=layout.BOOT_STACK,
        rflags=RFLAGS_RESERVED,
        gprs=dict(gprs),
    )
