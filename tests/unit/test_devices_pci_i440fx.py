"""The i440FX host bridge (corral.devices.pci.i440fx): the identity SeaBIOS looks for at
00:00.0 and PAM registers that keep what the guest writes, masked to their defined bits."""

from __future__ import annotations

from corral.devices.bus import MmioBus
from corral.devices.pci.i440fx import PAM0, I440fxHostBridge
from corral.devices.pci.root import ConfigPorts, PciRoot


def cfg_read(ports: ConfigPorts, reg: int, size: int) -> int:
    ports.pio_write(0, 4, 0x8000_0000 | (reg & 0xFC))
    return ports.pio_read(4 + (reg & 3), size)


def cfg_write(ports: ConfigPorts, reg: int, size: int, value: int) -> None:
    ports.pio_write(0, 4, 0x8000_0000 | (reg & 0xFC))
    ports.pio_write(4 + (reg & 3), size, value)


def test_the_bridge_looks_like_qemus_i440fx():
    ports = ConfigPorts(PciRoot(MmioBus(), I440fxHostBridge()))
    assert cfg_read(ports, 0x00, 4) == 0x1237_8086
    assert cfg_read(ports, 0x2C, 4) == 0x1100_1AF4  # subsystem: QEMU's, which SeaBIOS checks
    assert cfg_read(ports, 0x08, 4) >> 8 == 0x060000  # class: host bridge
    assert cfg_read(ports, 0x00, 2) == 0x8086
    plain = ConfigPorts(PciRoot(MmioBus()))
    assert cfg_read(plain, 0x00, 4) != 0x1237_8086


def test_pam_registers_keep_the_defined_bits_as_seabios_writes_them():
    bridge = I440fxHostBridge()
    ports = ConfigPorts(PciRoot(MmioBus(), bridge))
    assert bridge.pam() == bytes(7)  # power-on: the BIOS area reads the ROM alias
    # SeaBIOS's unlock: dwords at 0x58 and 0x5C, PAM0 = 0x30 and the rest 0x33
    cfg_write(ports, 0x58, 4, 0x3333_30FF)
    cfg_write(ports, 0x5C, 4, 0x3333_3333)
    assert bridge.pam() == bytes([0x30] + [0x33] * 6)
    assert cfg_read(ports, 0x58, 1) == 0  # 0x58 is not a PAM register: unchanged
    # its lock, and reserved bits that stay clear
    cfg_write(ports, PAM0, 1, 0xFF)
    cfg_write(ports, PAM0 + 1, 1, 0xFF)
    assert bridge.pam()[:2] == bytes([0x30, 0x33])
    cfg_write(ports, PAM0, 1, 0x10)
    assert cfg_read(ports, 0x59, 1) == 0x10
