"""The ACPI linker/loader (corral.arch.x86.acpi_loader): the fw_cfg files and script a firmware
runs, executed here as a firmware would, and the tables that come out compared with corral's
own tables built for the addresses the firmware chose. Hostile scripts are one line."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.arch.x86 import acpi, layout
from corral.arch.x86 import acpi_loader as L

MEM = 6 * layout.GiB


class Placer:
    """Allocations as SeaBIOS makes them: FSEG from 0xF0000 up, HIGH down from `top`."""

    def __init__(self, top: int = 0x7FE0000) -> None:
        self.fseg, self.high = 0xF0000, top
        self.calls: list[tuple[str, int, int, int]] = []

    def __call__(self, name: str, size: int, align: int, zone: int) -> int:
        self.calls.append((name, size, align, zone))
        if zone == L.ZONE_FSEG:
            addr = (self.fseg + align - 1) & ~(align - 1)
            self.fseg = addr + size
            return addr
        self.high = (self.high - size) & ~(align - 1)
        return self.high


def load(n: int, top: int = 0x7FE0000) -> tuple[dict[str, L.Loaded], Placer]:
    fw = L.firmware_acpi(n, MEM)
    place = Placer(top)
    return L.run(L.decode(fw.loader), fw.files(), place), place


def walk(loaded: dict[str, L.Loaded]) -> dict[bytes, tuple[int, bytes]]:
    """Follow the pointers from the RSDP as an OS does: signature -> (address, table)."""
    mem: dict[int, bytes] = {f.addr: bytes(f.data) for f in loaded.values()}

    def at(addr: int, length: int) -> bytes:
        for base, data in mem.items():
            if base <= addr and addr + length <= base + len(data):
                return data[addr - base : addr - base + length]
        raise AssertionError(f"{addr:#x}+{length} is in no loaded file")

    rsdp = bytes(loaded[L.RSDP_FILE].data)
    out = {b"RSD ": (loaded[L.RSDP_FILE].addr, rsdp)}

    def table(addr: int) -> bytes:
        length = struct.unpack("<I", at(addr + 4, 4))[0]
        return at(addr, length)

    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = table(xsdt_addr)
    out[b"XSDT"] = (xsdt_addr, xsdt)
    for (ptr,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = table(ptr)
        out[t[:4]] = (ptr, t)
    fadt = out[b"FACP"][1]
    (dsdt32,) = struct.unpack_from("<I", fadt, 40)
    facs_addr, dsdt_addr = struct.unpack_from("<QQ", fadt, 132)
    assert dsdt32 == dsdt_addr
    out[b"DSDT"] = (dsdt_addr, table(dsdt_addr))
    out[b"FACS"] = (facs_addr, at(facs_addr, 64))
    return out


@pytest.mark.parametrize("n", [1, 2, 16, 254])
def test_the_script_allocates_links_and_checksums_as_qemus_does(n):
    loaded, place = load(n)
    # the RSDP in the F segment, 16-byte aligned; the tables in high memory, 64-byte aligned
    assert [(c[0], c[2], c[3]) for c in place.calls] == [
        (L.RSDP_FILE, 16, L.ZONE_FSEG),
        (L.TABLES_FILE, 64, L.ZONE_HIGH),
    ]
    rsdp = loaded[L.RSDP_FILE]
    assert 0xF0000 <= rsdp.addr < 0x100000 and rsdp.addr % 16 == 0
    assert loaded[L.TABLES_FILE].addr % 64 == 0
    tables = walk(loaded)
    assert set(tables) == {b"RSD ", b"XSDT", b"FACP", b"FACS", b"APIC", b"MCFG", b"DSDT"}
    r = tables[b"RSD "][1]
    assert r[:8] == b"RSD PTR " and sum(r[:20]) & 0xFF == 0 and sum(r) & 0xFF == 0
    assert struct.unpack_from("<I", r, 16)[0] == 0  # no RSDT: a zero pointer stays zero
    for sig, (_, data) in tables.items():
        if sig not in (b"RSD ", b"FACS"):
            assert sum(data) & 0xFF == 0, sig
    assert tables[b"FACS"][0] % 64 == 0


@pytest.mark.parametrize("n,top", [(1, 0x7FE0000), (4, 0xBFFE0000), (254, 0x1000000)])
def test_loaded_tables_are_corrals_tables_for_those_addresses(n, top):
    """Byte for byte: the tables a firmware ends up with are what corral builds for direct boot
    when laid out where the firmware put them (the RSDP aside, which lives in its own file)."""
    loaded, _ = load(n, top)
    base = loaded[L.TABLES_FILE].addr  # the tables file starts with the RSDP's 64 bytes
    direct = acpi.machine_acpi_tables(n, MEM, base=base)
    mine = walk(loaded)
    for addr, data in direct.blobs:
        if data[:4] == b"RSD ":
            assert bytes(loaded[L.RSDP_FILE].data) == acpi.rsdp(struct.unpack_from("<Q", data, 24)[0])
            continue
        assert mine[data[:4]] == (addr, data), data[:4]


def test_the_script_round_trips_and_entries_are_128_bytes():
    fw = L.firmware_acpi(2, MEM)
    cmds = L.decode(fw.loader)
    assert len(fw.loader) == 128 * len(cmds) and L.encode(cmds) == fw.loader
    assert fw.loader[:4] == struct.pack("<I", L.ALLOCATE)
    assert fw.loader[4 : 4 + 56].rstrip(b"\0") == b"etc/acpi/rsdp"
    # pointers are offsets into the tables file, which starts with 64 zero bytes (FACS at 64)
    assert fw.tables[:64] == bytes(64) and fw.tables[64:68] == b"FACS"
    assert struct.unpack_from("<Q", fw.rsdp, 24)[0] < len(fw.tables)


def _entry(cmd: int, body: bytes) -> bytes:
    return (struct.pack("<I", cmd) + body).ljust(128, b"\0")


def _name(s: bytes) -> bytes:
    return s.ljust(56, b"\0")


ALLOC_T = _entry(L.ALLOCATE, _name(b"etc/acpi/tables") + struct.pack("<IB", 64, 1))


@pytest.mark.parametrize(
    "blob,why",
    [
        (b"\0" * 100, "whole number"),
        (_entry(L.ALLOCATE, _name(b"nope") + struct.pack("<IB", 16, 1)), "no fw_cfg file"),
        (_entry(L.ALLOCATE, _name(b"etc/acpi/tables") + struct.pack("<IB", 3, 1)), "power of 2"),
        (_entry(L.ALLOCATE, _name(b"etc/acpi/tables") + struct.pack("<IB", 16, 9)), "zone"),
        (ALLOC_T * 2, "twice"),
        (_entry(L.ADD_POINTER, _name(b"etc/acpi/tables") * 2 + struct.pack("<IB", 0, 8)), "before"),
        (
            ALLOC_T + _entry(L.ADD_POINTER, _name(b"etc/acpi/tables") * 2 + struct.pack("<IB", 1 << 31, 8)),
            "outside",
        ),
        (
            ALLOC_T + _entry(L.ADD_POINTER, _name(b"etc/acpi/tables") * 2 + struct.pack("<IB", 0, 3)),
            "outside",
        ),
        (
            ALLOC_T + _entry(L.ADD_CHECKSUM, _name(b"etc/acpi/tables") + struct.pack("<III", 0, 10, 1 << 31)),
            "outside",
        ),
        (_entry(L.WRITE_POINTER, b""), "WRITE_POINTER"),
        (_entry(L.ALLOCATE, _name(b"\xff\xfe")), "not text"),
    ],
)
def test_bad_scripts_are_one_line(blob, why):
    fw = L.firmware_acpi(1, MEM)
    with pytest.raises(L.TableLoaderError, match=why) as e:
        L.run(L.decode(blob), fw.files(), Placer())
    assert "\n" not in str(e.value)


def test_unknown_commands_are_skipped_as_firmware_skips_them():
    fw = L.firmware_acpi(1, MEM)
    assert L.decode(_entry(0x77, b"junk") + fw.loader) == L.decode(fw.loader)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_scripts_run_or_fail_with_one_line(data):
    fw = L.firmware_acpi(2, MEM)
    blob = bytearray(fw.loader)
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob))) :]
    try:
        L.run(L.decode(bytes(blob)), fw.files(), Placer())
    except L.TableLoaderError as exc:
        assert "\n" not in str(exc)
