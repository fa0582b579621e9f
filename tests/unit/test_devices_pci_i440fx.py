"""The i440FX host bridge (corral.devices.pci.i440fx): the identity SeaBIOS looks for at
00:00.0 and PAM registers that keep what the guest writes, masked to their defined bits."""

from __future__ import annotations

import itertools

from corral.devices.bus import MmioBus
from corral.devices.pci.i440fx import PAM0, PAM_SEGMENTS, SHADOW_END, SHADOW_START, I440fxHostBridge
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


class Shadow:
    """Records what the bridge asks of the memory slots: gpa -> read-only."""

    def __init__(self) -> None:
        self.readonly: dict[int, bool] = {}

    def set_readonly(self, gpa: int, readonly: bool) -> None:
        self.readonly[gpa] = readonly


def test_pam_segments_cover_the_shadow_area_in_qemus_layout():
    spans = sorted((gpa, gpa + size) for gpa, size, _, _ in PAM_SEGMENTS)
    assert spans[0][0] == SHADOW_START and spans[-1][1] == SHADOW_END
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    fields = {gpa: (reg, shift) for gpa, _, reg, shift in PAM_SEGMENTS}
    assert fields[0xF0000] == (0x59, 4)
    assert fields[0xC0000] == (0x5A, 0) and fields[0xC4000] == (0x5A, 4)
    assert fields[0xEC000] == (0x5F, 4)


def test_the_write_bits_drive_the_slots_and_state_restores_them():
    shadow = Shadow()
    bridge = I440fxHostBridge(shadow)
    ports = ConfigPorts(PciRoot(MmioBus(), bridge))
    segs = [gpa for gpa, _, _, _ in PAM_SEGMENTS]
    assert shadow.readonly == dict.fromkeys(segs, True)  # power-on: the area takes no writes
    cfg_write(ports, 0x58, 4, 0x3333_3000)  # unlock, as SeaBIOS does
    cfg_write(ports, 0x5C, 4, 0x3333_3333)
    assert shadow.readonly == dict.fromkeys(segs, False)
    cfg_write(ports, PAM0, 1, 0x10)  # F segment: read RAM, writes dropped
    cfg_write(ports, PAM0 + 5, 1, 0x31)  # E0000 read-only, E4000 read/write
    cfg_write(ports, PAM0 + 6, 1, 0x23)  # E8000 read/write, EC000 write only (takes writes)
    want = dict.fromkeys(segs, False) | {0xF0000: True, 0xE0000: True}
    assert shadow.readonly == want
    state = ports.root.save_state()
    twin_shadow = Shadow()
    twin = PciRoot(MmioBus(), I440fxHostBridge(twin_shadow))
    twin.load_state(state)
    assert twin_shadow.readonly == want
