"""Listening Unix sockets that corral serves (the control socket, vsock's host side).

Whoever can connect to one of these controls the VM (stop it, copy its RAM out, reach the
guest's services), so each is created 0600 whatever the umask: the mode is set on the socket
before bind, and bind gives the new path that mode (less the umask), so the path never exists
with wider permissions. The control socket also checks who connected (api.py, SO_PEERCRED).
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

from corral.errors import ConfigError

MODE = 0o600


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
    """Bind and listen at `path`, a socket only its owner (and root) may connect to. A socket
    left behind by a VMM that died is replaced; one that a live program serves, or a file that
    is not a socket, is refused with a line naming `what` and the config `field` to change
    (e.g. "vsock.uds_path")."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        if not p.is_socket() or _alive(p):
            raise ConfigError(f"{what} {p} is in use by another program: give another {field}")
        p.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind creates the path with the socket inode's mode less the umask: narrow it first
        os.fchmod(s.fileno(), MODE)
        s.bind(str(p))
        if stat.S_IMODE(os.lstat(p).st_mode) & ~MODE:
            p.unlink()
            raise ConfigError(f"cannot make the {what} {p} private to its owner: the kernel ignored the mode")
    except OSError as exc:
        s.close()
        raise ConfigError(f"cannot create the {what} {p}: {exc.strerror}") from None
    except BaseException:
        s.close()
        raise
    s.listen(backlog)
    return s


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix connection (SO_PEERCRED, as the kernel
    recorded it at connect: the peer cannot forge it), or None if the kernel cannot say."""
    try:
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return None
    return uid


def peer_allowed(conn: socket.socket) -> bool:
    """Whether the peer is this process's own uid or root: the only users a VM's sockets serve
    (the socket's 0600 mode says the same; this holds even if an operator widened it)."""
    return peer_uid(conn) in (0, os.geteuid())
