"""corral: a hosted hypervisor on Linux KVM.

from corral import Machine, MachineConfig
result = Machine(MachineConfig(kernel="probe.elf", cmdline="hello")).run()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral._version import __version__ as __version__

if TYPE_CHECKING:
    from corral.config import MachineConfig
    from corral.errors import ConfigError, CorralError, HostError, KernelFormatError
    from corral.machine import ExitResult, Machine, WarmVm

_EXPORTS = {
    "MachineConfig": "corral.config",
    "Machine": "corral.machine",
    "ExitResult": "corral.machine",
    "WarmVm": "corral.machine",
    "ConfigError": "corral.errors",
    "CorralError": "corral.errors",
    "HostError": "corral.errors",
    "KernelFormatError": "corral.errors",
}
__all__ = [
    "ConfigError",
    "CorralError",
    "ExitResult",
    "HostError",
    "KernelFormatError",
    "Machine",
    "MachineConfig",
    "WarmVm",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so `corral --help` and the CLI's start-up do not pay for modules they do not use.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
