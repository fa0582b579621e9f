"""What every device is: a handler for bus accesses plus a plain, serializable state.

Devices never touch KVM. They receive guest memory and interrupt lines from the machine, and
report machine-level events (exit status, poweroff, reset) through `VmControl`.
"""

from __future__ import annotations

import base64
from typing import Annotated, Protocol, runtime_checkable

from pydantic import BaseModel, PlainSerializer, PlainValidator


def _bytes_in(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):              # from JSON: base64
        return base64.b64decode(value, validate=True)
    raise ValueError("expected bytes or a base64 string")


# Raw bytes in a state model: bytes in Python, base64 in JSON, and either accepted on the way
# in (pydantic's Base64Bytes would also base64-decode bytes handed over from Python).
StateBytes = Annotated[bytes, PlainValidator(_bytes_in),
                       PlainSerializer(lambda b: base64.b64encode(b).decode(), return_type=str,
                                       when_used="json")]


class IrqLine(Protocol):
    """One interrupt input of the interrupt controller."""

    def set_level(self, high: bool) -> None:
        """Drive a level-triggered line (UART, RTC, ...)."""

    def pulse(self) -> None:
        """Raise and lower the line once (edge-triggered)."""


class VmControl(Protocol):
    """Machine-level events a device may request. Safe to call from any thread."""

    def request_exit(self, status: int) -> None:
        """Stop the machine; the VMM exits with `status` (isa-debug-exit)."""

    def request_poweroff(self) -> None:
        """Stop the machine cleanly (ACPI S5); the VMM exits 0."""

    def request_reset(self) -> None:
        """Reboot the machine (i8042 pulse, ACPI reset register, triple fault)."""


class DeviceState(BaseModel):
    """Base for each device's plain state; snapshot and migration serialize these."""


@runtime_checkable
class PioDevice(Protocol):
    """A device on the port-I/O bus. `offset` is relative to the device's base port."""

    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class MmioDevice(Protocol):
    """A device on the MMIO bus. `offset` is relative to the device's base address."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class Stateful(Protocol):
    """Components whose state snapshot/restore and migration carry."""

    def save_state(self) -> DeviceState: ...

    def load_state(self, state: DeviceState) -> None: ...
