"""The ELF core writer without a guest: notes laid out as Linux's elf_prstatus and QEMU's
QEMUCPUState, a core that binutils' readelf parses, holes where RAM was never written, and the
refusals (an existing file, a symlink, a NUL in the path)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from corral.debug.dump import (
    PRSTATUS_REG,
    PRSTATUS_SIZE,
    QEMU_CPU_SIZE,
    USER_REGS,
    DumpError,
    _note,
    prstatus,
    qemu_cpu_state,
    write_core,
)
from corral.kvm import structs as S
from corral.memory import GuestMemory

MiB = 1 << 20
readelf = pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils' readelf is not installed")


def regs_and_sregs() -> tuple[S.KvmRegs, S.KvmSregs]:
    r = S.KvmRegs()
    for i, name in enumerate("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15".split()):
        setattr(r, name, 0x1000 + i)
    r.rip, r.rflags = 0x100287, 0x202
    s = S.KvmSregs()
    s.cs.selector, s.ss.selector, s.fs.base, s.gs.base = 0x8, 0x10, 0xF5, 0x65
    s.cs.type, s.cs.s, s.cs.present, s.cs.l, s.cs.dpl = 0xB, 1, 1, 1, 3
    s.cr0, s.cr2, s.cr3, s.cr4 = 0x80000011, 0x22, 0x106000, 0x20
    s.gdt.base, s.gdt.limit = 0x105010, 0x47
    return r, s


def test_prstatus_is_linux_x86_64_elf_prstatus():
    r, s = regs_and_sregs()
    desc = prstatus(1, r, s)
    assert len(desc) == PRSTATUS_SIZE == 336
    assert struct.unpack_from("<i", desc, 32)[0] == 2  # pr_pid: vCPU index + 1
    regs = dict(zip(USER_REGS, struct.unpack_from("<27Q", desc, PRSTATUS_REG), strict=True))
    assert regs["rip"] == 0x100287 and regs["eflags"] == 0x202 and regs["rax"] == 0x1000
    assert regs["r15"] == 0x100F and regs["cs"] == 0x8 and regs["ss"] == 0x10
    assert regs["fs_base"] == 0xF5 and regs["gs_base"] == 0x65
    assert regs["orig_rax"] == (1 << 64) - 1


def test_qemu_note_has_qemus_layout():
    r, s = regs_and_sregs()
    desc = qemu_cpu_state(r, s, kernel_gs_base=0xABC)
    assert len(desc) == QEMU_CPU_SIZE == 440
    version, size, rax = struct.unpack_from("<IIQ", desc, 0)
    assert (version, size, rax) == (1, 440, 0x1000)
    rip, rflags = struct.unpack_from("<QQ", desc, 8 + 16 * 8)
    assert (rip, rflags) == (0x100287, 0x202)
    sel, _limit, flags, _pad, _base = struct.unpack_from("<IIIIQ", desc, 8 + 18 * 8)  # cs
    assert sel == 0x8 and flags == (0xB << 8) | (1 << 12) | (3 << 13) | (1 << 15) | (1 << 21)
    cr = struct.unpack_from("<6Q", desc, 440 - 48)
    assert cr == (0x80000011, 0, 0x22, 0x106000, 0x20, 0xABC)


def test_notes_are_padded_to_four_bytes():
    n = _note(b"QEMU", 0, b"abcdef")
    namesz, descsz, ntype = struct.unpack_from("<III", n)
    assert (namesz, descsz, ntype) == (5, 6, 0)
    assert len(n) == 12 + 8 + 8


@readelf
def test_a_core_of_sparse_ram_has_holes_and_parses(tmp_path):
    r, s = regs_and_sregs()
    with GuestMemory(64 * MiB) as mem:
        mem.write(0x200000, b"corral!" * 100)
        mem.write(0x3000000, b"\x01")
        core = tmp_path / "core"
        written, size = write_core(core, mem, [_note(b"CORE", 1, prstatus(0, r, s))])
        assert written == 2 * 64 * 1024  # two chunks of RAM, the rest are holes
        st = core.stat()
        assert st.st_size == size > 64 * MiB
        assert st.st_blocks * 512 < 1 * MiB
        assert st.st_mode & 0o777 == 0o600
        phdrs = subprocess.run(
            ["readelf", "-lW", str(core)], capture_output=True, text=True, check=True
        ).stdout
        assert (
            "CORE (Core file)"
            in subprocess.run(["readelf", "-h", str(core)], capture_output=True, text=True, check=True).stdout
        )
        (load,) = re.findall(r"LOAD\s+(0x\w+) (0x\w+) (0x\w+) (0x\w+) (0x\w+)", phdrs)
        off, vaddr, paddr, filesz, memsz = (int(x, 16) for x in load)
        assert vaddr == paddr == 0 and filesz == memsz == 64 * MiB
        with open(core, "rb") as f:
            f.seek(off + 0x200000)
            assert f.read(7) == b"corral!"
            f.seek(off + 0x3000000)
            assert f.read(2) == b"\x01\x00"
        notes = subprocess.run(
            ["readelf", "-nW", str(core)], capture_output=True, text=True, check=True
        ).stdout
        assert "NT_PRSTATUS" in notes


def test_a_core_never_replaces_a_file_or_follows_a_symlink(tmp_path):
    with GuestMemory(16 * MiB) as mem:
        existing = tmp_path / "existing"
        existing.write_bytes(b"keep")
        with pytest.raises(DumpError, match="exists"):
            write_core(existing, mem, [])
        assert existing.read_bytes() == b"keep"
        (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(DumpError):
            write_core(tmp_path / "link", mem, [])
        assert not (tmp_path / "elsewhere").exists()
        with pytest.raises(DumpError, match="NUL"):
            write_core(str(tmp_path / "a\0b"), mem, [])
