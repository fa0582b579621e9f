"""The host end of the virtio-console (hvc0): a new pseudo-terminal, or a file it appends to.

A pty is put in raw mode so bytes pass as they are (no echo, no line editing) and its master is
non-blocking, so the device loop never stalls on it; a file is write-only (the guest gets no
input). The device (devices/virtio/console.py) reads and writes `fd` and closes the backend.
"""

from __future__ import annotations

import os
import termios
import tty

from corral.errors import ConfigError


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
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ConfigError(f"{field}: cannot open console file {path}: {exc.strerror}") from None
            self._slave, self.path = -1, path
        else:
            raise ConfigError(f"{field} '{spec}': use 'pty' or 'file=PATH'")

    def close(self) -> None:
        for fd in (self.fd, self._slave):
            if fd >= 0:
                os.close(fd)
        self.fd = self._slave = -1
