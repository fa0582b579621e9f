"""The i440FX host bridge identity (00:00.0, 8086:1237) that PC firmware looks for.

Why: SeaBIOS decides it runs on a QEMU-style PC by the host bridge at 00:00.0: it reads the
vendor/device pair (8086:1237, i440FX) and the subsystem ids QEMU gives it (1af4:1100), then
unlocks the BIOS shadow area through the bridge's PAM registers, copies itself there from the
ROM at 4 GiB, places the PCI BARs above RAM and locks the shadow area again. Without this
identity it skips its PCI setup and the copy.

PAM (Programmable Attribute Map), config bytes 0x59-0x5F: 0x59 bits 4-5 for 0xF0000-0xFFFFF,
then two 16 KiB segments per byte (bits 0-1 and 4-5) for 0xC0000-0xEFFFF; in each field bit 0
enables reads from RAM and bit 1 writes. corral keeps 0xC0000-0xFFFFF as ordinary RAM that
holds the ROM's tail from power-on (boot/firmware.py), so reads see the BIOS whatever PAM says
and writes always land; the registers keep what the guest writes (masked to the defined bits),
which is all SeaBIOS needs to boot. Not modelled: write protection once PAM locks the area, and
SMRAM (0x72).
"""

from __future__ import annotations

from corral.devices.pci.config import PciConfig
from corral.devices.pci.root import HostBridge

VENDOR_INTEL, DEVICE_I440FX = 0x8086, 0x1237
SUBSYS_VENDOR_QEMU, SUBSYS_ID_QEMU = 0x1AF4, 0x1100  # what QEMU's machines carry
CLASS_HOST_BRIDGE = 0x060000
REVISION = 0x02
PAM0 = 0x59  # PAM0..PAM6: 0x59..0x5F
PAM_COUNT = 7
PAM_MASK = (0x30,) + (0x33,) * 6  # PAM0 has only its high nibble (0xF0000)


class I440fxHostBridge(HostBridge):
    """00:00.0 as an i440FX with writable PAM registers; no BARs (HostBridge's)."""

    def __init__(self) -> None:
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


__all__ = ["DEVICE_I440FX", "PAM0", "I440fxHostBridge"]
