"""The compromised-VMM simulation: run given Python code inside a (jailed) VMM process, so the
attack tests can try, from exactly where a guest escape would land, what the jail must refuse.

Two keys, both needed: the operator's environment variable CORRAL_DEBUG_HOOK=FILE.py, and a
build that carries corral.jail.debugbuild. That package exists in the source tree (the tests
run from it) and is left out of the wheel (pyproject.toml excludes it), so an installed corral
never runs a hook whatever its environment says. The jail clears the VMM's environment, so
nothing inside a VM can set the variable: the jailer passes it on only when this build allows
hooks, with FILE's directory mounted at /debug in the jail (writable: the hook's report goes
there). The code runs on its own thread beside the running VM, with `machine` in its globals.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.machine import Machine

HOOK_ENV = "CORRAL_DEBUG_HOOK"
JAIL_DIR = "/debug"

log = logging.getLogger("corral.jail")


def hooks_built_in() -> bool:
    """Whether this build may run debug hooks (the source tree: yes; a wheel: never)."""
    try:
        from corral.jail.debugbuild import DEBUG_HOOKS
    except ImportError:
        return False
    return DEBUG_HOOKS


def hook_for_jail() -> Path | None:
    """The hook file to pass into a jail, if both keys are there."""
    path = os.environ.get(HOOK_ENV)
    if not path or not hooks_built_in():
        return None
    return Path(path).absolute()


def start_debug_hook(machine: Machine | None) -> threading.Thread | None:
    """Run the hook file named by CORRAL_DEBUG_HOOK on a thread, if this build allows it.
    `machine` is None in a daemon's VM (the fork server starts the hook as the jailed child
    begins, before `corral firecracker` has a machine)."""
    path = os.environ.get(HOOK_ENV)
    if not path:
        return None
    if not hooks_built_in():
        log.warning("%s is set but this build runs no debug hooks: ignored", HOOK_ENV)
        return None
    code = compile(Path(path).read_text(), path, "exec")
    scope: dict[str, Any] = {"__name__": "__corral_debug_hook__", "__file__": path, "machine": machine}

    def run() -> None:
        try:
            exec(code, scope)
        except BaseException:  # the hook is test code: say what broke, keep the VMM
            log.exception("debug hook %s failed", path)

    t = threading.Thread(target=run, name="debug-hook", daemon=True)
    t.start()
    return t
