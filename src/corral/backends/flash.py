"""The host file behind a flash bank: OVMF's UEFI variables, kept across boots.

Why: a variable the guest sets (a boot entry, Secure Boot keys) must still be there after the
VMM restarts, as on a PC whose flash chip keeps it. The file is the bank's image, byte for byte
(the same format as Debian's OVMF_VARS_4M.fd, so QEMU can use it too). It is opened like every
host file (no symlink followed, no FIFO, a regular file) and must have the template's size; a
missing file is created from the template (mode 0600, O_EXCL, so a file racing in is not
overwritten). Each program or erase is written through at once (pwrite), so nothing is lost
when the VMM is killed.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.errors import FieldError
from corral.files import Refused, open_checked


class VarsFile:
    """An open variables file: `data` its contents at open, `store` writes a change."""

    def __init__(self, fd: int, data: bytes, path: Path) -> None:
        self.fd, self.data, self.path = fd, data, path

    def store(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_vars(path: Path, template: bytes, field: str = "firmware") -> VarsFile:
    """`path` opened for reading and writing, created from `template` if it does not exist."""
    hint = f"give a variables file of {len(template)} bytes (a copy of OVMF_VARS), or a new path"
    try:
        try:
            fd = open_checked(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, blocking=True)
            created = True
        except Refused as exc:
            if exc.kind != "other" or not os.path.lexists(path):
                raise
            fd = open_checked(path, os.O_RDWR, blocking=True)
            created = False
    except Refused as exc:
        raise FieldError(field, f"variables file {exc}: {hint}") from None
    try:
        if created:
            os.pwrite(fd, template, 0)
            data = template
        else:
            size = os.fstat(fd).st_size
            if size != len(template):
                raise FieldError(field, f"variables file '{path}' is {size} bytes: {hint}")
            data = os.pread(fd, len(template) + 1, 0)
            if len(data) != len(template):
                raise FieldError(field, f"variables file '{path}' changed while it was read: {hint}")
    except OSError as exc:
        os.close(fd)
        raise FieldError(field, f"variables file '{path}' cannot be used ({exc.strerror}): {hint}") from None
    except BaseException:
        os.close(fd)
        raise
    return VarsFile(fd, data, path)


__all__ = ["VarsFile", "open_vars"]
