"""ACPI tables: checksums, pointers, MADT contents, and `iasl -d` decompiles every table cleanly."""

import shutil
import struct
import subprocess

import pytest

from corral.arch.x86 import aml, layout
from corral.arch.x86.acpi import build_acpi_tables


def tables(n):
    t = build_acpi_tables(n)
    return t, {data[:4]: (addr, data) for addr, data in t.blobs}


@pytest.mark.parametrize("n", [1, 2, 8, 64, 254])
def test_checksums_lengths_and_bounds(n):
    t, by_sig = tables(n)
    rsdp_addr, rsdp = by_sig[b"RSD "]
    assert rsdp_addr == t.rsdp_addr == layout.ACPI_START and rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    spans = []
    for addr, data in t.blobs:
        assert layout.ACPI_START <= addr and addr + len(data) <= layout.ACPI_END
        spans.append((addr, addr + len(data)))
        if data[:4] not in (b"RSD ", b"FACS"):
            assert struct.unpack_from("<I", data, 4)[0] == len(data)
            assert sum(data) & 0xFF == 0, data[:4]
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "tables overlap"


def test_xsdt_points_at_fadt_and_madt_and_fadt_at_dsdt_facs():
    t, by_sig = tables(2)
    rsdp = by_sig[b"RSD "][1]
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    at = {addr: data for addr, data in t.blobs}
    xsdt = at[xsdt_addr]
    ptrs = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert sorted(at[p][:4] for p in ptrs) == [b"APIC", b"FACP"]
    fadt = by_sig[b"FACP"][1]
    facs32, dsdt32 = struct.unpack_from("<II", fadt, 36)
    facs64, dsdt64 = struct.unpack_from("<QQ", fadt, 132)
    assert facs32 == 0 and dsdt32 == dsdt64  # FACS only through the 64-bit field
    assert at[dsdt64][:4] == b"DSDT" and at[facs64][:4] == b"FACS" and facs64 % 64 == 0
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.SCI_IRQ
    assert struct.unpack_from("<I", fadt, 64)[0] == layout.PM1_CNT_PORT
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, layout.RESET_PORT)
    assert fadt[128] == 6


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_madt_lists_every_cpu_once_and_the_ioapic(n):
    _, by_sig = tables(n)
    madt = by_sig[b"APIC"][1]
    assert struct.unpack_from("<I", madt, 36)[0] == layout.LAPIC_ADDR
    off, apic_ids, ioapics, overrides = 44, [], [], {}
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        if kind == 0:
            _, apic_id, flags = struct.unpack_from("<BBI", madt, off + 2)
            assert flags & 1
            apic_ids.append(apic_id)
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BBII", madt, off + 2))
        elif kind == 2:
            _, irq, gsi, flags = struct.unpack_from("<BBIH", madt, off + 2)
            overrides[irq] = (gsi, flags)
        off += length
    assert off == len(madt)
    assert apic_ids == list(range(n))
    assert len(ioapics) == 1 and ioapics[0][2] == layout.IOAPIC_ADDR and ioapics[0][0] not in apic_ids
    assert overrides[0][0] == 2 and overrides[9] == (9, 0b1101)  # SCI: level, active high


def test_too_many_cpus_is_refused():
    with pytest.raises(ValueError, match="1 to 254"):
        build_acpi_tables(255)


@pytest.mark.parametrize("body,encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (4093, b"\x4f\xff"), (4094, b"\x81\x00\x01"),
    (1 << 20, b"\xc4\x00\x00\x01")])
def test_pkg_length_boundaries(body, encoded):
    enc = aml.pkg_length(body)
    assert enc == encoded
    # decode: the length counts its own bytes
    n = enc[0] >> 6
    total = enc[0] & 0x3F if n == 0 else (enc[0] & 0xF) | sum(b << (4 + 8 * i) for i, b in enumerate(enc[1:]))
    assert total == body + len(enc)


@pytest.mark.parametrize("v,enc", [(0, b"\x00"), (1, b"\x01"), (5, b"\x0a\x05"), (0x1234, b"\x0b\x34\x12"),
                                   (0x12345678, b"\x0c\x78\x56\x34\x12"), (1 << 40, b"\x0e" + (1 << 40).to_bytes(8, "little"))])
def test_integer_encodings(v, enc):
    assert aml.integer(v) == enc


def test_eisa_ids():
    assert aml.eisa_id("PNP0501") == 0x0105D041
    assert aml.eisa_id("PNP0B00") == 0x000BD041


@pytest.mark.skipif(not shutil.which("iasl"), reason="iasl (acpica-tools) not installed")
@pytest.mark.parametrize("n", [1, 2, 16])
def test_iasl_decompiles_every_table_cleanly(tmp_path, n):
    t, by_sig = tables(n)
    for sig, (_, data) in by_sig.items():
        if sig == b"RSD ":
            continue
        f = tmp_path / f"{sig.decode().lower()}.dat"
        f.write_bytes(data)
        r = subprocess.run(["iasl", "-d", f.name], cwd=tmp_path, capture_output=True, text=True)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert not [l for l in out.splitlines() if "Error" in l or "Warning" in l], out
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert '_S5_' in dsl and 'EisaId ("PNP0501")' in dsl and "0x03F8" in dsl and "{4}" in dsl
    assert dsl.count('"ACPI0007"') == n
    madt = (tmp_path / "apic.dsl").read_text()
    assert madt.count("Processor Local APIC") >= n
