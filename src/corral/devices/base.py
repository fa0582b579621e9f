"""What every device is: a handler for bus accesses plus a plain, serializable state.

Devices never touch KVM. They receive guest memory and interrupt lines from the machine, and
report machine-level events (exit status, poweroff, reset) through `VmControl`.

The state contract (Firecracker's `Persist`, Cloud Hypervisor's `Snapshottable`): every stateful
component declares `state_model`, a `DeviceState` subclass, and implements `save_state() -> S`
and `load_state(state: S)`. The caller (the machine for its components, `VirtioPciDevice` for
the device it carries) validates saved data through the declared model,
`dev.load_state(dev.state_model.model_validate(data))`, so `load_state` always receives the
right, checked model. A state model names and documents every field, refuses unknown ones and
bounds integers to their register widths; data that does not fit raises one `StateError` line.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Annotated, Any, Protocol, Self, TypeVar, runtime_checkable

from corral.errors import CorralError
from corral.lazymodel import BaseModel, ConfigDict, Field, lazy_metadata, quick_init

if TYPE_CHECKING:
    from pydantic import ValidationError


def _bytes_in(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # from JSON: base64
        return base64.b64decode(value, validate=True)
    raise ValueError("expected bytes or a base64 string")


def _bytes_codec() -> tuple[object, ...]:
    from pydantic import PlainSerializer, PlainValidator

    return (
        PlainValidator(_bytes_in),
        PlainSerializer(lambda b: base64.b64encode(b).decode(), return_type=str, when_used="json"),
    )


# Raw bytes in a state model: bytes in Python, base64 in JSON, and either accepted on the way
# in (pydantic's Base64Bytes would also base64-decode bytes handed over from Python). Its
# validator is pydantic's, made when a state model is first built (corral.lazymodel).
StateBytes = Annotated[bytes, lazy_metadata(_bytes_codec)]


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

    def request_suspend(self) -> None:
        """Suspend to RAM (ACPI S3): stop the vCPUs until the host wakes the machine."""


# integers as wide as the registers they hold
U8 = Annotated[int, Field(ge=0, le=0xFF)]
U16 = Annotated[int, Field(ge=0, le=0xFFFF)]
U32 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF)]
U64 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF_FFFF_FFFF)]


class StateError(CorralError, ValueError):
    """Saved state that does not fit the component loading it (damaged, or another layout)."""


def _describe(model: type[BaseModel], exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "(whole)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return (
        f"saved {model.__name__} does not fit this machine: {where}: {err['msg']}{more}; "
        "the state is damaged or was saved by another build"
    )


@quick_init  # devices start from their model's defaults at every launch: no pydantic for that
class DeviceState(BaseModel):
    """Base for each component's plain state; snapshot and migration serialize these.

    Unknown fields are refused (a damaged or foreign snapshot is not half-loaded), and a
    validation failure is one `StateError` line, not a pydantic report. Each state model is a
    lazy model (corral.lazymodel): its class becomes pydantic's on first use and its validator
    is built on first validation (`defer_build`): a launch never saves or loads state, so it
    neither imports pydantic for them nor pays for the schemas of every device it might."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        from pydantic import ValidationError

        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise StateError(_describe(cls, exc)) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any) -> Self:
        from pydantic import ValidationError

        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as exc:
            raise StateError(_describe(cls, exc)) from None


class NoState(DeviceState):
    """The state of a component with nothing to carry (or whose transport carries it all)."""


S = TypeVar("S", bound=DeviceState)


@runtime_checkable
class PioDevice(Protocol):
    """A device on the port-I/O bus. `offset` is relative to the device's base port.

    A device may set a class attribute `pio_sink = True`: it keeps nothing, reads all ones and
    drops writes, and the bus then serves its ports without calling it (devices/bus.py)."""

    def pio_read(self, offset: int, size: int) -> int: ...

    def pio_write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class MmioDevice(Protocol):
    """A device on the MMIO bus. `offset` is relative to the device's base address."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class Stateful(Protocol[S]):
    """Components whose state snapshot/restore and migration carry.

    Implementations declare `state_model: ClassVar[type[XState]] = XState` (a protocol cannot
    hold a type variable in a ClassVar, hence the read-only property here)."""

    @property
    def state_model(self) -> type[S]:
        """The model `load_state` takes; callers validate saved data through it."""

    def save_state(self) -> S:
        """The component's state now (the machine is paused, or the device idle)."""

    def load_state(self, state: S) -> None:
        """Take `state` (already validated through `state_model`) on a freshly built component."""
