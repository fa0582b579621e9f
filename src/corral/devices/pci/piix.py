"""The PIIX3/PIIX4 functions OVMF looks for beside an i440FX host bridge (QEMU's `-M pc`).

Why: OVMF on an i440FX expects the PIIX southbridge at 00:01: its ISA bridge (00:01.0), under
which its SIO driver finds COM1 for the serial console, and the PIIX4 power-management
function (00:01.3), whose PMBA register (0x40) says where the ACPI PM block is; OVMF's timer
library reads the ACPI PM timer there for every delay. corral's PM block is fixed at
layout.PM_BASE_PORT, so PMBA reads that with I/O enabled (PMREGMISC bit 0) and neither takes
writes: OVMF programs PMBA only when PMREGMISC says the block is off, so it keeps corral's.
"""

from __future__ import annotations

from corral.arch.x86 import layout
from corral.devices.pci.config import HEADER_TYPE, PciConfig
from corral.devices.pci.root import HostBridge

VENDOR_INTEL = 0x8086
DEVICE_PIIX3_ISA, DEVICE_PIIX4_PM = 0x7000, 0x7113
CLASS_ISA_BRIDGE, CLASS_BRIDGE_OTHER = 0x060100, 0x068000
MULTI_FUNCTION = 0x80
PMBA, PMREGMISC = 0x40, 0x80
PMBA_IO_SPACE, PMIOSE = 0x1, 0x1
SLOT, PM_FUNCTION = 1, 3


class PiixIsaBridge(HostBridge):
    """00:01.0: a PIIX3 ISA bridge, multi-function (the PM function is 00:01.3)."""

    def __init__(self) -> None:
        self.config = PciConfig(vendor=VENDOR_INTEL, device=DEVICE_PIIX3_ISA, class_code=CLASS_ISA_BRIDGE)
        self.config.data[HEADER_TYPE] = MULTI_FUNCTION


class PiixPm(HostBridge):
    """00:01.3: PIIX4 power management, its PM block enabled at corral's ports."""

    def __init__(self) -> None:
        self.config = PciConfig(
            vendor=VENDOR_INTEL, device=DEVICE_PIIX4_PM, class_code=CLASS_BRIDGE_OTHER, revision=0x03
        )
        self.config.data[PMBA : PMBA + 4] = (layout.PM_BASE_PORT | PMBA_IO_SPACE).to_bytes(4, "little")
        self.config.data[PMREGMISC] = PMIOSE


__all__ = ["PM_FUNCTION", "SLOT", "PiixIsaBridge", "PiixPm"]
