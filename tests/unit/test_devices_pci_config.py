"""A PCI function's configuration space (corral.devices.pci.config): capabilities, BAR definitions."""

from __future__ import annotations

import pytest

from corral.devices.pci.config import CAP_PTR, STATUS, STATUS_CAP_LIST, Bar, PciConfig


def test_capability_list():
    cfg = PciConfig(vendor=1, device=2, class_code=0)
    a = cfg.add_capability(0x09, b"\x10\x01\x02")
    b = cfg.add_capability(0x11, b"\x00" * 10, wmask=b"\x00\xc0")
    assert cfg.read(STATUS, 2) & STATUS_CAP_LIST
    assert cfg.read(CAP_PTR, 1) == a and cfg.read(a + 1, 1) == b and cfg.read(b + 1, 1) == 0
    assert cfg.read(b, 1) == 0x11 and b % 4 == 0
    cfg.write(b + 2, 2, 0xFFFF)
    assert cfg.read(b + 2, 2) == 0xC000


def test_bar_definitions_are_checked():
    cfg = PciConfig(vendor=1, device=2, class_code=0)
    with pytest.raises(ValueError):
        cfg.add_bar(Bar(0, 0x1001))
    with pytest.raises(ValueError):
        cfg.add_bar(Bar(5, 0x1000, mem64=True))
    cfg.add_bar(Bar(1, 0x1000))
    with pytest.raises(ValueError):
        cfg.add_bar(Bar(1, 0x1000))
