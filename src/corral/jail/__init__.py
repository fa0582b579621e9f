"""The jailer: each VMM process in its own namespaces, root, uid and cgroups (as Firecracker's
jailer), so a VMM a guest has taken over reaches only what its VM was given.

`corral jail -- run ...` and `corral run --jail` come here. The pieces: options (what the
operator asks), mapping (a VM's config as paths inside its jail), rootfs (the minimal root),
cgroups (v1 or v2, per controller), linux (the calls Python 3.11's os lacks), launch (the
start sequence, in order), debug (the compromised-VMM simulation the attack tests use).

The names below are imported on first use: every `corral run` imports `corral.jail.debug`
(to look for a debug hook), and a plain launch should not pay for the start sequence.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.jail.launch import (
        Jail,
        JailError,
        JailReport,
        JailSpec,
        JailStepError,
        enter_jail,
        release_uid,
    )
    from corral.jail.mapping import Inner, map_firecracker, map_run
    from corral.jail.options import JailOptions

_HOME = {
    **dict.fromkeys(
        ("Jail", "JailError", "JailReport", "JailSpec", "JailStepError", "enter_jail", "release_uid"),
        "corral.jail.launch",
    ),
    **dict.fromkeys(("Inner", "map_firecracker", "map_run"), "corral.jail.mapping"),
    "JailOptions": "corral.jail.options",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'corral.jail' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Inner",
    "Jail",
    "JailError",
    "JailOptions",
    "JailReport",
    "JailSpec",
    "JailStepError",
    "enter_jail",
    "map_firecracker",
    "map_run",
    "release_uid",
]
