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

import errno
import os
import stat
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
            self.fd, self._slave, self.path = _open_log(path, field), -1, path
        else:
            raise ConfigError(f"{field} '{spec}': use 'pty' or 'file=PATH'")

    def close(self) -> None:
        for fd in (self.fd, self._slave):
            if fd >= 0:
                os.close(fd)
        self.fd = self._slave = -1


def _open_log(path: str, field: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{field}: console file {path} is a symbolic link: give the file itself"
            ) from None
        raise ConfigError(f"{field}: cannot open console file {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise ConfigError(f"{field}: console file {path} is not a regular file: give a file to append to")
    return fd
