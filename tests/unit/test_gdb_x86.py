"""The x86-64 register file the gdb stub serves (corral.debug.x86): a target description that
real gdb accepts as i386:x86-64 with our numbering, and a codec that puts every register back
where KVM keeps it."""

import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from corral.debug import x86
from corral.kvm import structs as S


def test_the_description_is_well_formed_and_numbers_registers_in_order():
    root = ET.fromstring(x86.target_xml())
    assert root.findtext("architecture") == "i386:x86-64"
    regs = root.findall("feature/reg")
    assert [r.get("name") for r in regs] == [r.name for r in x86.REGS]
    assert [int(r.get("regnum")) for r in regs] == list(range(len(x86.REGS)))
    features = [f.get("name") for f in root.findall("feature")]
    assert features[:2] == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"]
    assert x86.G_SIZE == 600


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_real_gdb_accepts_the_description_with_our_sizes(tmp_path):
    path = tmp_path / "target.xml"
    path.write_bytes(x86.target_xml())
    out = subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", f"set tdesc filename {path}", "-ex", "show architecture",
         "-ex", "maint print registers"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "i386:x86-64" in out.stdout, out.stdout + out.stderr
    assert "warning" not in out.stderr.lower(), out.stderr
    sizes = {}
    for line in out.stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[4].isdigit():
            sizes[cols[0]] = int(cols[4])
    for r in x86.REGS:
        assert sizes[r.name] == r.size, r.name


def _file() -> x86.RegisterFile:
    regs, sregs, fpu = S.KvmRegs(), S.KvmSregs(), S.KvmFpu()
    for i, name in enumerate(x86.GPRS + ["rip"]):
        setattr(regs, name, 0x1111_0000_0000_0000 + i)
    regs.rflags = 0x246
    for i, seg in enumerate(x86.SEGMENTS):
        getattr(sregs, seg).selector = 0x10 + 8 * i
    sregs.fs.base, sregs.gs.base = 0xFFFF_8000_0000_1000, 0x7000
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer = (
        0x80050033,
        0x1234,
        0x106000,
        0x6A0,
        3,
        0xD01,
    )
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr, fpu.last_opcode = 0x37F, 0x20, 0b101, 0x1F80, 0x7FF
    fpu.fpr[0:10] = list(range(1, 11))
    fpu.xmm[16 * 15 : 16 * 16] = list(range(16))
    return x86.RegisterFile(regs, sregs, fpu)


def test_values_come_from_where_kvm_keeps_them():
    rf = _file()

    def value(name):
        return int.from_bytes(rf.get(x86.REG_INDEX[name]), "little")

    assert value("rbp") == rf.regs.rbp and value("rsp") == rf.regs.rsp  # gdb's order differs from KVM's
    assert value("rip") == rf.regs.rip
    assert value("eflags") == 0x246
    assert value("ss") == rf.sregs.ss.selector
    assert value("fs_base") == 0xFFFF_8000_0000_1000
    assert value("cr3") == 0x106000 and value("efer") == 0xD01 and value("cr8") == 3
    assert rf.get(x86.REG_INDEX["st0"]) == bytes(range(1, 11))
    assert rf.get(x86.REG_INDEX["xmm15"]) == bytes(range(16))
    assert value("ftag") == 0b11_11_11_11_11_00_11_00  # st0 and st2 in use, the rest empty
    assert len(rf.all()) == x86.G_SIZE


def test_every_register_written_reads_back_and_lands_in_its_kvm_state():
    rf = _file()
    for num, reg in enumerate(x86.REGS):
        if reg.name in ("fiseg", "foseg"):
            continue  # not kept by KVM's FPU format: writes are accepted and dropped
        new = bytes((0x5A ^ i) & 0xFF for i in range(reg.size))
        if reg.name in x86.SEGMENTS or reg.name in ("fctrl", "fstat", "fop"):
            new = b"\x2b\x03\x00\x00"  # 16-bit in KVM's state
        if reg.name == "ftag":
            new = (0xFFF0).to_bytes(4, "little")  # st0 and st1 in use
        if reg.name == "eflags":
            new = (0x202).to_bytes(4, "little")
        where = rf.set(num, new)
        assert where in ("regs", "sregs", "fpu")
        assert rf.get(num) == new, reg.name
    assert rf.fpu.ftwx == 0b11
    assert rf.regs.rflags == 0x202


def test_a_write_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="rax takes 8 bytes"):
        _file().set(0, b"\x00")
