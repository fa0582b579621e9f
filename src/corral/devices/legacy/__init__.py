"""Legacy PC devices on the port-I/O bus: UART, i8042, CMOS RTC, ACPI PM, reset and exit ports.

Each device is a plain object with `pio_read(offset, size)` / `pio_write(offset, size, value)`
(offset relative to the base port the machine registers it at), `save_state()` returning a
pydantic `DeviceState` and `load_state(state)`. Devices never touch KVM: they drive `IrqLine`s
and report machine events through `VmControl`, after releasing their lock.

    device          base port       ports  irq   class
    COM1 16550A     0x3F8           8      4     Serial16550(irq, out)
    i8042           0x60 and 0x64   1 + 1  1     I8042(ctl, irq1)     (offsets 0 and 4)
    CMOS RTC        0x70            2      8     CmosRtc(irq8, clock, mem_size)
    POST / bench    0x80, 0x504     1      -     PostSink()
    debug exit      0x501 (config)  2      -     DebugExit(ctl)
    fw_cfg          0x510           12     -     FwCfg(memory)        (DMA at 0x514)
    ACPI PM         0x600           12     9     AcpiPm(ctl, sci, clock)
    reset register  0xCF9           1      -     ResetRegister(ctl)

The ISA devices (UART, i8042, RTC) treat a 2- or 4-byte access as that many byte accesses to
consecutive ports, lowest first, as an ISA bus would; bytes past a device's ports read 0xFF and
ignore writes. No access raises: guests cannot make a device throw.
"""

from corral.devices.legacy.acpi_pm import AcpiPm, AcpiPmState
from corral.devices.legacy.debug_exit import DebugExit, DebugExitState
from corral.devices.legacy.fw_cfg import FwCfg, FwCfgState
from corral.devices.legacy.i8042 import I8042, I8042State
from corral.devices.legacy.post import PostSink, PostSinkState
from corral.devices.legacy.reset import ResetRegister, ResetRegisterState
from corral.devices.legacy.rtc import CmosRtc, RtcState
from corral.devices.legacy.uart import Serial16550, SerialState

__all__ = [
    "I8042",
    "AcpiPm",
    "AcpiPmState",
    "CmosRtc",
    "DebugExit",
    "DebugExitState",
    "FwCfg",
    "FwCfgState",
    "I8042State",
    "PostSink",
    "PostSinkState",
    "ResetRegister",
    "ResetRegisterState",
    "RtcState",
    "Serial16550",
    "SerialState",
]
