"""What a virtio-blk device reads and writes: a raw image, or a copy-on-write overlay on one.

`open_disk` opens and locks the files (a clear ConfigError for a missing, unreadable or busy
image) and returns a `RawImage` or `CowImage`; the device (devices/virtio/blk.py) only reads,
writes, flushes and discards through it.

A raw image is the file itself. An overlay lets many VMs boot from one base image without
copying it: each VM writes into its own overlay file, and reads come from the overlay where
the VM has written and from the (read-only, shared) base everywhere else.

Overlay file (sparse; what was never written costs nothing on disk):
    0       header: magic, version, cluster size, disk size, base size, base path
    4096    bitmap: one bit per 64 KiB cluster, set when the overlay holds that cluster
    data    cluster i at data + i * 64 KiB (the overlay is the disk's address space, shifted)
A partial write to a cluster the overlay does not hold yet first copies the base's cluster in.
Data is written before the bitmap bit that exposes it, and FLUSH syncs both.

Discard and write-zeroes come from the guest with lengths it chooses: `zero_range` has the
file system zero or punch the range, and writes zeroes from one bounded buffer only where it
cannot, so no request costs host memory in proportion to its size.

Files are checked before anything is read from them: an image is a regular file or a block
device, an overlay a regular file (a FIFO would hang the VMM; every open is O_NONBLOCK so even
that check cannot). An overlay is never followed through a symlink, is created 0600 (it holds
the guest's data), and only a new or empty file is made into one: an existing file that is not
an overlay is refused as it is, never reset.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from corral.errors import ConfigError

CLUSTER = 64 * 1024
MAGIC = b"CORRALCOW1"
HEADER = struct.Struct("<10sHIQQH")  # magic, version, cluster, size, base size, path length
HEADER_AREA = 4096
VERSION = 1
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


SECTOR = 512
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


ZERO_CHUNK = 1 << 20  # the most zeroes held in memory to write a range the file cannot zero


def zero_range(fd: int, offset: int, length: int, *, unmap: bool) -> None:
    """Make `length` bytes at `offset` read as zeroes, at a cost that does not grow in memory
    with `length` (the guest chooses it): the file system zeroes the range (ZERO_RANGE keeps
    the blocks, PUNCH_HOLE frees them, then allocates them again unless `unmap`), and only a
    file that can do neither gets zeroes written, from one ZERO_CHUNK buffer."""
    if not unmap:
        try:
            fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)
            return
        except OSError:
            pass  # tmpfs and others: punch, then allocate
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError:
        write_zeroes(fd, offset, length)
        return
    if not unmap:
        try:
            fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass  # the range reads as zeroes; keeping it allocated was a wish (ENOSPC)


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Write `length` zero bytes at `offset` from a buffer of at most ZERO_CHUNK bytes."""
    zeroes = memoryview(bytes(min(length, ZERO_CHUNK)))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, zeroes[: min(len(zeroes), end - offset)], offset)
        if n <= 0:
            raise OSError(errno.EIO, f"zeroing stopped at byte {offset}")
        offset += n


class RawImage:
    """The image file is the disk."""

    def __init__(self, fd: int, *, read_only: bool) -> None:
        self.fd = fd
        self.read_only = read_only
        self.size = image_size(fd)

    @property
    def direct_fd(self) -> int:
        """The fd whose byte offsets are the disk's (-1 once closed): virtio-blk's compiled
        path reads and writes it directly. An overlay has none."""
        return self.fd

    def readv(self, views: list[memoryview], offset: int) -> int:
        return os.preadv(self.fd, views, offset) if views else 0

    def writev(self, views: list[memoryview], offset: int) -> int:
        return os.pwritev(self.fd, views, offset) if views else 0

    def flush(self) -> None:
        os.fsync(self.fd)

    def discard(self, offset: int, length: int, *, zeroes: bool, unmap: bool) -> None:
        if zeroes:  # write-zeroes must happen
            zero_range(self.fd, offset, length, unmap=unmap)
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError:
            pass  # discard is a hint

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CowImage:
    """A copy-on-write overlay (`overlay_fd`, opened read-write and locked) on a base image
    (`base`, opened read-only with a shared lock)."""

    def __init__(
        self,
        base: RawImage,
        base_path: str,
        overlay_fd: int,
        overlay_path: str,
        *,
        field: str = "disk.overlay",
    ) -> None:
        self.base, self.fd = base, overlay_fd
        self.read_only = False
        self.size = base.size
        self.clusters = (self.size + CLUSTER - 1) // CLUSTER
        bitmap_len = (self.clusters + 7) // 8
        self.data_off = (HEADER_AREA + bitmap_len + CLUSTER - 1) // CLUSTER * CLUSTER
        base_abs = os.path.abspath(base_path).encode()
        raw = os.pread(overlay_fd, HEADER_AREA, 0)
        if os.fstat(overlay_fd).st_size == 0:
            # a new (or empty) file: header and an empty bitmap (the rest stays a hole); a file
            # with anything in it is only ever read, whatever its first bytes are
            hdr = HEADER.pack(MAGIC, VERSION, CLUSTER, self.size, base.size, len(base_abs)) + base_abs
            os.pwrite(overlay_fd, hdr, 0)
            os.ftruncate(overlay_fd, self.data_off + self.size)
            os.fsync(overlay_fd)
            self.bitmap = bytearray(bitmap_len)
        else:
            try:
                magic, version, cluster, size, base_size, n = HEADER.unpack_from(raw)
            except struct.error:
                magic = b""
            if magic != MAGIC:
                raise ConfigError(
                    f"{field}: {overlay_path} is not a corral overlay (it is left as it is): give a "
                    "new path (it is created) or an overlay made by corral"
                )
            if version != VERSION or cluster != CLUSTER:
                raise ConfigError(
                    f"{field}: overlay {overlay_path} has format {version}/{cluster}, not {VERSION}/{CLUSTER}"
                )
            recorded = raw[HEADER.size : HEADER.size + n]
            if recorded != base_abs or size != self.size or base_size != base.size:
                raise ConfigError(
                    f"{field}: overlay {overlay_path} was made on {recorded.decode(errors='replace')} "
                    f"({size} bytes), not on {base_abs.decode()} ({self.size} bytes)"
                )
            self.bitmap = bytearray(os.pread(overlay_fd, bitmap_len, HEADER_AREA))
            if len(self.bitmap) != bitmap_len:
                raise ConfigError(f"{field}: overlay {overlay_path} is truncated")

    def _held(self, c: int) -> bool:
        return bool(self.bitmap[c >> 3] & (1 << (c & 7)))

    def _mark(self, first: int, last: int) -> None:
        for c in range(first, last + 1):
            self.bitmap[c >> 3] |= 1 << (c & 7)
        lo, hi = first >> 3, (last >> 3) + 1
        os.pwrite(self.fd, self.bitmap[lo:hi], HEADER_AREA + lo)

    def _copy_up(self, c: int) -> None:
        """Bring base cluster `c` into the overlay before part of it is overwritten."""
        start = c * CLUSTER
        n = min(CLUSTER, self.size - start)
        data = os.pread(self.base.fd, n, start)
        os.pwrite(self.fd, data, self.data_off + start)

    def _prepare(self, start: int, end: int) -> tuple[int, int]:
        """Before [start, end) is overwritten: copy in the base's data of the edge clusters the
        range covers only in part. Returns the first and last cluster of the range."""
        first, last = start // CLUSTER, (end - 1) // CLUSTER
        for c in {first, last}:
            partial = start > c * CLUSTER or end < min((c + 1) * CLUSTER, self.size)
            if partial and not self._held(c):
                self._copy_up(c)
        return first, last

    def readv(self, views: list[memoryview], offset: int) -> int:
        total = sum(len(v) for v in views)
        done = 0
        for held, start, end in self._runs(offset, offset + total):
            part = _slice(views, start - offset, end - offset)
            fd, base = (self.fd, self.data_off) if held else (self.base.fd, 0)
            n = os.preadv(fd, part, base + start)
            done += n
            if n != end - start:
                break  # short read: the caller sees done < total
        return done

    def writev(self, views: list[memoryview], offset: int) -> int:
        total = sum(len(v) for v in views)
        if not total:
            return 0
        end = offset + total
        first, last = self._prepare(offset, end)
        n = os.pwritev(self.fd, views, self.data_off + offset)
        self._mark(first, last)
        return n

    def discard(self, offset: int, length: int, *, zeroes: bool, unmap: bool) -> None:
        # in an overlay both leave zeros: the base's data must not show through again
        end = offset + length
        first, last = self._prepare(offset, end)
        zero_range(self.fd, self.data_off + offset, length, unmap=True)
        self._mark(first, last)

    def _runs(self, start: int, end: int) -> list[tuple[bool, int, int]]:
        """[start, end) cut where the overlay's holding changes: (held, from, to)."""
        runs: list[tuple[bool, int, int]] = []
        pos = start
        while pos < end:
            c = pos // CLUSTER
            held = self._held(c)
            nxt = min((c + 1) * CLUSTER, end)
            if runs and runs[-1][0] == held:
                runs[-1] = (held, runs[-1][1], nxt)
            else:
                runs.append((held, pos, nxt))
            pos = nxt
        return runs

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.base.close()


def _slice(views: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The bytes [start, end) of the concatenation of `views`, as views."""
    out, pos = [], 0
    for v in views:
        n = len(v)
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            out.append(v[lo:hi])
        pos += n
        if pos >= end:
            break
    return out


def image_size(fd: int) -> int:
    """The size of an image: a regular file's length, or a block device's capacity."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return os.fstat(fd).st_size


def open_image(
    path: str,
    read_only: bool,
    *,
    field: str = "disk.path",
    min_size: int = SECTOR,
    overlay: bool = False,
) -> int:
    """Open and lock one image file: a clear ConfigError, naming the config `field` that gave
    the path, for a missing, unreadable or busy image, or one that is not a regular file or a
    block device. Read-write users hold an exclusive OFD lock, read-only users a shared one.
    An `overlay` is created (0600) if missing, must be a regular file, and is never reached
    through a symlink."""
    what = "overlay" if overlay else "disk image"
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    if overlay:
        flags |= os.O_CREAT | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if overlay:
            raise ConfigError(
                f"{field}: cannot create overlay {path}: its directory does not exist"
            ) from None
        raise ConfigError(f"{field}: disk image {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{field}: {what} {path} is a directory: give a {what} file") from None
    except PermissionError:
        hint = "" if read_only or overlay else ", or set read_only to use it read-only"
        raise ConfigError(f"{field}: no permission to open {what} {path}{hint}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and overlay:
            raise ConfigError(
                f"{field}: overlay {path} is a symbolic link: give the overlay file itself"
            ) from None
        raise ConfigError(f"{field}: cannot open {what} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or (stat.S_ISBLK(mode) and not overlay)):
            kinds = "a regular file" if overlay else "a regular file or a block device"
            raise ConfigError(f"{field}: {what} {path} is not {kinds}")
        os.set_blocking(fd, True)
        _lock(fd, path, read_only, field, what)
        size = image_size(fd)
        if size < min_size:
            raise ConfigError(
                f"{field}: disk image {path} is {size} bytes: a disk needs at least one 512-byte sector"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock(fd: int, path: str, read_only: bool, field: str, what: str) -> None:
    lock = fcntl.F_RDLCK if read_only else fcntl.F_WRLCK
    try:
        # struct flock: type, whence, start, len, pid (0 for OFD locks)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", lock, 0, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(
                f"{field}: {what} {path} is in use by another VM"
                f"{'' if read_only or what == 'overlay' else ' (set read_only to share it)'}"
            ) from None
        raise ConfigError(f"{field}: cannot lock {what} {path}: {exc.strerror}") from None


def open_disk(
    path: str, *, read_only: bool = False, overlay: str | None = None, field: str = "disk"
) -> RawImage | CowImage:
    """The disk at `path`, or an overlay on it (created if missing) when `overlay` is given.
    `field` names the config entry in errors (the machine passes e.g. "disks[0]"; a missing
    base is then "disks[0].path: ...", a busy overlay "disks[0].overlay: ...")."""
    if overlay is None:
        return RawImage(open_image(path, read_only, field=f"{field}.path"), read_only=read_only)
    if read_only:
        raise ConfigError(f"{field} {path}: an overlay is for writing; unset read_only or the overlay")
    if Path(overlay).resolve() == Path(path).resolve():
        raise ConfigError(f"{field} {path}: the overlay must be another file than its base")
    base = RawImage(
        open_image(path, True, field=f"{field}.path"), read_only=True
    )  # shared: many overlays, one base
    try:
        ofd = open_image(overlay, False, field=f"{field}.overlay", min_size=0, overlay=True)
    except BaseException:
        base.close()
        raise
    try:
        return CowImage(base, path, ofd, overlay, field=f"{field}.overlay")
    except BaseException:
        os.close(ofd)
        base.close()
        raise
