"""Small helpers shared by the legacy (ISA) devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from corral.devices.base import U8, U16

Byte = U8  # an 8-bit register, in state models
Word = U16  # a 16-bit register

# all-ones value of an access of 1..8 bytes (what an unclaimed port reads as)
ONES = tuple((1 << (8 * n)) - 1 for n in range(9))

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
