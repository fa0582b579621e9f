"""The i440FX host bridge identity (00:00.0, 8086:1237) that PC firmware looks for.

Why: SeaBIOS decides it runs on a QEMU-style PC by the host bridge at 00:00.0: it reads the
vendor/device pair (8086:1237, i440FX) and the subsystem ids QEMU gives it (1af4:1100), then
unlocks the BIOS shadow area through the bridge's PAM registers, copies itself there from the
ROM at 4 GiB, places the PCI BARs above RAM and locks the shadow area again. Without this
identity it skips its PCI setup and the copy.

PAM (Programmable Attribute Map), config bytes 0x59-0x5F: 0x59 bits 4-5 for 0xF0000-0xFFFFF,
then two 16 KiB segments per byte (bits 0-1 and 4-5) for 0xC0000-0xEFFFF; in each field bit 0
enables reads from RAM and bit 1 writes. corral keeps the area as RAM that holds the ROM's tail
from power-on (boot/firmware.py), so reads always see RAM (which is what the ROM alias shows
until the BIOS has copied itself); the write bit decides whether a segment takes writes: each
segment is its own memory slot, mapped read-only while its write bit is clear (power-on, and
after SeaBIOS locks itself), and guest writes there are dropped, as the chipset drops them.
Approximated: "write-only" (2) reads the RAM, not the ROM. Not modelled: SMRAM (0x72).
"""

from __future__ import annotations

from typing import Protocol

from corral.devices.pci.config import PciConfig
from corral.devices.pci.root import HostBridge

VENDOR_INTEL, DEVICE_I440FX = 0x8086, 0x1237
SUBSYS_VENDOR_QEMU, SUBSYS_ID_QEMU = 0x1AF4, 0x1100  # what QEMU's machines carry
CLASS_HOST_BRIDGE = 0x060000
REVISION = 0x02
PAM0 = 0x59  # PAM0..PAM6: 0x59..0x5F
PAM_COUNT = 7
PAM_MASK = (0x30,) + (0x33,) * 6  # PAM0 has only its high nibble (0xF0000)
PAM_WRITE = 0b10  # in each 2-bit field: writes go to RAM
KiB = 1024
# (gpa, size, PAM register, bit shift of its field)
PAM_SEGMENTS: tuple[tuple[int, int, int, int], ...] = (
    *((0xC0000 + i * 16 * KiB, 16 * KiB, PAM0 + 1 + i // 2, 4 * (i % 2)) for i in range(12)),
    (0xF0000, 64 * KiB, PAM0, 4),
)
SHADOW_START, SHADOW_END = 0xC0000, 0x100000


class ShadowMemory(Protocol):
    """What the bridge is handed to protect the shadow area (the VM's memory slots)."""

    def set_readonly(self, gpa: int, readonly: bool) -> None: ...


class I440fxHostBridge(HostBridge):
    """00:00.0 as an i440FX with writable PAM registers; no BARs (HostBridge's)."""

    def __init__(self, shadow: ShadowMemory | None = None) -> None:
        """`shadow`: each PAM segment's write bit goes there (None: only the registers)."""
        self.shadow = shadow
        self.config = PciConfig(
            vendor=VENDOR_INTEL,
            device=DEVICE_I440FX,
            class_code=CLASS_HOST_BRIDGE,
            revision=REVISION,
            subsys_vendor=SUBSYS_VENDOR_QEMU,
            subsys_id=SUBSYS_ID_QEMU,
        )
        for i, mask in enumerate(PAM_MASK):
            self.config.wmask[PAM0 + i] = mask

    def pam(self) -> bytes:
        """PAM0..PAM6 as the guest last wrote them."""
        return bytes(self.config.data[PAM0 : PAM0 + PAM_COUNT])

    def writable(self) -> list[tuple[int, int, bool]]:
        """(gpa, size, writable) of each PAM segment, as the registers say now."""
        data = self.config.data
        return [(gpa, size, bool(data[reg] >> shift & PAM_WRITE)) for gpa, size, reg, shift in PAM_SEGMENTS]

    def _apply(self) -> None:
        if self.shadow is not None:
            for gpa, _, writable in self.writable():
                self.shadow.set_readonly(gpa, not writable)

    def config_written(self, offset: int, size: int) -> None:
        if offset < PAM0 + PAM_COUNT and offset + size > PAM0:
            self._apply()

    def bars_moved(self, addresses: list[int | None]) -> None:
        """The bus calls this when the bridge is added and after its state is loaded: the
        memory slots follow the registers then too."""
        self._apply()


__all__ = [
    "DEVICE_I440FX",
    "PAM0",
    "PAM_SEGMENTS",
    "SHADOW_END",
    "SHADOW_START",
    "I440fxHostBridge",
    "ShadowMemory",
]
