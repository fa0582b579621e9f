"""The MBR that bootdisk.py writes is what a BIOS boot loader reads back: partitions, the active
flag, the signature; bad layouts and multi-line command lines are refused with one line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import ConfigError
from corral.images.bootdisk import SECTOR, Partition, mbr, parse_mbr, syslinux_cfg


@st.composite
def layouts(draw):
    parts, pos = [], SECTOR * draw(st.integers(1, 4096))
    for _ in range(draw(st.integers(0, 4))):
        size = SECTOR * draw(st.integers(1, 1 << 20))
        parts.append(Partition(pos, size, draw(st.integers(1, 255)), draw(st.booleans())))
        pos += size + SECTOR * draw(st.integers(0, 64))
    return parts


@given(layouts(), st.binary(max_size=440))
def test_an_mbr_reads_back_as_written(parts, code):
    sector = mbr(code, parts)
    assert len(sector) == SECTOR and sector[: len(code)] == code and sector[510:] == b"\x55\xaa"
    assert parse_mbr(sector) == parts


def test_bad_layouts_are_refused():
    with pytest.raises(ConfigError, match="at most 440"):
        mbr(b"x" * 441, [])
    with pytest.raises(ConfigError, match="at most four"):
        mbr(b"", [Partition(SECTOR * (i + 1), SECTOR, 0x83) for i in range(5)])
    with pytest.raises(ConfigError, match="overlaps"):
        mbr(b"", [Partition(SECTOR, 4 * SECTOR, 0x83), Partition(2 * SECTOR, SECTOR, 0x83)])
    with pytest.raises(ConfigError, match="not sector-aligned"):
        mbr(b"", [Partition(SECTOR + 1, SECTOR, 0x83)])
    with pytest.raises(ConfigError, match="past 2 TiB"):
        mbr(b"", [Partition(SECTOR, SECTOR * 0xFFFFFFFF, 0x83)])
    with pytest.raises(ConfigError, match="not an MBR"):
        parse_mbr(bytes(SECTOR))


def test_syslinux_cfg_boots_the_kernel_on_the_serial_console():
    cfg = syslinux_cfg("console=ttyS0 root=/dev/vda2", initrd=True)
    assert cfg.splitlines()[0] == "SERIAL 0 115200"
    assert "  INITRD /initrd.img" in cfg and "  APPEND console=ttyS0 root=/dev/vda2" in cfg
    assert "INITRD" not in syslinux_cfg("quiet", initrd=False)
    with pytest.raises(ConfigError, match="one line"):
        syslinux_cfg("quiet\nDEFAULT evil", initrd=False)
