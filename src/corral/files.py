"""Files named from outside (options, API bodies, snapshots, tokens) opened one way.

Never through a symbolic link (O_NOFOLLOW: a link could lead to a file the operator did not
give), never stuck on a FIFO (O_NONBLOCK), and only of the kinds the caller accepts, checked with
fstat on the open descriptor so that a file swapped after a look cannot pass. Each caller turns
a `Refused` into its own error class with its own hint; the checks themselves live here once.
"""

from __future__ import annotations

import errno
import os
import stat

REGULAR = frozenset({stat.S_IFREG})


class Refused(Exception):
    """Why `path` was not opened. `str()` reads "<path> <reason>", so a caller writes
    f"{what} {exc}: {hint}"; `kind` is one of "missing", "symlink", "kind", "other"."""

    def __init__(self, path: str | os.PathLike[str], reason: str, kind: str) -> None:
        super().__init__(f"{os.fspath(path)} {reason}")
        self.kind = kind


def open_checked(
    path: str | os.PathLike[str],
    flags: int = os.O_RDONLY,
    *,
    mode: int = 0o600,
    kinds: frozenset[int] = REGULAR,
    kinds_text: str = "a regular file",
    blocking: bool = False,
) -> int:
    """An fd for `path` opened with `flags` (plus O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC), whose
    file type is one of `kinds` (stat.S_IF* values); `blocking` clears O_NONBLOCK after the
    check, for callers that read or write it in the ordinary way."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        if flags & os.O_CREAT:
            raise Refused(path, "cannot be created: its directory does not exist", "missing") from None
        raise Refused(path, "does not exist", "missing") from None
    except ValueError:  # a NUL byte in the name
        raise Refused(path, "has a NUL byte in its name", "other") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(path, "is a symbolic link", "symlink") from None
        if exc.errno == errno.EISDIR:
            raise Refused(path, f"is not {kinds_text}", "kind") from None
        raise Refused(path, f"cannot be opened ({exc.strerror})", "other") from None
    try:
        if stat.S_IFMT(os.fstat(fd).st_mode) not in kinds:
            raise Refused(path, f"is not {kinds_text}", "kind")
        if blocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_new(path: str | os.PathLike[str], what: str) -> int:
    """A new file at `path`, write-only, 0600 whatever the umask (the umask only narrows): an
    existing file or a symbolic link there is refused, never overwritten or followed."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise Refused(path, f"exists: a {what} never overwrites a file; give a new path", "exists") from None
    except ValueError:
        raise Refused(path, "has a NUL byte in its name: give a plain file name", "other") from None
    except OSError as exc:
        raise Refused(path, f"cannot be created for the {what} ({exc.strerror})", "other") from None
