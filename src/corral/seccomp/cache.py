"""Compiled filters kept on disk, so a launch loads BPF instead of compiling it.

Compiling the allow-lists takes libseccomp, reached through pyseccomp, whose import pulls in
ctypes.util and with it shutil, subprocess and tempfile: about a tenth of `corral run`'s start-up
on the development machine, and the same program every time. The program depends only on the
allow-list, the action on a forbidden call, the rules `corral.seccomp` adds around the list and
the architecture. Its key is all of those (the rules by the source text of the module that
writes them), stored whole beside it and compared whole on reading: no digest stands for it, so
no hash library loads at launch (OpenSSL's, through hashlib, is ~3 ms of start-up). It is kept
under `<cache>/seccomp/<kind>-<crc>.bpf` (cache: see corral.cachedir; `<crc>`, a CRC-32 of the
key, lets two versions of corral keep a file each) and loaded with seccomp(2) directly. The
names of the system calls (the SIGSYS handler's table) are kept beside them. Fresh programs are
loaded through the same `load`, so the cached and the compiled path are one path.

The file becomes a thread's syscall filter, so it is used only when this user owns it and the
directory holding it, neither is writable by group or others, its key is this launch's, and
its header's CRC-32 matches key and program (a check against damage: whoever could forge it
could write the file anyway); anything else (missing, foreign, damaged, stale, too long) is
compiled again and written anew, atomically. Without a usable cache directory (a jail's minimal
root has no home) corral compiles every launch, as before.
"""

from __future__ import annotations

import ctypes as C
import errno
import logging
import os
import re
import stat
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from corral.cachedir import cache_root

log = logging.getLogger(__name__)

MAGIC = b"corral-bpf 2\n"
_HEAD = struct.Struct("<II")  # the key's length; a CRC-32 of key and payload
MAX_INSNS = 4096  # BPF_MAXINSNS: the kernel refuses longer programs
INSN = 8  # bytes per struct sock_filter
_NAME_RE = re.compile(rb"[a-z0-9_]{0,40}")

_SYS_SECCOMP = 317  # x86-64, the only architecture corral runs on
_SECCOMP_SET_MODE_FILTER = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(C.Structure):
    _fields_ = [("len", C.c_ushort), ("filter", C.c_void_p)]


_libc = C.CDLL(None, use_errno=True)


def load(program: bytes) -> None:
    """Put the calling thread under `program` (BPF, struct sock_filter[]), as libseccomp's
    load does: no_new_privs, then seccomp(SECCOMP_SET_MODE_FILTER). OSError if refused."""
    if not program or len(program) % INSN or len(program) // INSN > MAX_INSNS:
        raise OSError(22, f"not a seccomp program ({len(program)} bytes)")
    buf = C.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // INSN, C.addressof(buf))
    zero = C.c_ulong(0)
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, C.c_ulong(1), zero, zero, zero) != 0:
        raise OSError(C.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    mode = C.c_ulong(_SECCOMP_SET_MODE_FILTER)
    if _libc.syscall(C.c_long(_SYS_SECCOMP), mode, zero, C.byref(prog)) == 0:
        return
    err = C.get_errno()
    if err == errno.ENOSYS:  # no seccomp(2) (valgrind, say): the older prctl, as libseccomp falls back
        if _libc.prctl(_PR_SET_SECCOMP, C.c_ulong(_SECCOMP_MODE_FILTER), C.byref(prog), zero, zero) == 0:
            return
        err = C.get_errno()
    raise OSError(err, os.strerror(err))


def key(*parts: object) -> bytes:
    """The cache key of a program made from `parts` (reprs of plain data, sorted where sets)."""
    out = bytearray()
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        out += len(data).to_bytes(8, "little") + data
    return bytes(out)


def file_name(stem: str, key: bytes, suffix: str = ".bpf") -> str:
    """`stem` and a short tag of `key`: the name only tells versions apart, reading compares
    the whole key."""
    return f"{stem}-{zlib.crc32(key):08x}{suffix}"


def directory() -> Path | None:
    """The filters' directory (created 0700), or None where there is none to use."""
    try:
        d = cache_root() / "seccomp"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d if _trusted(os.lstat(d), directory=True) else None
    except (OSError, RuntimeError, KeyError):  # no home (a jail), read-only, ...
        return None


def _trusted(st: os.stat_result, directory: bool = False) -> bool:
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind_ok and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read(path: Path, key: bytes) -> bytes | None:
    """The program stored at `path` for `key`, if it is there, trusted, intact and `key`'s."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        limit = len(MAGIC) + _HEAD.size + len(key) + MAX_INSNS * INSN
        if not _trusted(st) or st.st_size > limit:
            log.warning("seccomp cache: %s is not this user's own, or too large: ignored", path)
            return None
        data = os.read(fd, limit + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    start = len(MAGIC) + _HEAD.size
    if data[: len(MAGIC)] != MAGIC or len(data) < start:
        log.warning("seccomp cache: %s is damaged: compiled again", path)
        return None
    key_len, crc = _HEAD.unpack_from(data, len(MAGIC))
    body = data[start:]
    if zlib.crc32(body) != crc:
        log.warning("seccomp cache: %s is damaged: compiled again", path)
        return None
    if key_len != len(key) or body[:key_len] != key:
        return None  # another version's (a CRC-32 shared by chance): replaced
    return body[key_len:]


def write(path: Path, key: bytes, payload: bytes) -> None:
    """Store `payload` for `key` at `path` (atomically: a temporary sibling renamed into place); a cache
    that cannot be written is left alone."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            body = key + payload
            os.write(fd, MAGIC + _HEAD.pack(len(key), zlib.crc32(body)) + body)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("seccomp cache: %s not written: %s", path, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def program(kind: str, key: bytes, compile_: Callable[[], bytes]) -> bytes:
    """`kind`'s program cached for `key`, or `compile_()`'s, stored for the next launch."""
    d = directory()
    path = d / file_name(kind, key) if d is not None else None
    cached = read(path, key) if path is not None else None
    if cached is not None:
        return cached
    fresh = compile_()
    if path is not None:
        write(path, key, fresh)
    return fresh


def syscall_names(count: int, resolve: Callable[[int], str | None]) -> list[str | None]:
    """The names of system calls 0..count-1 (None: unknown), from the cache or `resolve`."""
    d = directory()
    names_key = f"{os.uname().machine} {count}".encode()
    path = d / file_name("names", names_key, ".txt") if d is not None else None
    data = read(path, names_key) if path is not None else None
    if data is not None:
        lines = data.split(b"\n")
        if len(lines) == count and all(_NAME_RE.fullmatch(n) for n in lines):
            return [n.decode() or None for n in lines]
    names = [resolve(nr) for nr in range(count)]
    if path is not None:
        write(path, names_key, "\n".join(n or "" for n in names).encode())
    return names
