"""How the daemon starts a VM process: a small protocol, so the way can change (a fresh
interpreter today; a fork server that forks a warm, pre-imported template later) while the daemon
stays the same. Two ways exist: `SpawnLauncher` (a fresh interpreter per VM) and `ForkLauncher`
(corral.forkserver: the VM forks from a warm template, skipping start-up and imports and sharing
the interpreter's pages between VMs; the daemon's default).

A launcher is given the `corral` command line of the VM (`["firecracker", "--api-sock", ...]`,
without the program name) and the file its stdout and stderr go to, and returns the new
process's pid. The process must be in a session of its own (setsid), so it outlives the daemon
and no terminal signal reaches it, and should be the daemon's child when it can be, so the daemon
learns its exit status (a VM whose parent is not the daemon is reported dead without one).

Jailing (the daemon's default as root) needs a `JailingLauncher`: only `ForkLauncher` is one,
as the jail is entered inside the fork server's child (corral.forkserver), with no exec.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

from corral.errors import CorralError
from corral.forkserver import ForkServer, ForkServerError
from corral.jail import JailSpec


class LaunchError(CorralError):
    """A VM process that could not be started."""


class Launcher(Protocol):
    def launch(self, args: list[str], *, log_path: Path) -> int:
        """Start `corral ARGS...` in its own session, stdout and stderr appended to `log_path`
        (created 0600), stdin /dev/null; return its pid."""
        ...

    def exit_status(self, pid: int) -> int | None:
        """How a process it launched ended, once it has (as `Popen.returncode`: negative for a
        signal); None while it runs or when that is no longer known."""
        ...

    def close(self) -> None:
        """Release what the launcher holds; the VMs it started keep running."""
        ...


@runtime_checkable
class JailingLauncher(Protocol):
    def launch_jailed(self, args: list[str], *, log_path: Path, jail: JailSpec) -> tuple[int, float]:
        """As `Launcher.launch`, the process entering `jail` first (corral.jail.enter_jail);
        returns its pid and how long entering took (ms). A jail that cannot be entered is a
        LaunchError naming the step."""
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

    def exit_status(self, pid: int) -> int | None:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None  # not our child (a daemon before this one started it)
        return os.waitstatus_to_exitcode(status) if done else None

    def close(self) -> None:
        pass


class ForkLauncher:
    """VM processes forked from a warm, pre-imported template (corral.forkserver); the template
    reaps them and keeps their exit statuses, which `exit_status` asks it for."""

    def __init__(self, server: ForkServer | None = None) -> None:
        self.server = server or ForkServer()
        try:
            self.server.start()
        except ForkServerError as exc:
            raise LaunchError(f"cannot start the fork server: {exc}") from None

    def launch(self, args: list[str], *, log_path: Path) -> int:
        try:
            return self.server.launch(args, log_path=log_path)
        except ForkServerError as exc:
            raise LaunchError(str(exc)) from None

    def launch_jailed(self, args: list[str], *, log_path: Path, jail: JailSpec) -> tuple[int, float]:
        try:
            return self.server.launch_jailed(args, log_path=log_path, jail=jail)
        except ForkServerError as exc:
            raise LaunchError(str(exc)) from None

    def exit_status(self, pid: int) -> int | None:
        try:
            return self.server.returncode(pid)
        except ForkServerError:
            return None

    def close(self) -> None:
        self.server.close()


__all__ = ["ForkLauncher", "JailingLauncher", "LaunchError", "Launcher", "SpawnLauncher"]
