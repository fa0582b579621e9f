"""Small helpers shared by the legacy (ISA) devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from pydantic import Field

from corral.devices.base import DeviceState

Byte = Annotated[int, Field(ge=0, le=0xFF)]
Word = Annotated[int, Field(ge=0, le=0xFFFF)]

# all-ones value of an access of 1..8 bytes (what an unclaimed port reads as)
ONES = tuple((1 << (8 * n)) - 1 for n in range(9))

S = TypeVar("S", bound=DeviceState)
R = TypeVar("R")


def read_bytewise(read: Callable[[int], int], offset: int, size: int) -> int:
    """A `size`-byte port read built from one-byte register reads, lowest address first."""
    value = 0
    for i in range(size):
        value |= read(offset + i) << (8 * i)
    return value


def write_bytewise(write: Callable[[int, int], R], offset: int, size: int, value: int) -> list[R]:
    """A `size`-byte port write split into one-byte register writes, lowest address first;
    returns what each write returned."""
    return [write(offset + i, (value >> (8 * i)) & 0xFF) for i in range(size)]


def coerce_state(cls: type[S], state: DeviceState | dict) -> S:
    """`state` as a validated `cls`: an instance passes through, anything else is re-validated."""
    if isinstance(state, cls):
        return state
    if isinstance(state, dict):
        return cls.model_validate(state)
    return cls.model_validate(state.model_dump())
