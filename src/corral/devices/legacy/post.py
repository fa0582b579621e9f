"""Port sinks: the port-0x80 POST-code port and the probe guest's benchmark port (0x504).

Writes are accepted and otherwise ignored (Linux uses port 0x80 for I/O delays; the probe guest
hammers 0x504 to time the exit path); the last value written is kept in `last` for debugging.
Reads return all ones, as QEMU's port-0x80 device does. No lock: the only state is one
attribute, replaced atomically.
"""

from __future__ import annotations

from typing import ClassVar

from corral.devices.base import U32, DeviceState
from corral.devices.legacy._common import ONES
from corral.lazymodel import Field


class PostSinkState(DeviceState):
    last: U32 = Field(default=0, description="the last value written (1 to 4 bytes)")


class PostSink:
    """Accept-and-ignore port; any base, any span (0x80 and 0x504 are 1 port each)."""

    __slots__ = ("last",)
    state_model: ClassVar[type[PostSinkState]] = PostSinkState

    def __init__(self) -> None:
        self.last = 0

    def pio_read(self, offset: int, size: int) -> int:
        return ONES[size]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.last = value

    def save_state(self) -> PostSinkState:
        return PostSinkState(last=self.last)

    def load_state(self, state: PostSinkState) -> None:
        self.last = state.last
