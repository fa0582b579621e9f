"""What Debian's SeaBIOS leaves in guest memory under corral, read back after its boot: corral's
own ACPI tables (installed through fw_cfg's table loader, not SeaBIOS's), corral's SMBIOS
tables, and a BIOS area that PAM has locked: the boot sector tries to overwrite 0xF0000 and
reports whether the write landed, through the exit port.

One SeaBIOS boot (~10 s here: its POST runs in KVM's real-mode emulation on a PVM host)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from corral.arch.x86 import acpi, smbios
from corral.boot import firmware
from corral.config import DiskConfig, MachineConfig
from corral.machine import Machine

SEABIOS = next((Path(p) for p in firmware.KNOWN["seabios"] if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(SEABIOS is None, reason="Debian's seabios package is not installed")

CPUS, MEMORY = 2, 128 << 20
PROTECTED, CHANGED, WRITABLE_BROKEN = 0x11, 0x22, 0x33

# Flips the dword at F000:0000 and reads it back (0x11: the write was dropped, 0x22: it landed),
# after checking a write to ordinary RAM at 0x600 does land (else 0x33).
BOOT_SECTOR = r"""
    .code16
    .text
_start:
    xor %ax, %ax
    mov %ax, %ds
    movl $0x12345678, (0x600)
    cmpl $0x12345678, (0x600)
    jne broken
    mov $0xf000, %ax
    mov %ax, %es
    movl %es:0, %ebx
    mov %ebx, %eax
    notl %eax
    movl %eax, %es:0
    movl %es:0, %eax
    cmp %ebx, %eax
    jne changed
    mov $0x11, %al
    jmp out
changed:
    mov $0x22, %al
    jmp out
broken:
    mov $0x33, %al
out:
    outb %al, $0xf4
1:  hlt
    jmp 1b
    .org 510
    .byte 0x55, 0xaa
"""


@pytest.fixture(scope="module")
def booted(tmp_path_factory) -> tuple[int, bytes, str]:
    """One boot: (exit status, all of guest RAM after it, console text)."""
    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("binutils (as, objcopy) are not installed")
    d = tmp_path_factory.mktemp("fwtables")
    (d / "s.S").write_text(BOOT_SECTOR)
    subprocess.run(["as", "--32", "-o", str(d / "s.o"), str(d / "s.S")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(d / "s.o"), str(d / "s.bin")], check=True)
    disk = d / "disk.img"
    disk.write_bytes((d / "s.bin").read_bytes().ljust(1 << 20, b"\0"))
    cfg = MachineConfig.build(
        firmware=str(SEABIOS),
        disks=[DiskConfig(path=disk, read_only=True)],
        debug_exit=0xF4,
        cpus=CPUS,
        memory=MEMORY,
        no_reboot=True,
    )
    out = bytearray()
    m = Machine(cfg, console=out.extend)
    try:
        m.start()
        res = m.wait(90)
        assert m.memory is not None
        ram = m.memory.read(0, MEMORY)  # all of it: the ACPI tables sit at the top of RAM
    finally:
        m.close()
    text = out.decode(errors="replace")
    assert res is not None and res.kind == "exit", text
    return res.status, ram, text


def _find(ram: bytes, signature: bytes, step: int = 16) -> int:
    """The first `signature` on a `step` boundary in 0xE0000-0xFFFFF, as OSes scan for it."""
    for addr in range(0xE0000, 0x100000, step):
        if ram[addr : addr + len(signature)] == signature:
            return addr
    raise AssertionError(f"no {signature!r} in the BIOS area")


def test_a_guest_write_to_the_locked_bios_area_is_dropped(booted):
    status, _, text = booted
    assert status == PROTECTED, (hex(status), text)


def test_seabios_installs_corrals_acpi_tables(booted):
    _, ram, text = booted
    rsdp_at = _find(ram, b"RSD PTR ")
    assert 0xF0000 <= rsdp_at, hex(rsdp_at)  # in the F segment, where the loader's FSEG zone is
    rsdp = ram[rsdp_at : rsdp_at + 36]
    assert rsdp[9:15] == acpi.OEM_ID, rsdp  # corral's, not SeaBIOS's ("BOCHS ")
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    xsdt_at = struct.unpack_from("<Q", rsdp, 24)[0]
    facs_at = struct.unpack_from("<Q", ram, _table_at(ram, xsdt_at, b"FACP") + 132)[0]
    # the tables file starts 64 bytes before the FACS: corral's tables laid out from there are
    # what the guest has, byte for byte
    expect = acpi.machine_acpi_tables(CPUS, MEMORY, base=facs_at - 64)
    assert 0x100000 <= facs_at < MEMORY
    for addr, data in expect.blobs:
        if data[:4] == b"RSD ":
            assert rsdp == acpi.rsdp(xsdt_at)
            continue
        assert ram[addr : addr + len(data)] == data, (data[:4], hex(addr), text)


def _table_at(ram: bytes, xsdt_at: int, sig: bytes) -> int:
    length = struct.unpack_from("<I", ram, xsdt_at + 4)[0]
    for (ptr,) in struct.iter_unpack("<Q", ram[xsdt_at + 36 : xsdt_at + length]):
        if ram[ptr : ptr + 4] == sig:
            return ptr
    raise AssertionError(f"the XSDT lists no {sig!r}")


def test_seabios_installs_corrals_smbios_tables(booted):
    _, ram, _ = booted
    at = _find(ram, b"_SM_")
    ep = ram[at : at + smbios.ANCHOR_SIZE]
    assert sum(ep) & 0xFF == 0 and sum(ep[16:31]) & 0xFF == 0
    length, table_at, count = struct.unpack_from("<HIH", ep, 22)
    table = ram[table_at : table_at + length]
    kinds, pos = [], 0
    for _ in range(count):
        kind, size = table[pos], table[pos + 1]
        kinds.append(kind)
        if kind == 1:
            assert b"corral\0corral VM\0" in table[pos + size : pos + size + 40]
        pos = table.index(b"\0\0", pos + size) + 2
    assert pos == length
    assert kinds == [0, 1, 4, 16, 17, 19, 32, 127]
