"""Boot GDT, IDT, identity page tables and the CPU states built on them."""

from __future__ import annotations

import pytest

from corral.arch.x86 import layout
from corral.boot import gdt
from corral.memory import GuestMemory


@pytest.fixture
def mem():
    with GuestMemory(32 * layout.MiB) as m:
        yield m


def _entries(mem: GuestMemory) -> list[int]:
    raw = mem.read(layout.BOOT_GDT, gdt.GDT_ENTRIES * 8)
    return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]


def test_gdt_fits_before_idt():
    assert layout.BOOT_GDT + gdt.GDT_LIMIT + 1 <= layout.BOOT_IDT


def test_long_mode_gdt_and_segments(mem):
    code, data, tss = gdt.write_boot_gdt(mem, long_mode=True)
    entries = _entries(mem)
    assert entries[0] == 0
    assert entries[gdt.CODE_SELECTOR >> 3] == 0x00AF9B000000FFFF
    assert entries[gdt.DATA_SELECTOR >> 3] == 0x00CF93000000FFFF
    assert entries[gdt.TSS_SELECTOR >> 3] == 0x00008B0000000067
    assert (code.selector, code.type, code.l, code.db, code.g, code.s) == (0x10, 0xB, 1, 0, 1, 1)
    assert (code.base, code.limit) == (0, 0xFFFFFFFF)
    assert (data.selector, data.type, data.db, data.l, data.limit) == (0x18, 0x3, 1, 0, 0xFFFFFFFF)
    assert (tss.selector, tss.type, tss.s, tss.present) == (0x08, 0xB, 0, 1)
    assert (tss.base, tss.limit, tss.g) == (0, 0x67, 0)
    # each segment cache is what the CPU would load from the table entry
    for seg in (code, data, tss):
        assert gdt.segment_from_descriptor(seg.selector, entries[seg.selector >> 3]) == seg
    assert mem.read(layout.BOOT_IDT, 8) == bytes(8)


def test_protected_mode_gdt(mem):
    code, data, _ = gdt.write_boot_gdt(mem, long_mode=False)
    assert _entries(mem)[2] == 0x00CF9B000000FFFF
    assert (code.l, code.db, code.type, code.limit) == (0, 1, 0xB, 0xFFFFFFFF)
    assert data.db == 1


def test_identity_page_tables(mem):
    cr3 = gdt.write_identity_page_tables(mem)
    assert cr3 == layout.PML4
    assert mem.read_u64(layout.PML4) == layout.PDPT | 0x3
    assert mem.read_u64(layout.PML4 + 8) == 0
    for i in range(4):
        assert mem.read_u64(layout.PDPT + 8 * i) == (layout.PD + 0x1000 * i) | 0x3
    assert mem.read_u64(layout.PDPT + 8 * 4) == 0
    for i in (0, 1, 511, 512, 1500, 2047):
        assert mem.read_u64(layout.PD + 8 * i) == (i << 21) | 0x83
    assert mem.read_u64(layout.PD + 8 * 2047) & ~0xFFF == 0xFFE00000
    assert layout.PD + 4 * 0x1000 <= 0xF000


def test_cpu_states(mem):
    lm = gdt.long_mode_state(mem, 0x1000200, {"rsi": layout.ZERO_PAGE})
    assert lm.cr0 == 0x80000011 and lm.cr4 == 0x20 and lm.efer == 0x500 and lm.cr3 == layout.PML4
    assert lm.cs.l == 1 and lm.rflags == 0x2 and lm.gprs == {"rsi": layout.ZERO_PAGE}
    assert (lm.gdt_base, lm.gdt_limit, lm.idt_base, lm.idt_limit) == (0x500, 31, 0x520, 0)
    pm = gdt.protected_mode_state(mem, 0x100000, {"rbx": 1})
    assert pm.cr0 == 0x11 and pm.cr3 == 0 and pm.cr4 == 0 and pm.efer == 0
    assert pm.cs.l == 0 and pm.cs.db == 1 and pm.rflags & (1 << 9) == 0
