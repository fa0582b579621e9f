"""ACPI tables (corral.arch.x86.acpi); the AML encoder's own tests are in test_arch_x86_aml.py.

Structure checks run everywhere; the `iasl` checks (Debian package acpica-tools) decompile every
table, and recompile the DSDT, and demand no errors or warnings. They skip without iasl.
"""

from __future__ import annotations

import itertools
import re
import shutil
import struct
import subprocess

import pytest

from corral.arch.x86 import acpi, aml, layout
from corral.arch.x86.acpi import build_acpi_tables, machine_acpi_tables
from corral.errors import GuestMemoryError

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) not installed")


# -- helpers ---------------------------------------------------------------------------------
def by_signature(t) -> dict[bytes, tuple[int, bytes]]:
    out = {}
    for addr, data in t.blobs:
        sig = data[:4]
        assert sig not in out, f"two {sig} blobs"
        out[sig] = (addr, data)
    return out


def xsdt_entries(t) -> list[int]:
    at = dict(t.blobs)
    rsdp = at[t.rsdp_addr]
    xsdt = at[struct.unpack_from("<Q", rsdp, 24)[0]]
    assert xsdt[:4] == b"XSDT"
    n = (len(xsdt) - 36) // 8
    assert 36 + 8 * n == len(xsdt)
    return list(struct.unpack_from(f"<{n}Q", xsdt, 36))


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    off, out = 44, []
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        assert length >= 2 and off + length <= len(madt)
        out.append((kind, madt[off : off + length]))
        off += length
    assert off == len(madt)
    return out


def run_iasl(tmp_path, *args: str) -> str:
    r = subprocess.run([IASL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    bad = [
        line
        for line in out.splitlines()
        if re.search(r"\b(Error|Warning)", line) and not re.search(r"\b0 Errors?, 0 Warnings?", line)
    ]
    assert not bad, out
    return out


# -- layout, lengths, checksums --------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 8, 64, 254])
def test_every_blob_is_checksummed_sized_and_inside_the_region(n):
    t = build_acpi_tables(n)
    assert t.rsdp_addr == layout.ACPI_START and t.rsdp_addr % 16 == 0
    sigs = by_signature(t)
    assert set(sigs) == {b"RSD ", b"XSDT", b"FACP", b"FACS", b"APIC", b"DSDT"}
    spans = []
    for addr, data in t.blobs:
        assert layout.ACPI_START <= addr and addr + len(data) <= layout.ACPI_END
        assert addr % 16 == 0
        spans.append((addr, addr + len(data)))
        if data[:4] == b"RSD ":
            continue
        length = struct.unpack_from("<I", data, 4)[0]
        assert length == len(data), data[:4]
        if data[:4] != b"FACS":  # the FACS has no checksum
            assert sum(data) & 0xFF == 0, data[:4]
            assert data[10:16] == b"CORRAL" and data[16:24] == b"CORRALVM" and data[28:32] == b"CRRL"
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, "blobs overlap"


def test_rsdp_is_revision_2_with_both_checksums_and_points_at_the_xsdt():
    t = build_acpi_tables(2)
    _, rsdp = by_signature(t)[b"RSD "]
    assert len(rsdp) == 36 and rsdp[:8] == b"RSD PTR " and rsdp[9:15] == b"CORRAL"
    assert rsdp[15] == 2  # revision 2: XSDT present
    assert sum(rsdp[:20]) & 0xFF == 0  # ACPI 1.0 checksum
    assert sum(rsdp) & 0xFF == 0  # extended checksum
    assert struct.unpack_from("<I", rsdp, 16)[0] == 0  # no RSDT: XSDT only
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert dict(t.blobs)[struct.unpack_from("<Q", rsdp, 24)[0]][:4] == b"XSDT"


def test_xsdt_points_at_the_fadt_and_madt_and_the_fadt_at_the_dsdt_and_facs():
    t = build_acpi_tables(4)
    at = dict(t.blobs)
    assert sorted(at[p][:4] for p in xsdt_entries(t)) == [b"APIC", b"FACP"]
    fadt = by_signature(t)[b"FACP"][1]
    facs32, dsdt32 = struct.unpack_from("<II", fadt, 36)
    xfacs, xdsdt = struct.unpack_from("<QQ", fadt, 132)
    assert at[xdsdt][:4] == b"DSDT" and dsdt32 == xdsdt
    assert at[xfacs][:4] == b"FACS" and xfacs % 64 == 0
    assert facs32 == 0  # FACS only through the 64-bit field


def test_fadt_fields():
    t = build_acpi_tables(1)
    f = by_signature(t)[b"FACP"][1]
    assert len(f) == 276 and f[8] == 6  # revision 6 (ACPI 6.x)
    assert struct.unpack_from("<H", f, 46)[0] == layout.SCI_IRQ
    assert struct.unpack_from("<I", f, 48)[0] == 0  # no SMI_CMD: always in ACPI mode
    assert struct.unpack_from("<III", f, 56)[0] == layout.PM1_EVT_PORT
    assert struct.unpack_from("<I", f, 64)[0] == layout.PM1_CNT_PORT
    assert struct.unpack_from("<I", f, 76)[0] == layout.PM_TMR_PORT
    assert tuple(f[88:92]) == (4, 2, 0, 4)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN
    assert tuple(f[92:94]) == (0, 0)  # no GPE blocks
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & acpi.FADT_WBINVD and flags & acpi.FADT_PROC_C1
    assert flags & acpi.FADT_SLP_BUTTON  # no sleep button
    assert not flags & acpi.FADT_PWR_BUTTON  # fixed-feature power button present
    assert flags & acpi.FADT_RESET_REG_SUP
    assert not flags & (1 << 8)  # TMR_VAL_EXT = 0: 24-bit PM timer
    assert not flags & (1 << 20)  # not HW_REDUCED_ACPI
    boot = struct.unpack_from("<H", f, 109)[0]
    assert boot & acpi.BOOT_LEGACY_DEVICES and boot & acpi.BOOT_8042 and boot & acpi.BOOT_VGA_NOT_PRESENT
    assert not boot & (1 << 3)  # MSI supported (PCI with MSI-X comes next)
    assert not boot & (1 << 5)  # CMOS RTC present
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 1, layout.RESET_PORT)
    assert f[128] == 6  # RESET_VALUE
    # X_ blocks: system I/O, bit widths matching the legacy lengths (else Linux warns)
    assert struct.unpack_from("<BBBBQ", f, 148) == (1, 32, 0, 2, layout.PM1_EVT_PORT)
    assert struct.unpack_from("<BBBBQ", f, 172) == (1, 16, 0, 2, layout.PM1_CNT_PORT)
    assert struct.unpack_from("<BBBBQ", f, 208) == (1, 32, 0, 3, layout.PM_TMR_PORT)
    for off in (160, 184, 196, 220, 232, 244, 256):  # PM1b, PM2, GPE0/1, sleep ctl/sts
        assert f[off : off + 12] == bytes(12)


def test_facs_is_64_bytes_version_2():
    facs = by_signature(build_acpi_tables(1))[b"FACS"][1]
    assert len(facs) == 64 and facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    assert facs[32] == 2


@pytest.mark.parametrize("n", [1, 2, 8, 64, 254])
def test_madt_lists_each_cpu_once_the_ioapic_and_the_overrides(n):
    madt = by_signature(build_acpi_tables(n))[b"APIC"][1]
    assert madt[8] == 5
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, acpi.MADT_PCAT_COMPAT)
    cpus, ioapics, overrides, nmis = [], [], {}, []
    for kind, e in madt_entries(madt):
        if kind == 0:
            assert len(e) == 8
            uid, apic_id, flags = struct.unpack_from("<BBI", e, 2)
            assert flags == 1 and uid == apic_id
            cpus.append(apic_id)
        elif kind == 1:
            assert len(e) == 12
            ioapics.append(struct.unpack_from("<BBII", e, 2))
        elif kind == 2:
            assert len(e) == 10
            bus, irq, gsi, flags = struct.unpack_from("<BBIH", e, 2)
            assert bus == 0 and irq not in overrides
            overrides[irq] = (gsi, flags)
        elif kind == 4:
            nmis.append(struct.unpack_from("<BHB", e, 2))
        else:
            pytest.fail(f"unexpected MADT entry type {kind}")
    assert cpus == list(range(n))
    assert len(ioapics) == 1
    ioapic_id, _, addr, gsi_base = ioapics[0]
    assert ioapic_id not in cpus and ioapic_id < 255 and addr == layout.IOAPIC_ADDR and gsi_base == 0
    assert overrides[0] == (2, 0)  # PIT: IRQ0 -> GSI2, ISA default (edge/high)
    assert overrides[layout.SCI_IRQ] == (layout.SCI_IRQ, 0b1101)  # SCI: level, active high
    assert nmis == [(0xFF, 0b0101, 1)]  # LINT1 on every CPU


@pytest.mark.parametrize("n", [0, 255, 1000])
def test_unrepresentable_cpu_counts_are_refused(n):
    with pytest.raises(ValueError, match="1 to 254"):
        build_acpi_tables(n)


def test_254_cpus_fit_with_room_to_spare():
    t = build_acpi_tables(254)
    end = max(a + len(d) for a, d in t.blobs)
    assert end - layout.ACPI_START < (layout.ACPI_END - layout.ACPI_START) // 4


def test_tables_that_do_not_fit_are_refused_clearly():
    with pytest.raises(ValueError, match="do not fit in 0xe0000-0xe0400"):
        build_acpi_tables(64, limit=0xE0400)
    with pytest.raises(ValueError, match="16-byte aligned"):
        build_acpi_tables(1, base=0xE0008)


def test_another_base_moves_every_table():
    t = build_acpi_tables(2, base=0xF0000)
    assert t.rsdp_addr == 0xF0000
    assert all(0xF0000 <= a and a + len(d) <= layout.ACPI_END for a, d in t.blobs)
    assert all(0xF0000 <= p < layout.ACPI_END for p in xsdt_entries(t))


def test_write_to_writes_every_blob_at_its_address():
    class Mem:
        def __init__(self):
            self.writes = []

        def write(self, gpa, data):
            self.writes.append((gpa, bytes(data)))

    t = build_acpi_tables(2)
    m = Mem()
    t.write_to(m)
    assert m.writes == t.blobs


def test_extra_tables_join_the_xsdt_and_extra_devices_the_dsdt():
    mcfg = acpi.sdt(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", 0xB000_0000, 0, 0, 0, 0))
    pci = aml.device(
        "PCI0", aml.name("_HID", aml.integer(aml.eisa_id("PNP0A03"))), aml.name("_UID", aml.integer(0))
    )
    t = build_acpi_tables(2, extra_tables=[mcfg], extra_devices=[pci])
    at = dict(t.blobs)
    assert sorted(at[p][:4] for p in xsdt_entries(t)) == [b"APIC", b"FACP", b"MCFG"]
    dsdt = by_signature(t)[b"DSDT"][1]
    assert pci in dsdt and sum(dsdt) & 0xFF == 0


def test_dsdt_sleep_packages_are_encoded_as_linux_reads_them():
    dsdt = by_signature(build_acpi_tables(1))[b"DSDT"][1]
    v3, v5 = layout.S3_SLP_TYP, layout.S5_SLP_TYP
    # Name(_S3_, Package(){v3, v3, 0, 0}) then Name(_S5_, ...) first at the root: NameOp, name,
    # PackageOp, PkgLength, NumElements 4, two integers, two Zeros
    s3 = aml.integer(v3) * 2 + b"\x00\x00"
    s5 = aml.integer(v5) * 2 + b"\x00\x00"
    expect = b"\x08_S3_\x12" + bytes([len(s3) + 2, 4]) + s3 + b"\x08_S5_\x12" + bytes([len(s5) + 2, 4]) + s5
    assert dsdt[36:].startswith(expect)
    assert v3 != v5


def _tables_in_memory(tables: acpi.AcpiTables, size: int = 0x100000) -> tuple[bytearray, object]:
    mem = bytearray(size)
    for addr, data in tables.blobs:
        mem[addr : addr + len(data)] = data

    def read(gpa: int, n: int) -> bytes:
        if gpa < 0 or gpa + n > len(mem):
            raise GuestMemoryError(f"{gpa:#x}+{n:#x} outside RAM")
        return bytes(mem[gpa : gpa + n])

    return mem, read


def test_find_facs_walks_rsdp_xsdt_fadt_as_an_os_does():
    t = machine_acpi_tables(2, 64 * layout.MiB)
    mem, read = _tables_in_memory(t)
    facs_addr = by_signature(t)[b"FACS"][0]
    assert acpi.find_facs(read) == facs_addr  # type: ignore[arg-type]
    with pytest.raises(acpi.WakingVectorError, match="no waking vector"):
        acpi.waking_vector(bytes(mem[facs_addr : facs_addr + 64]))
    # Linux writes the 32-bit vector (real mode); the X vector, when set, wins (protected mode)
    struct.pack_into("<I", mem, facs_addr + 12, 0x9A010)
    assert acpi.waking_vector(bytes(mem[facs_addr : facs_addr + 64])) == acpi.WakingVector(0x9A010, False)
    struct.pack_into("<Q", mem, facs_addr + 24, 0x100000)
    assert acpi.waking_vector(bytes(mem[facs_addr : facs_addr + 64])) == acpi.WakingVector(0x100000, True)
    struct.pack_into("<Q", mem, facs_addr + 24, 1 << 32)
    with pytest.raises(acpi.WakingVectorError, match="above 4 GiB"):
        acpi.waking_vector(bytes(mem[facs_addr : facs_addr + 64]))
    struct.pack_into("<QI", mem, facs_addr + 24, 0, 0)
    struct.pack_into("<I", mem, facs_addr + 12, 0x100000)
    with pytest.raises(acpi.WakingVectorError, match="above 1 MiB"):
        acpi.waking_vector(bytes(mem[facs_addr : facs_addr + 64]))


def test_find_facs_refuses_hostile_pointers_with_one_error():
    t = machine_acpi_tables(1, 64 * layout.MiB)
    mem, read = _tables_in_memory(t)
    rsdp = t.rsdp_addr
    fadt_addr = by_signature(t)[b"FACP"][0]
    struct.pack_into("<Q", mem, fadt_addr + 132, 0xFFFF_FFFF_0000)  # X_FIRMWARE_CTRL off RAM
    with pytest.raises(acpi.WakingVectorError, match="outside RAM"):
        acpi.find_facs(read)  # type: ignore[arg-type]
    struct.pack_into("<Q", mem, rsdp + 24, 0x1000)  # the XSDT pointer at zeros
    with pytest.raises(acpi.WakingVectorError, match="no valid XSDT"):
        acpi.find_facs(read)  # type: ignore[arg-type]
    xsdt_addr = by_signature(t)[b"XSDT"][0]
    struct.pack_into("<Q", mem, rsdp + 24, xsdt_addr)
    struct.pack_into("<I", mem, xsdt_addr + 4, 0xFFFF_FFFF)  # a huge length: bounded
    with pytest.raises(acpi.WakingVectorError, match="no valid XSDT"):
        acpi.find_facs(read)  # type: ignore[arg-type]
    mem[rsdp : rsdp + 8] = bytes(8)
    with pytest.raises(acpi.WakingVectorError, match="no RSDP"):
        acpi.find_facs(read)  # type: ignore[arg-type]


# -- iasl -----------------------------------------------------------------------------------
@needs_iasl
@pytest.mark.parametrize("n", [1, 2, 8, 254])
def test_iasl_decompiles_every_table_cleanly(tmp_path, n):
    t = machine_acpi_tables(n, 6 * layout.GiB)
    for sig, (_, data) in by_signature(t).items():
        if sig == b"RSD ":
            continue
        name = f"{sig.decode()}.dat"
        (tmp_path / name).write_bytes(data)
        run_iasl(tmp_path, "-d", name)
        assert (tmp_path / f"{sig.decode()}.dsl").exists()

    madt = (tmp_path / "APIC.dsl").read_text()
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == n
    assert madt.count("[I/O APIC]") == 1 and madt.count("[Interrupt Source Override]") == 2
    fadt = (tmp_path / "FACP.dsl").read_text()
    assert re.search(r"Reset Register Supported \(V2\) : 1", fadt)
    assert re.search(r"Hardware Reduced \(V5\) : 0", fadt)
    xsdt = (tmp_path / "XSDT.dsl").read_text()
    assert xsdt.count("ACPI Table Address") == 3
    mcfg_dsl = (tmp_path / "MCFG.dsl").read_text()
    assert re.search(r"Base Address : 00000000E0000000", mcfg_dsl)
    assert re.search(r"End Bus Number : 00", mcfg_dsl)

    dsl = (tmp_path / "DSDT.dsl").read_text()
    assert "Name (_S5, Package (0x04)" in dsl
    assert re.search(r"Name \(_S3, Package \(0x04\)[^{]*\{\s+One,\s+One,\s+Zero,\s+Zero", dsl)
    assert dsl.count('"ACPI0007"') == n
    com1 = dsl[dsl.index("Device (COM1)") :]
    com1 = com1[: com1.index("Device (", 1)]
    assert 'EisaId ("PNP0501")' in com1
    assert re.search(r"IO \(Decode16,\s+0x03F8,\s+// Range Minimum\s+0x03F8,", com1)
    assert re.search(r"0x08,\s+// Length", com1)
    assert re.search(r"IRQNoFlags \(\)\s+\{4\}", com1)
    for hid in ("PNP0B00", "PNP0C02"):
        assert f'EisaId ("{hid}")' in dsl
    # a PNP0303 keyboard without a PNP0F13 mouse makes Linux warn; the FADT announces the i8042
    assert "PNP0303" not in dsl
    assert re.search(r"IRQNoFlags \(\)\s+\{8\}", dsl)
    for port in (layout.DEBUG_EXIT_PORT, layout.PM_BASE_PORT, layout.PCI_CONFIG_ADDRESS_PORT):
        assert f"0x{port:04X}," in dsl
    # the PCI root: PCIe host bridge on bus 0 with the 32-bit window and the 64-bit one above RAM
    pci0 = dsl[dsl.index("Device (PCI0)") :]
    assert 'EisaId ("PNP0A08")' in pci0 and 'EisaId ("PNP0A03")' in pci0
    assert re.search(r"0xC0000000,\s+// Range Minimum\s+0xDFFFFFFF,", pci0)
    start64, _size64 = layout.pci_mmio64_window(6 * layout.GiB)
    assert start64 == 7 * layout.GiB  # 6 GiB of RAM: 3 GiB below the hole, 3 GiB from 4 GiB
    assert re.search(rf"0x{start64:016X}, // Range Minimum", pci0)
    assert "Method (_OSC, 4" in pci0
    # fw_cfg as QEMU describes it, for Linux's qemu_fw_cfg driver
    fwcf = dsl[dsl.index("Device (FWCF)") :]
    fwcf = fwcf[: fwcf.index("Device (", 1)]
    assert 'Name (_HID, "QEMU0002")' in fwcf and "Name (_STA, 0x0B)" in fwcf
    assert re.search(r"IO \(Decode16,\s+0x0510,\s+// Range Minimum\s+0x0510,", fwcf)
    assert re.search(r"0x0C,\s+// Length", fwcf)
    # the ECAM window is a reserved motherboard resource too
    assert re.search(r"Memory32Fixed \(ReadWrite,\s+0xE0000000,", dsl)

    # and the disassembly compiles back without errors, warnings or remarks
    (tmp_path / "again.dsl").write_text(dsl)
    out = run_iasl(tmp_path, "again.dsl")
    assert re.search(r"0 Errors, 0 Warnings, 0 Remarks", out), out


@needs_iasl
def test_iasl_accepts_a_dsdt_with_extra_devices(tmp_path):
    pci = aml.device(
        "PCI0", aml.name("_HID", aml.integer(aml.eisa_id("PNP0A03"))), aml.name("_UID", aml.integer(0))
    )
    dsdt = by_signature(build_acpi_tables(2, extra_devices=[pci]))[b"DSDT"][1]
    (tmp_path / "DSDT.dat").write_bytes(dsdt)
    run_iasl(tmp_path, "-d", "DSDT.dat")
    assert "Device (PCI0)" in (tmp_path / "DSDT.dsl").read_text()


@needs_iasl
@pytest.mark.parametrize("n", [1, 2, 16])
def test_iasl_decompiles_the_bare_tables_cleanly(tmp_path, n):
    """build_acpi_tables() alone, without the machine's PCI root and MCFG."""
    for sig, (_, data) in by_signature(build_acpi_tables(n)).items():
        if sig == b"RSD ":
            continue
        name = f"{sig.decode()}.dat"
        (tmp_path / name).write_bytes(data)
        run_iasl(tmp_path, "-d", name)
    dsl = (tmp_path / "DSDT.dsl").read_text()
    assert "_S5_" in dsl and 'EisaId ("PNP0501")' in dsl and "0x03F8" in dsl and "{4}" in dsl
    assert dsl.count('"ACPI0007"') == n
    assert (tmp_path / "APIC.dsl").read_text().count("Processor Local APIC") >= n
