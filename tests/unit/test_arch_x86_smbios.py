"""SMBIOS tables (corral.arch.x86.smbios): parsed back with a small parser, their entry point's
checksums and counts, and (where installed) read by dmidecode from a dump as the guest's would."""

import shutil
import struct
import subprocess
import uuid

import pytest

from corral.arch.x86 import layout
from corral.arch.x86 import smbios as S

GiB = layout.GiB
UUID = uuid.UUID("12345678-9abc-def0-1122-334455667788")


def parse(blob: bytes) -> list[tuple[int, int, bytes, list[str], int]]:
    """(type, handle, formatted part, strings, bytes in all) per structure, to type 127."""
    out, pos = [], 0
    while True:
        kind, length, handle = struct.unpack_from("<BBH", blob, pos)
        assert length >= 4
        formatted = blob[pos : pos + length]
        end = blob.index(b"\0\0", pos + length)
        text = blob[pos + length : end]
        strings = [s.decode() for s in text.split(b"\0")] if text else []
        out.append((kind, handle, formatted, strings, end + 2 - pos))
        pos = end + 2
        if kind == 127:
            assert pos == len(blob), "bytes after the end structure"
            return out


def string(formatted: bytes, strings: list[str], offset: int) -> str:
    n = formatted[offset]
    return strings[n - 1] if n else ""


@pytest.mark.parametrize("cpus,mem", [(1, 128 * layout.MiB), (4, 6 * GiB), (255, 40 * GiB)])
def test_structures_are_the_types_qemu_gives_with_their_sizes(cpus, mem):
    files = S.firmware_smbios(cpus, mem, UUID)
    parsed = parse(files[S.TABLES_FILE])
    dimms = -(-mem // (16 * GiB))
    ranges = len(layout.ram_ranges(mem))
    assert [p[0] for p in parsed] == [0, 1, 4, 16] + [17] * dimms + [19] * ranges + [32, 127]
    lengths = {0: 0x18, 1: 0x1B, 4: 0x2A, 16: 0x17, 17: 0x28, 19: 0x1F, 32: 0x0B, 127: 4}
    for kind, _, formatted, _, _ in parsed:
        assert len(formatted) == lengths[kind], kind
    handles = [p[1] for p in parsed]
    assert len(set(handles)) == len(handles)
    by = {p[0]: p for p in parsed}
    _, _, f0, s0, _ = by[0]
    assert string(f0, s0, 4) == "corral" and struct.unpack_from("<H", f0, 6)[0] == 0xE800
    assert f0[0x13] & 0x10  # "this is a virtual machine"
    _, _, f1, s1, _ = by[1]
    assert string(f1, s1, 4) == "corral" and string(f1, s1, 5) == "corral VM"
    assert uuid.UUID(bytes_le=bytes(f1[8:24])) == UUID
    _, _, f4, _, _ = by[4]
    assert f4[5] == 3 and f4[0x18] == 0x41 and f4[0x23] == f4[0x25] == min(cpus, 255)
    _, _, f16, _, _ = by[16]
    assert struct.unpack_from("<H", f16, 0xD)[0] == dimms
    sizes = [struct.unpack_from("<H", p[2], 0xC)[0] for p in parsed if p[0] == 17]
    assert sum(sizes) * layout.MiB == mem  # MiB, all below the 0x7FFF escape
    mapped = [struct.unpack_from("<II", p[2], 4) for p in parsed if p[0] == 19]
    assert [(lo * 1024, (hi + 1) * 1024) for lo, hi in mapped] == [
        (start, start + size) for start, size in layout.ram_ranges(mem)
    ]


def test_the_entry_point_counts_and_checksums_the_structures():
    files = S.firmware_smbios(2, GiB, UUID)
    ep, tables = files[S.ANCHOR_FILE], files[S.TABLES_FILE]
    assert len(ep) == 31 and ep[:4] == b"_SM_" and ep[16:21] == b"_DMI_"
    assert sum(ep) & 0xFF == 0 and sum(ep[16:31]) & 0xFF == 0
    assert (ep[5], ep[6], ep[7], ep[30]) == (31, 2, 8, 0x28)
    length, addr, count = struct.unpack_from("<HIH", ep, 22)
    assert (length, addr, count) == (len(tables), 0, len(parse(tables)))
    assert struct.unpack_from("<H", ep, 8)[0] == max(p[4] for p in parse(tables))  # the largest


def test_a_random_uuid_per_machine_unless_given():
    a = parse(S.firmware_smbios(1, GiB)[S.TABLES_FILE])[1][2]
    b = parse(S.firmware_smbios(1, GiB)[S.TABLES_FILE])[1][2]
    assert a[8:24] != b[8:24]


@pytest.mark.skipif(shutil.which("dmidecode") is None, reason="dmidecode is not installed")
def test_dmidecode_reads_the_tables_from_a_dump(tmp_path):
    """dmidecode --from-dump: the entry point at 0, the table where its address says (32)."""
    files = S.firmware_smbios(4, 6 * GiB, UUID)
    ep = bytearray(files[S.ANCHOR_FILE])
    struct.pack_into("<I", ep, 24, 32)
    ep[21] = 0
    ep[21] = (-sum(ep[16:31])) & 0xFF
    ep[4] = 0
    ep[4] = (-sum(ep)) & 0xFF
    (tmp_path / "dmi.bin").write_bytes(bytes(ep).ljust(32, b"\0") + files[S.TABLES_FILE])
    r = subprocess.run(
        ["dmidecode", "--from-dump", str(tmp_path / "dmi.bin")], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "SMBIOS 2.8 present." in out, out
    assert "Invalid" not in out and "<OUT OF SPEC>" not in out and "wrong" not in out.lower(), out
    assert "Vendor: corral" in out and "Product Name: corral VM" in out
    assert f"UUID: {UUID}" in out
    assert "Core Count: 4" in out and "Status: Populated, Enabled" in out
    assert out.count("Memory Device\n") == 1 and "Size: 6 GB" in out
    assert "Maximum Capacity: 6 GB" in out
    assert "Status: No errors detected" in out
    assert "End Of Table" in out
    assert not r.stderr, r.stderr
