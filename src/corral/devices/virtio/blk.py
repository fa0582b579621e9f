"""virtio-blk over a disk image (virtio 1.2 section 5.2).

Requests are a 16-byte header (type, reserved, sector), data buffers, and a status byte the
device writes last. Reads and writes go straight between the file and guest memory with
preadv/pwritev on memoryviews of guest RAM, through the image the machine opened (a raw file
or an overlay, backends/disk.py); on a raw image they (and flushes) run in C when the compiled
path is there (fastpath.py), the other requests here. A request that breaks the rules (sector past the end,
a write to a read-only disk, a malformed chain, more discard segments or sectors than the
config space advertises) fails alone with IOERR/UNSUPP; a chain without room for the status
byte cannot even be failed, so it is returned with nothing written.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

from corral.devices.base import NoState
from corral.devices.virtio import fastpath
from corral.devices.virtio.base import VIRTIO_ID_BLOCK, VirtioDevice, VirtioInterrupt
from corral.devices.virtio.queue import DescriptorChain

if TYPE_CHECKING:
    from corral.devices.virtio.queue import Virtqueue
    from corral.memory import GuestMemory

SECTOR = 512
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")  # discard/write-zeroes: sector, num_sectors, flags
F_UNMAP = 1  # a write-zeroes segment may deallocate
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
# Discard and write-zeroes limits, advertised in the config space and enforced per request:
# the segment list is read only once its length is known to be within MAX_*_SEG segments, and
# a range is zeroed by the file system (or from one bounded buffer), never with its size in RAM.
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment: a hole punched, metadata only
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = 1 << 19  # 256 MiB: zeroes written where the file cannot punch
MAX_WRITE_ZEROES_SEG = 1
ID_BYTES = 20


class DiskImage(Protocol):
    """What the device needs of its image (backends/disk.py: RawImage, CowImage): a size in
    bytes, whether it is read-only, vectored I/O at a byte offset, flush, discard and close."""

    size: int
    read_only: bool

    def readv(self, views: list[memoryview], offset: int) -> int: ...

    def writev(self, views: list[memoryview], offset: int) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int, *, zeroes: bool, unmap: bool) -> None: ...

    def close(self) -> None: ...


class VirtioBlock(VirtioDevice[NoState]):
    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    state_model = NoState  # nothing beyond its queues

    def __init__(self, image: DiskImage, *, serial: str = "") -> None:
        """`image` is opened already (backends.disk.open_disk); the device closes it."""
        super().__init__()
        self.image = image
        self.read_only = image.read_only
        self.size = self.image.size
        self.sectors = self.size // SECTOR
        self.serial = serial.encode()[:ID_BYTES]
        self.queue: Virtqueue | None = None
        self.memory: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.requests = 0
        self.read_bytes = self.write_bytes = self.errors = 0

    def device_features(self) -> int:
        f = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES
        return f | F_RO if self.read_only else f

    def config_bytes(self) -> bytes:
        cfg = bytearray(0x3C)
        struct.pack_into("<QII", cfg, 0, self.sectors, 0, SEG_MAX)  # capacity, size_max, seg_max
        struct.pack_into("<I", cfg, 0x14, SECTOR)  # blk_size
        struct.pack_into("<H", cfg, 0x22, 1)  # num_queues
        # discard: sectors, segments, sector alignment; write-zeroes: sectors, segments, may unmap
        struct.pack_into("<III", cfg, 0x24, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)
        struct.pack_into("<IIB", cfg, 0x30, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1)
        return bytes(cfg)

    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        self.memory, self.queue, self.interrupt = memory, queues[0], interrupt

    def reset(self) -> None:
        super().reset()
        self.queue = self.interrupt = None

    def queue_notify(self, index: int) -> None:
        q, interrupt = self.queue, self.interrupt
        if q is None or interrupt is None:
            return
        fd: int = getattr(self.image, "direct_fd", -1)  # a raw image (backends/disk.py)
        # reads, writes and flushes in C when it may run (fastpath.py); it stops at the first
        # request of another kind, and `serve` takes it from there
        done = fastpath.blk_rw(q, fd, read_only=self.read_only, sectors=self.sectors) if fd >= 0 else None
        if done is not None:
            self.requests += done.served
            self.read_bytes += done.bytes_in
            self.write_bytes += done.bytes_out
            self.errors += done.failed
            if done.error:
                self.fail(done.error)
                interrupt.signal_config()
                return
            if not done.stopped:
                if q.needs_interrupt():
                    interrupt.signal_queue(q.index)
                return
        self.serve(q, interrupt, self._handle)

    # -- one request -----------------------------------------------------------------------------
    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written into the driver's buffers."""
        mem, q = self.memory, self.queue
        assert mem is not None and q is not None
        self.requests += 1
        if not chain.writable:
            return 0  # no status byte: nothing can be reported
        # the status byte is the last writable byte; data buffers are what precedes it
        s_addr, s_len = chain.writable[-1]
        status_at = s_addr + s_len - 1
        data_out = chain.writable[:-1] + ([(s_addr, s_len - 1)] if s_len > 1 else [])
        first = chain.readable[0] if chain.readable else (0, 0)
        if first[1] >= HEADER.size:  # the usual layout: the header in a buffer of its own
            rtype, _, sector = HEADER.unpack_from(mem.view(first[0], HEADER.size))
        else:
            header = q.read_all(chain, HEADER.size)
            if len(header) < HEADER.size:
                mem.view(status_at, 1)[0] = S_IOERR
                return 1
            rtype, _, sector = HEADER.unpack(header)
        written = 0
        try:
            if rtype == T_IN:
                written = self._read(mem, sector, data_out)
                status = S_OK
            elif rtype == T_OUT:
                status = self._write(mem, sector, _skip(chain.readable, HEADER.size))
            elif rtype == T_FLUSH:
                if not self.read_only:
                    self.image.flush()
                status = S_OK
            elif rtype == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")
                written = _scatter(mem, data_out, ident)
                status = S_OK
            elif rtype in (T_DISCARD, T_WRITE_ZEROES):
                data_in = _skip(chain.readable, HEADER.size)
                status = self._discard(mem, data_in, zeroes=rtype == T_WRITE_ZEROES)
            else:
                status = S_UNSUPP
        except _IoError:
            status = S_IOERR
        except OSError:
            status = S_IOERR
        if status != S_OK:
            self.errors += 1
        mem.view(status_at, 1)[0] = status
        return written + 1

    def io_counters(self) -> dict[str, int]:
        """Requests served, bytes read and written, and failed requests (GET /corral/stats)."""
        return {
            "requests": self.requests,
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "errors": self.errors,
        }

    def _range(self, sector: int, length: int) -> int:
        """Byte offset of `length` bytes at `sector`, or _IoError if outside the disk."""
        if length % SECTOR or sector + length // SECTOR > self.sectors:
            raise _IoError
        return sector * SECTOR

    def _read(self, mem: GuestMemory, sector: int, bufs: list[tuple[int, int]]) -> int:
        total = sum(n for _, n in bufs)
        offset = self._range(sector, total)
        views = [mem.view(a, n) for a, n in bufs]
        done = self.image.readv(views, offset)
        if done != total:
            raise _IoError
        self.read_bytes += done
        return done

    def _write(self, mem: GuestMemory, sector: int, bufs: list[tuple[int, int]]) -> int:
        if self.read_only:
            return S_IOERR
        total = sum(n for _, n in bufs)
        offset = self._range(sector, total)
        views = [mem.view(a, n) for a, n in bufs]
        if self.image.writev(views, offset) != total:
            raise _IoError
        self.write_bytes += total
        return S_OK

    def _discard(self, mem: GuestMemory, bufs: list[tuple[int, int]], *, zeroes: bool) -> int:
        if self.read_only:
            return S_IOERR
        # the guest sizes the segment list: count its segments before copying any of it
        size = sum(n for _, n in bufs)
        most = MAX_WRITE_ZEROES_SEG if zeroes else MAX_DISCARD_SEG
        if not size or size % SEGMENT.size or size // SEGMENT.size > most:
            return S_UNSUPP
        segments = list(SEGMENT.iter_unpack(b"".join(bytes(mem.view(a, n)) for a, n in bufs)))
        # every segment is checked before any is applied: a bad request changes nothing
        most_sectors = MAX_WRITE_ZEROES_SECTORS if zeroes else MAX_DISCARD_SECTORS
        for sector, count, flags in segments:
            if flags & ~F_UNMAP or (flags and not zeroes) or count > most_sectors:
                return S_UNSUPP  # unknown flags, unmap on a discard, more than advertised
            self._range(sector, count * SECTOR)
        for sector, count, flags in segments:
            if count:
                unmap = bool(flags & F_UNMAP)
                self.image.discard(sector * SECTOR, count * SECTOR, zeroes=zeroes, unmap=unmap)
        return S_OK

    def close(self) -> None:
        self.image.close()


class _IoError(Exception):
    pass


def _skip(bufs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out = []
    for addr, length in bufs:
        if n >= length:
            n -= length
            continue
        out.append((addr + n, length - n))
        n = 0
    return out


def _scatter(mem: GuestMemory, bufs: list[tuple[int, int]], data: bytes) -> int:
    done = 0
    for addr, length in bufs:
        n = min(length, len(data) - done)
        if n <= 0:
            break
        mem.write(addr, data[done : done + n])
        done += n
    return done
