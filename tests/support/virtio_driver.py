"""The driver side of a virtio-pci device, in Python, for tests: it negotiates through the BAR
registers, lays out split rings in a real GuestMemory and reads completions from the used ring.

    drv = Driver(VirtioBlock(open_disk(path)))   # transport + memory + fake irq line, loop, doorbells
    drv.setup()                             # reset, features, queues, DRIVER_OK
    head = drv.submit(0, [(hdr, False), (buf, True)])
"""

from __future__ import annotations

import struct
from pathlib import Path

from corral.devices.virtio.base import (
    F_EVENT_IDX,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioDevice,
)
from corral.devices.virtio.pci import COMMON_OFF, DEVICE_OFF, ISR_OFF, NOTIFY_OFF, VirtioPciDevice
from corral.memory import GuestMemory
from support.fakes import FakeDoorbells, FakeIrqLine, FakeLoop

MiB = 1 << 20
RINGS = 0x10000  # rings of queue q at RINGS + q * 0x10000
DATA = 0x100000  # driver buffers from 1 MiB on


class Driver:
    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory | None = None,
        vectors: list | None = None,
        *,
        loop=None,
        doorbells=None,
    ) -> None:
        self.mem = memory or GuestMemory(16 * MiB)
        self.irq = FakeIrqLine()
        self.fn = VirtioPciDevice(
            device, self.mem, self.irq, loop or FakeLoop(), doorbells or FakeDoorbells(), vectors
        )
        self.device = device
        self.next_data = DATA
        self.avail_idx: dict[int, int] = {}
        self.seen_used: dict[int, int] = {}
        self.sizes: dict[int, int] = {}

    # -- registers ----------------------------------------------------------------------------
    def rd(self, off: int, size: int) -> int:
        return self.fn.bar_read(0, COMMON_OFF + off, size)

    def wr(self, off: int, size: int, value: int) -> None:
        self.fn.bar_write(0, COMMON_OFF + off, size, value)

    def status(self) -> int:
        return self.rd(0x14, 1)

    def device_features(self) -> int:
        self.wr(0x00, 4, 0)
        lo = self.rd(0x04, 4)
        self.wr(0x00, 4, 1)
        return lo | self.rd(0x04, 4) << 32

    def config(self, off: int, size: int) -> int:
        return self.fn.bar_read(0, DEVICE_OFF + off, size)

    def isr(self) -> int:
        return self.fn.bar_read(0, ISR_OFF, 1)

    # -- bring-up -------------------------------------------------------------------------------
    def setup(self, features: int | None = None, queue_size: int = 64, *, driver_ok: bool = True) -> None:
        self.wr(0x14, 1, 0)
        self.wr(0x14, 1, STATUS_ACKNOWLEDGE)
        self.wr(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = self.device_features()
        want = offered & (features if features is not None else offered)
        self.features = want | F_VERSION_1
        for sel in (0, 1):
            self.wr(0x08, 4, sel)
            self.wr(0x0C, 4, (self.features >> (32 * sel)) & 0xFFFF_FFFF)
        self.wr(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.status() & STATUS_FEATURES_OK, "device refused the features"
        for q in range(self.rd(0x12, 2)):
            self.wr(0x16, 2, q)
            size = min(self.rd(0x18, 2), queue_size)
            self.wr(0x18, 2, size)
            self.sizes[q] = size
            base = RINGS + q * 0x10000
            self.mem.write(base, bytes(0x10000))  # fresh rings, as a driver allocates them
            for off, addr in ((0x20, base), (0x28, base + 0x4000), (0x30, base + 0x8000)):
                self.wr(off, 4, addr & 0xFFFF_FFFF)
                self.wr(off + 4, 4, addr >> 32)
            self.wr(0x1C, 2, 1)
            self.avail_idx[q] = self.seen_used[q] = 0
        if driver_ok:
            self.driver_ok()

    def driver_ok(self) -> None:
        self.wr(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def rings(self, q: int) -> tuple[int, int, int]:
        base = RINGS + q * 0x10000
        return base, base + 0x4000, base + 0x8000

    # -- buffers and requests ----------------------------------------------------------------------
    def alloc(self, data: bytes | int) -> tuple[int, int]:
        n = data if isinstance(data, int) else len(data)
        addr = self.next_data
        self.next_data = (addr + n + 15) & ~15
        if not isinstance(data, int):
            self.mem.write(addr, data)
        return addr, n

    def submit(
        self, q: int, bufs: list[tuple[tuple[int, int], bool]], *, head: int | None = None, kick: bool = True
    ) -> int:
        """Chain `bufs` ((addr, len), writable) from descriptor `head` (default: slot of the
        avail index) and make it available."""
        desc, _avail, _ = self.rings(q)
        size = self.sizes[q]
        head = self.avail_idx[q] % size if head is None else head
        for i, ((addr, n), writable) in enumerate(bufs):
            idx = (head + i) % size
            last = i == len(bufs) - 1
            flags = (0 if last else 1) | (2 if writable else 0)
            self.mem.write(
                desc + 16 * idx, struct.pack("<QIHH", addr, n, flags, 0 if last else (idx + 1) % size)
            )
        self.put_avail(q, head, kick=kick)
        return head

    def put_avail(self, q: int, head: int, *, kick: bool = True) -> None:
        _, avail, _ = self.rings(q)
        size = self.sizes[q]
        self.mem.write(avail + 4 + 2 * (self.avail_idx[q] % size), struct.pack("<H", head))
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self.mem.write(avail + 2, struct.pack("<H", self.avail_idx[q]))
        if kick:
            self.kick(q)

    def kick(self, q: int) -> None:
        self.fn.bar_write(0, NOTIFY_OFF + 4 * q, 2, q)

    def used(self, q: int) -> list[tuple[int, int]]:
        """New (head, written) completions since the last call."""
        _, _, used = self.rings(q)
        idx = struct.unpack("<H", self.mem.read(used + 2, 2))[0]
        out = []
        while self.seen_used[q] != idx:
            slot = used + 4 + 8 * (self.seen_used[q] % self.sizes[q])
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.seen_used[q] = (self.seen_used[q] + 1) & 0xFFFF
        return out

    def count_used_publishes(self, q: int) -> list[int]:
        """From now on record every store of queue q's used index (the driver sees new
        completions at each): a list the caller reads after the device ran."""
        _, _, used = self.rings(q)
        seen: list[int] = []
        store = self.mem.store_u16

        def counting(gpa: int, value: int) -> None:
            if gpa == used + 2:
                seen.append(value)
            store(gpa, value)

        self.mem.store_u16 = counting  # type: ignore[method-assign]
        return seen

    def close(self) -> None:
        self.device.close()
        self.mem.close()


BLK_SECTORS = 256


def blk_image_file(path: Path, sectors: int = BLK_SECTORS) -> Path:
    """A raw image whose sector i holds i (8 bytes, little-endian), then the byte i & 0xFF."""
    path.write_bytes(b"".join(struct.pack("<Q", i) + bytes([i & 0xFF]) * 504 for i in range(sectors)))
    return path


def blk_request(
    d: Driver, rtype: int, sector: int, data: bytes | None = None, read_len: int = 0, payload: bytes = b""
) -> tuple[int, bytes, int]:
    """One virtio-blk request on queue 0; returns (status, bytes read, used length)."""
    bufs = [(d.alloc(struct.pack("<IIQ", rtype, 0, sector) + payload), False)]
    if data is not None:
        bufs.append((d.alloc(data), False))
    rd = d.alloc(read_len) if read_len else None
    if rd:
        bufs.append((rd, True))
    st_buf = d.alloc(1)
    bufs.append((st_buf, True))
    head = d.submit(0, bufs)
    done = d.used(0)
    assert [h for h, _ in done] == [head]
    return d.mem.read(st_buf[0], 1)[0], d.mem.read(*rd) if rd else b"", done[0][1]


__all__ = ["BLK_SECTORS", "DATA", "F_EVENT_IDX", "Driver", "MiB", "blk_image_file", "blk_request"]
