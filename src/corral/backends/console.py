"""The host end of the virtio-console (hvc0): a new pseudo-terminal, or a file it appends to.

A pty is put in raw mode so bytes pass as they are (no echo, no line editing) and its master is
non-blocking, so the device loop never stalls on it; a file is write-only (the guest gets no
input). The device (devices/virtio/console.py) reads and writes `fd` and closes the backend.

A console log holds whatever the guest printed, so a new one is created 0600, a symlink is
never followed (a path in a shared directory cannot be pointed at another file), and it must
be a regular file or a character device (/dev/null); the open is non-blocking, so a FIFO
without a reader is refused instead of hanging the VMM.
"""

from __future__ import annotations

import os
import stat
import termios
import tty

from corral.errors import ConfigError
from corral.files import Refused, open_checked


class ConsoleBackend:
    """Where hvc0 goes: `pty` (a new pseudo-terminal; `path` names its slave) or `file=PATH`.
    `field` names the config entry in errors."""

    def __init__(self, spec: str, *, field: str = "virtio_console") -> None:
        self.readable = False
        if spec == "pty":
            master, slave = os.openpty()
            tty.setraw(slave)  # bytes pass as they are; no echo, no line editing
            attrs = termios.tcgetattr(slave)
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            os.set_blocking(master, False)
            self.fd, self._slave, self.path, self.readable = master, slave, os.ttyname(slave), True
        elif spec.startswith("file="):
            path = spec[5:]
            self.fd, self._slave, self.path = _open_log(path, field), -1, path
        else:
            raise ConfigError(f"{field} '{spec}': use 'pty' or 'file=PATH'")

    def close(self) -> None:
        for fd in (self.fd, self._slave):
            if fd >= 0:
                os.close(fd)
        self.fd = self._slave = -1


def _open_log(path: str, field: str) -> int:
    try:
        return open_checked(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, kinds=_LOG_KINDS)
    except Refused as exc:
        hint = "give the file itself" if exc.kind == "symlink" else "give a file to append to"
        raise ConfigError(f"{field}: console file {exc}: {hint}") from None


_LOG_KINDS = frozenset({stat.S_IFREG, stat.S_IFCHR})  # a file, or a terminal or /dev/null
