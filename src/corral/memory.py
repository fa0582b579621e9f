"""Guest RAM: one memfd, mapped shared, split into slots around the 32-bit MMIO hole.

Backing RAM with a memfd (not anonymous memory) lets snapshots find the pages a guest never
touched (holes in the memfd). A restored VM is instead backed by its snapshot's memory file,
mapped private: pages load lazily on first touch and clones share every page they leave alone.
Every guest-physical access from the VMM goes through `GuestMemory`, whose accessors check bounds:
guest-supplied addresses are hostile input.

With `ksm` (opt-in, `--ksm`) guest RAM is marked MADV_MERGEABLE so the kernel's same-page
merging can share identical pages between VMs (the host must run KSM: /sys/kernel/mm/ksm/run).

Guest RAM is the guest's secrets: it is left out of the VMM's core dumps (MADV_DONTDUMP) and of
any child it forks (MADV_DONTFORK). A memory file is opened without following a symlink and must
be a regular file of exactly the RAM size; the VMM holds it open and `check_backing` looks at its
size again before the guest starts. A memory file truncated while its VM runs is a host
operator's doing and is not survived: pages past the new end read as SIGBUS in the VMM, or as a
failed KVM_RUN on a vCPU (see state/snapshot.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Iterator
from typing import NamedTuple

from corral.arch.x86 import layout
from corral.errors import ConfigError, GuestMemoryError
from corral.files import Refused, open_checked


class MemorySlot(NamedTuple):
    """One contiguous range of guest RAM backed by `size` bytes of the memfd at `offset`."""

    slot: int
    gpa: int
    size: int
    offset: int
    host_addr: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """Guest-physical RAM with checked access.

    `read`/`write`/`view` accept any (gpa, length) and raise GuestMemoryError unless the whole
    range lies inside one RAM slot; callers never do pointer arithmetic of their own.
    """

    def __init__(
        self,
        size: int,
        *,
        name: str = "corral-ram",
        backing: str | os.PathLike[str] | None = None,
        ksm: bool = False,
    ) -> None:
        if size < layout.MIN_MEMORY or size > layout.MAX_MEMORY or size % mmap.PAGESIZE:
            raise ConfigError(
                f"memory size {size} bytes is not usable: give a page-aligned size between "
                f"{layout.MIN_MEMORY // layout.MiB} MiB and {layout.MAX_MEMORY // layout.GiB} GiB"
            )
        self.size = size
        # KSM merges only private anonymous pages: with `ksm` the memfd is mapped private (its
        # pages stay holes; the guest's are anonymous copies), as a restored VM's file is
        self.private = backing is not None or ksm
        self.ksm = ksm
        self.backing = None if backing is None else str(backing)
        if backing is not None:
            self.fd = _open_backing(str(backing))
            try:
                self.check_backing()
            except BaseException:
                os.close(self.fd)
                raise
        else:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            if backing is None:
                os.ftruncate(self.fd, size)
            self._map = mmap.mmap(
                self.fd,
                size,
                mmap.MAP_PRIVATE if self.private else mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"cannot allocate {size} bytes of guest memory: {exc.strerror}") from exc
        self._advise()
        self._view = memoryview(self._map)
        # 16-bit items over the same bytes: `store_u16` writes a ring index with one store
        self._view16 = self._view.cast("H")
        # during migration: the backing offsets of pages the VMM itself may have written (device
        # DMA); KVM's dirty log sees only the guest's own writes
        self.vmm_dirty: set[int] | None = None
        # held while compiled code (devices/virtio/fastpath.py) reads and writes RAM by host
        # address, past these accessors: tracking starts and the mapping goes only between
        # such calls, so none writes a page unrecorded or touches an unmapped one
        self.direct_access = threading.Lock()
        self._fence = threading.Lock()  # `fence` only: never held, never contended
        self._closed = False
        self._base = base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.slots: list[MemorySlot] = []
        offset = 0
        for i, (gpa, length) in enumerate(layout.ram_ranges(size)):
            self.slots.append(MemorySlot(i, gpa, length, offset, base + offset))
            offset += length
        # (start, end, backing offset) per slot: `_offset` runs several times per I/O request
        self._ranges = tuple((s.gpa, s.end, s.offset) for s in self.slots)

    def _advise(self) -> None:
        # a child the VMM forks (subprocess) must not share guest RAM: for a private mapping
        # (restored VM) fork would make the VMM's next write copy the page, leaving KVM and the
        # guest on the old one
        self._map.madvise(mmap.MADV_DONTFORK)
        self._map.madvise(mmap.MADV_DONTDUMP)  # a core dump of the VMM holds no guest secrets
        if self.ksm:  # opt-in: merging leaks, through write timing, which pages equal another VM's
            self._map.madvise(mmap.MADV_MERGEABLE)

    def check_backing(self) -> None:
        """Refuse a memory file that no longer has the RAM's size (it was truncated or grown
        since it was checked): touching a mapped page past its end kills the VMM with SIGBUS."""
        if self.backing is not None:
            _check_size(self.fd, self.size, self.backing)

    def adopt_backing(self, backing: str | os.PathLike[str], *, ksm: bool = False) -> None:
        """Become the memory file `backing` (a snapshot's), mapped private at this RAM's own host
        addresses, as `GuestMemory(size, backing=...)` maps it elsewhere. A VM whose KVM slots
        already point here (machine.WarmVm: registered before the restore was asked for) runs
        it without registering them again. Only for fresh RAM no guest has run on."""
        if self.backing is not None or self.private or self._closed:
            raise ValueError("only fresh, unbacked guest memory can adopt a memory file")
        path = str(backing)
        fd = _open_backing(path)
        try:
            _check_size(fd, self.size, path)
            with self.direct_access:  # (no compiled call runs on fresh RAM: held for the rule)
                _map_fixed_private(self._base, self.size, fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(self.fd)  # the placeholder memfd: the mapping over it is gone
        self.fd, self.backing, self.private, self.ksm = fd, path, True, ksm
        self._advise()  # a new mapping: its advice again

    # -- checked access ---------------------------------------------------------------------
    def _offset(self, gpa: int, length: int) -> int:
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at guest address {gpa:#x}")
        for start, end, offset in self._ranges:
            if start <= gpa and gpa + length <= end:
                return offset + (gpa - start)
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._offset(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; valid until the memory is closed."""
        off = self._offset(gpa, length)
        if self.vmm_dirty is not None:
            self.vmm_dirty.update(range(off >> 12, (off + length + 4095) >> 12))
        return self._view[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def store_u16(self, gpa: int, value: int) -> None:
        """Write an aligned u16 (a virtqueue index) with a single store. A field the guest polls
        from another CPU must never be seen half-written: struct.pack_into zeroes its target
        before filling it in, and a guest that read that zero took it for a wrapped used index."""
        if gpa & 1:
            raise GuestMemoryError(f"u16 at guest address {gpa:#x} is not 2-byte aligned")
        off = self._offset(gpa, 2)
        if self.vmm_dirty is not None:
            self.vmm_dirty.add(off >> 12)
        self._view16[off >> 1] = value

    def fence(self) -> None:
        """A full memory barrier between publishing a ring index and reading the driver's.
        x86 lets a load pass an earlier store: the device would read a stale avail idx (or
        used_event) while the driver, after its own barrier, reads the device's stale avail
        event (or used idx); then neither side kicks, and the queue stalls for good (the
        virtio spec's 2.7.10 and Linux's virtio_mb pair with this). Python has no fence of
        its own: taking and releasing a lock is a locked read-modify-write on x86 (glibc's
        semaphore under CPython's Lock), which orders every earlier store before every later
        load."""
        self._fence.acquire()
        self._fence.release()

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.view(gpa, 8), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.view(gpa, 4)[:] = value.to_bytes(4, "little")

    def write_u64(self, gpa: int, value: int) -> None:
        self.view(gpa, 8)[:] = value.to_bytes(8, "little")

    def read_cstr(self, gpa: int, max_len: int) -> bytes:
        """A NUL-terminated string of at most `max_len` bytes (truncated at the RAM edge)."""
        for s in self.slots:
            if s.gpa <= gpa < s.end:
                data = self.read(gpa, min(max_len, s.end - gpa))
                return data.split(b"\0", 1)[0]
        return b""

    # -- whole-RAM walks (snapshot, migration) ------------------------------------------------------
    def populated(self, chunk: int = 64 * 1024) -> Iterator[tuple[int, memoryview]]:
        """(offset, data) for every `chunk` of RAM that is not all zeros, in backing-offset
        order (offsets are those of the memfd, the same in a snapshot's memory file). Pages a
        guest never touched are holes in the memfd and are skipped without being read."""
        zero = bytes(chunk)
        done = 0  # ranges may share a chunk: each is looked at once
        for start, end in self._data_ranges():
            for off in range(max(start - start % chunk, done), end, chunk):
                done = off + chunk
                n = min(chunk, self.size - off)
                data = self._view[off : off + n]
                if data.tobytes() != zero[:n]:
                    yield off, data

    def _data_ranges(self) -> Iterator[tuple[int, int]]:
        if self.private:  # private pages of a restored VM hide from SEEK_DATA
            yield 0, self.size
            return
        off = 0
        while off < self.size:
            try:
                start = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after `off`
                return
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            yield start, min(end, self.size)
            off = end

    def discard(self, gpa: int, length: int) -> None:
        """Give the host back the RAM under [gpa, gpa+length) (whole pages): the guest said it
        does not need it (balloon, free page reporting). It reads back as zeros (memfd) or as
        the snapshot's contents (restored VM); either is allowed for a page given away."""
        start, end = gpa & ~(mmap.PAGESIZE - 1), (gpa + length + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        off = self._offset(start, end - start)
        # MADV_REMOVE frees a shared memfd's pages; a private mapping drops its own copies
        self._map.madvise(mmap.MADV_DONTNEED if self.private else mmap.MADV_REMOVE, off, end - start)

    def zero(self, gpa: int, length: int) -> None:
        """Make [gpa, gpa+length) read as zeros (a kernel's BSS). A memfd's whole pages are
        freed rather than written (MADV_REMOVE): on fresh RAM nothing is touched or allocated,
        which saves a probe's launch ~1 ms and its RSS the BSS. A private (snapshot) mapping
        would read its file back, so there every byte is written."""
        view = self.view(gpa, length)  # the range check, and the pages marked written
        lo = (gpa + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        hi = (gpa + length) & ~(mmap.PAGESIZE - 1)
        if not self.private and hi > lo:
            self._map.madvise(mmap.MADV_REMOVE, self._offset(lo, hi - lo), hi - lo)
            written = [view[: lo - gpa], view[hi - gpa :]]  # the partial pages at either end
        else:
            written = [view]
        for part in written:
            for off in range(0, len(part), len(_ZEROS)):
                n = min(len(_ZEROS), len(part) - off)
                part[off : off + n] = _ZEROS[:n]

    def resident_bytes(self) -> int:
        """Host memory backing guest RAM now (memfd pages; for a restored VM, an estimate)."""
        if self.private:
            return self.size
        return os.fstat(self.fd).st_blocks * 512

    def ksm_merged_bytes(self) -> int:
        """Guest RAM that KSM has merged with identical pages (this process's, all of which
        are guest RAM with --ksm); 0 without KSM or when the kernel does not say."""
        if not self.ksm:
            return 0
        try:
            with open("/proc/self/ksm_merging_pages") as f:
                return int(f.read().strip() or 0) * mmap.PAGESIZE
        except (OSError, ValueError):
            return 0

    def offset_view(self, offset: int, length: int) -> memoryview:
        """RAM by backing offset (not guest address): for whole-RAM copies."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestMemoryError(f"RAM offset {offset:#x}+{length:#x} is outside {self.size:#x}")
        return self._view[offset : offset + length]

    def track_vmm_writes(self) -> None:
        """Record the pages the VMM itself writes from now on (live migration: `vmm_dirty`),
        once no compiled drain is in flight."""
        with self.direct_access:
            self.vmm_dirty = set()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self.direct_access:
            if self._closed:
                return
            self._closed = True
        self._view16.release()
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # a view handed out earlier is still alive; the mapping goes when it does
            pass
        os.close(self.fd)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_size(fd: int, size: int, path: str) -> None:
    now = os.fstat(fd).st_size
    if now != size:
        raise ConfigError(
            f"guest memory file {path} is {now} bytes, not {size}: it is truncated or from another machine"
        )


_libc_mmap = None


def _map_fixed_private(addr: int, size: int, fd: int) -> None:
    """mmap(2) `fd` private, read-write, over [addr, addr + size): MAP_FIXED replaces what was
    mapped there in one step (Python's mmap cannot place a mapping). The mmap object that owned
    the range unmaps it, the file's pages now, when it closes."""
    global _libc_mmap
    if _libc_mmap is None:
        f = ctypes.CDLL(None, use_errno=True).mmap
        f.restype = ctypes.c_void_p
        f.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc_mmap = f
    got = _libc_mmap(addr, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
    if got != addr:  # MAP_FAILED; with MAP_FIXED nothing else can come back
        err = ctypes.get_errno()
        raise ConfigError(f"cannot map the guest memory file: {os.strerror(err)}")


_ZEROS = bytes(1 << 20)
_MAP_FIXED = 0x10  # <sys/mman.h> (x86-64); the mmap module does not export it


def _open_backing(path: str) -> int:
    """A snapshot's memory file, read-only: never through a symlink, never a FIFO or device
    (O_NONBLOCK: a FIFO cannot hang the open)."""
    try:
        return open_checked(path)
    except Refused as exc:
        hint = {
            "symlink": "a snapshot's memory must be its own file",
            "kind": "the snapshot is damaged",
        }.get(exc.kind, "check the snapshot")
        raise ConfigError(f"guest memory file {exc}: {hint}") from None
