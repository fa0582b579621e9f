"""The AML encoder (corral.arch.x86.aml): package lengths, integers, names, EISA ids and the
resource descriptors the DSDT is built from, checked byte for byte."""

from __future__ import annotations

import pytest

from corral.arch.x86 import aml


def decode_pkg_length(enc: bytes) -> tuple[int, int]:
    """(encoded length value, bytes used) of a PkgLength."""
    follow = enc[0] >> 6
    if follow == 0:
        return enc[0] & 0x3F, 1
    assert enc[0] & 0x30 == 0, "bits 4-5 of a multi-byte PkgLength lead byte must be 0"
    value = enc[0] & 0x0F
    for i in range(follow):
        value |= enc[1 + i] << (4 + 8 * i)
    return value, 1 + follow


@pytest.mark.parametrize(
    "body,encoded",
    [
        (0, b"\x01"),
        (62, b"\x3f"),  # one byte: total <= 63
        (63, b"\x41\x04"),
        (64, b"\x42\x04"),  # two bytes from total 65
        (4093, b"\x4f\xff"),
        (4094, b"\x81\x00\x01"),  # two bytes up to total 4095
        (2**20 - 4, b"\x8f\xff\xff"),
        (2**20 - 3, b"\xc1\x00\x00\x01"),
        (1 << 20, b"\xc4\x00\x00\x01"),
        (2**28 - 5, b"\xcf\xff\xff\xff"),
    ],
)
def test_pkg_length_boundaries(body, encoded):
    enc = aml.pkg_length(body)
    assert enc == encoded
    value, used = decode_pkg_length(enc)
    assert used == len(enc) and value == body + len(enc)  # the length counts itself


def test_pkg_length_every_size_round_trips_up_to_64k():
    for body in range(0, 1 << 16, 7):
        enc = aml.pkg_length(body)
        value, used = decode_pkg_length(enc)
        assert value == body + used and used == len(enc)


def test_pkg_length_too_large():
    with pytest.raises(ValueError):
        aml.pkg_length(2**28)


@pytest.mark.parametrize(
    "v,enc",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        (2**64 - 1, b"\x0e" + b"\xff" * 8),
        (5, b"\x0a\x05"),
        (0x1234, b"\x0b\x34\x12"),
        (0x12345678, b"\x0c\x78\x56\x34\x12"),
        (1 << 40, b"\x0e" + (1 << 40).to_bytes(8, "little")),
    ],
)
def test_integer_encodings(v, enc):
    assert aml.integer(v) == enc


@pytest.mark.parametrize("v", [-1, 2**64])
def test_integer_out_of_range(v):
    with pytest.raises(ValueError):
        aml.integer(v)


@pytest.mark.parametrize(
    "pnp,value",
    [
        ("PNP0501", 0x0105D041),
        ("PNP0B00", 0x000BD041),
        ("PNP0303", 0x0303D041),
        ("PNP0C02", 0x020CD041),
        ("PNP0A03", 0x030AD041),
    ],
)
def test_eisa_ids(pnp, value):
    assert aml.eisa_id(pnp) == value


@pytest.mark.parametrize("bad", ["PNP050", "pnp0501", "PNP05G1", "PN10501", "PNP0x12"])
def test_bad_eisa_ids(bad):
    with pytest.raises(ValueError):
        aml.eisa_id(bad)


def test_names_and_strings():
    assert aml.name_seg("RTC") == b"RTC_" and aml.name_seg("_S5") == b"_S5_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.PCI0") == b"\\\x2e_SB_PCI0"
    assert aml.name_string("\\_SB_.PCI0.ISA_") == b"\\\x2f\x03_SB_PCI0ISA_"
    for bad in ("", "TOOLONG", "1ABC", "a.b", "AB-C", "abc"):
        with pytest.raises(ValueError):
            aml.name_seg(bad)
    assert aml.string("ACPI0007") == b"\x0dACPI0007\x00"
    with pytest.raises(ValueError):
        aml.string("a\0b")


def test_name_package_device_scope_encodings():
    assert aml.name("_UID", aml.integer(0)) == b"\x08_UID\x00"
    assert aml.package(aml.integer(5), aml.integer(0)) == b"\x12\x05\x02\x0a\x05\x00"
    dev = aml.device("COM1", aml.name("_UID", aml.integer(0)))
    assert dev == b"\x5b\x82\x0b" + b"COM1" + b"\x08_UID\x00"
    sc = aml.scope("\\_SB_", dev)
    assert sc == b"\x10" + aml.pkg_length(5 + len(dev)) + b"\\_SB_" + dev
    big = aml.scope("\\_SB_", *[aml.device(f"C{i:03X}") for i in range(40)])  # > 63 bytes
    value, used = decode_pkg_length(big[1:])
    assert 1 + value == len(big) and used == 2


def test_resource_descriptors():
    assert aml.io_port(0x3F8, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.irq_no_flags(1, 12) == b"\x22\x02\x10"
    with pytest.raises(ValueError):
        aml.irq_no_flags(16)
    with pytest.raises(ValueError):
        aml.io_port(0x10000, 1)
    rt = aml.resource_template(aml.irq_no_flags(4))
    # Buffer(5) {IRQNoFlags, EndTag with checksum byte 0 = "treat as valid"}; PkgLength 8
    # counts itself, the BufferSize term (0x0a 0x05) and the 5 data bytes
    assert rt == b"\x11\x08\x0a\x05\x22\x10\x00\x79\x00"
