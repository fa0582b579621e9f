"""How the daemon starts a VM process: a small protocol, so the way can change (a fresh
interpreter today; a fork server that forks a warm, pre-imported template later) while the daemon
stays the same.

A launcher is given the `corral` command line of the VM (`["firecracker", "--api-sock", ...]`,
without the program name) and the file its stdout and stderr go to, and returns the new
process's pid. The process must be in a session of its own (setsid), so it outlives the daemon
and no terminal signal reaches it, and should be the daemon's child when it can be, so the daemon
learns its exit status (a VM whose parent is not the daemon is reported dead without one).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from corral.errors import CorralError


class LaunchError(CorralError):
    """A VM process that could not be started."""


class Launcher(Protocol):
    def launch(self, args: list[str], *, log_path: Path) -> int:
        """Start `corral ARGS...` in its own session, stdout and stderr appended to `log_path`
        (created 0600), stdin /dev/null; return its pid."""
        ...


class SpawnLauncher:
    """A fresh `python -m corral` per VM through posix_spawn (no fork of the threaded daemon)."""

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None) -> None:
        self.python = python
        self.env = env

    def launch(self, args: list[str], *, log_path: Path) -> int:
        argv = [self.python, "-m", "corral", *args]
        out = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), out, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        env = dict(os.environ) if self.env is None else self.env
        try:
            return os.posix_spawn(
                self.python,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM),
                setsigmask=(),
            )
        except OSError as exc:
            raise LaunchError(f"cannot start {self.python} for a VM: {exc.strerror}") from None


__all__ = ["LaunchError", "Launcher", "SpawnLauncher"]
