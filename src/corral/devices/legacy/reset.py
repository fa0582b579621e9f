"""The reset control register at port 0xCF9 (PIIX/ICH "RCR"; the FADT's RESET_REG).

One port. A write with bit 2 (reset CPU) set calls `ctl.request_reset()`: the FADT tells the
guest to write 0x06, and Linux's "reboot=pci" writes 0x02 then 0x06 (bit 1, hard vs. soft
reset, is kept but makes no difference: every reset is a full reboot). Reads return the stored
bits 1 and 3; bit 2 reads 0. Bytes of a wider access past the one port read 0xFF and are
otherwise ignored (0xCF8-0xCFF also hold the PCI configuration ports, owned elsewhere).
No lock: the only state is one attribute, replaced atomically.
"""

from __future__ import annotations

from typing import ClassVar

from corral.devices.base import DeviceState, VmControl
from corral.devices.legacy._common import ONES, Byte
from corral.lazymodel import Field

RCR_SYS_RST = 0x02
RCR_RST_CPU = 0x04
RCR_FULL_RST = 0x08
RCR_STORED = RCR_SYS_RST | RCR_FULL_RST


class ResetRegisterState(DeviceState):
    value: Byte = Field(default=0, description="the reset control register's stored bits (SYS_RST, FULL_RST)")


class ResetRegister:
    """Reset control register; port 0xCF9 (1 port)."""

    state_model: ClassVar[type[ResetRegisterState]] = ResetRegisterState

    def __init__(self, ctl: VmControl) -> None:
        self._ctl = ctl
        self._value = 0

    def pio_read(self, offset: int, size: int) -> int:
        if offset != 0:
            return ONES[size]
        return (ONES[size] & ~0xFF) | self._value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        value &= 0xFF
        self._value = value & RCR_STORED
        if value & RCR_RST_CPU:
            self._ctl.request_reset()

    def save_state(self) -> ResetRegisterState:
        return ResetRegisterState(value=self._value)

    def load_state(self, state: ResetRegisterState) -> None:
        self._value = state.value & RCR_STORED
