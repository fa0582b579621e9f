"""An exit port compatible with QEMU's isa-debug-exit (iobase 0x501, 2 ports).

A write of any size at either port stops the machine: `ctl.request_exit(value & 0xFF)`, so the
VMM exits with the low byte of the value written. This differs from QEMU, which exits with
`(value << 1) | 1`: with corral, `outb(0x501, 0)` means success and any other byte is the
status itself. Reads return all ones (nothing to read).
"""

from __future__ import annotations

from typing import ClassVar

from corral.devices.base import DeviceState, VmControl
from corral.devices.legacy._common import ONES

SPAN = 2


class DebugExitState(DeviceState):
    """Nothing: the port only reacts to writes."""


class DebugExit:
    """isa-debug-exit-style exit port; ports 0x501-0x502."""

    state_model: ClassVar[type[DebugExitState]] = DebugExitState

    def __init__(self, ctl: VmControl) -> None:
        self._ctl = ctl

    def pio_read(self, offset: int, size: int) -> int:
        return ONES[size]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset < SPAN:
            self._ctl.request_exit(value & 0xFF)

    def save_state(self) -> DebugExitState:
        return DebugExitState()

    def load_state(self, state: DebugExitState) -> None:
        pass
