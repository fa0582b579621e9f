"""Port sinks: the port-0x80 POST-code port and the probe guest's benchmark port (0x504).

Writes are accepted and ignored (firmware writes POST codes to port 0x80, and Linux on bare
metal uses it for I/O delays; the probe guest hammers 0x504 to time the exit path); reads return
all ones, as QEMU's port-0x80 device does. A sink keeps nothing, so the port bus serves its
ports itself, without calling it (`pio_sink`, devices/bus.py): an exit to it costs no Python,
in either vCPU loop, as an exit to QEMU's port-0x80 device costs it no device code.
"""

from __future__ import annotations

from typing import ClassVar

from corral.devices.base import DeviceState
from corral.devices.legacy._common import ONES


class PostSinkState(DeviceState):
    """Nothing: a sink keeps no state."""


class PostSink:
    """Accept-and-ignore port; any base, any span (0x80 and 0x504 are 1 port each)."""

    __slots__ = ()
    state_model: ClassVar[type[PostSinkState]] = PostSinkState
    pio_sink: ClassVar[bool] = True  # the bus serves it: reads all ones, writes dropped

    def pio_read(self, offset: int, size: int) -> int:
        return ONES[size]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        pass

    def save_state(self) -> PostSinkState:
        return PostSinkState()

    def load_state(self, state: PostSinkState) -> None:
        pass
