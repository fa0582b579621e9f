"""Listening Unix sockets that corral serves (the control socket, vsock's host side)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from corral.errors import ConfigError


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def listen_unix(path: str | os.PathLike[str], what: str, field: str, backlog: int = 16) -> socket.socket:
    """Bind and listen at `path`. A socket left behind by a VMM that died is replaced; one that
    a live program serves, or a file that is not a socket, is refused with a line naming
    `what` and the config `field` to change (e.g. "vsock.uds_path")."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_socket() or _alive(p):
            raise ConfigError(f"{what} {p} is in use by another program: give another {field}")
        p.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(p))
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot create the {what} {p}: {exc.strerror}") from None
    s.listen(backlog)
    return s
