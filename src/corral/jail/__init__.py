"""The jailer: each VMM process in its own namespaces, root, uid and cgroups (as Firecracker's
jailer), so a VMM a guest has taken over reaches only what its VM was given.

`corral jail -- run ...` and `corral run --jail` come here. The pieces: options (what the
operator asks), mapping (a VM's config as paths inside its jail), rootfs (the minimal root),
cgroups (v1 or v2, per controller), linux (the calls Python 3.11's os lacks), launch (the
start sequence, in order), debug (the compromised-VMM simulation the attack tests use).
"""

from corral.jail.launch import Jail, JailError, JailReport, JailSpec, JailStepError, enter_jail, release_uid
from corral.jail.mapping import Inner, map_firecracker, map_run
from corral.jail.options import JailOptions

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
