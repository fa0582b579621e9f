"""The driver side of a virtio-pci device, in Python, for tests: it negotiates through the BAR
registers, lays out split rings in a real GuestMemory and reads completions from the used ring.

    drv = Driver(VirtioBlock(open_disk(path)))   # transport + memory + immediate event loop
    drv.setup()                                  # reset, features, queues, DRIVER_OK
    head = drv.submit(0, [(hdr, False), (buf, True)])
"""

from __future__ import annotations

import struct

from corral.devices.virtio.base import (F_EVENT_IDX, F_VERSION_1, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
                                        STATUS_DRIVER_OK, STATUS_FEATURES_OK, VirtioDevice)
from corral.devices.virtio.pci import COMMON_OFF, DEVICE_OFF, ISR_OFF, NOTIFY_OFF, VirtioPciDevice
from corral.memory import GuestMemory

MiB = 1 << 20
RINGS = 0x10000            # rings of queue q at RINGS + q * 0x10000
DATA = 0x100000            # driver buffers from 1 MiB on


class ImmediateLoop:
    """Runs call_soon() work at once, so a test sees a kick's effect on return."""

    def call_soon(self, fn) -> None:
        fn()

    def add_reader(self, fd, cb) -> None:
        pass

    def remove_reader(self, fd) -> None:
        pass


class ManualLoop:
    """A device's event loop driven by the test: `run_ready()` calls the callbacks of the fds
    that are ready, as the VM's loop would, until nothing is."""

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}
        self.writers: dict[int, object] = {}

    def add_reader(self, fd, cb) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd, cb) -> None:
        self.writers[fd] = cb

    def remove_writer(self, fd) -> None:
        self.writers.pop(fd, None)

    def call_soon(self, fn) -> None:
        fn()

    def run_ready(self, timeout: float = 0.05) -> int:
        import select

        calls = 0
        while True:
            r, w, _ = select.select(list(self.readers), list(self.writers), [], timeout)
            if not r and not w:
                return calls
            if calls > 10_000:     # a callback that leaves its fd ready forever: a busy loop
                raise AssertionError(f"fds {r} {w} stay ready: "
                                     f"{[self.readers.get(f) for f in r]} {[self.writers.get(f) for f in w]}")
            for fd in r:
                if fd in self.readers:
                    self.readers[fd]()
                    calls += 1
            for fd in w:
                if fd in self.writers:
                    self.writers[fd]()
                    calls += 1
            timeout = 0.02


class Line:
    def __init__(self) -> None:
        self.level = False
        self.raised = 0

    def set_level(self, high: bool) -> None:
        self.raised += high and not self.level
        self.level = high

    def pulse(self) -> None:
        self.raised += 1


class FakeVector:
    """Records what an irqfd-backed MSI vector would deliver."""

    def __init__(self) -> None:
        self.address = self.data = 0
        self.masked = True
        self.pending = False
        self.fired = 0

    def update(self, address: int, data: int, masked: bool) -> None:
        self.address, self.data, self.masked = address, data, masked
        if not masked and self.pending:
            self.pending = False
            self.fired += 1

    def trigger(self) -> bool:
        if self.masked:
            self.pending = True
            return False
        self.fired += 1
        return True


class NoDoorbells:
    def attach(self, addr, length, callback):
        return None

    def detach(self, handle) -> None:
        pass


class DeferredLoop(ImmediateLoop):
    """While `held`, call_soon() work waits until `run()`, as on the VM's loop thread."""

    def __init__(self) -> None:
        self.held = False
        self.callbacks: list = []

    def call_soon(self, fn) -> None:
        if self.held:
            self.callbacks.append(fn)
        else:
            fn()

    def run(self) -> None:
        while self.callbacks:
            self.callbacks.pop(0)()


class RecordingDoorbells:
    """Doorbells whose callbacks (what an ioeventfd would run) the test calls itself."""

    def __init__(self) -> None:
        self.callbacks: dict[int, object] = {}

    def attach(self, addr, length, callback):
        self.callbacks[addr] = callback
        return addr

    def detach(self, handle) -> None:
        self.callbacks.pop(handle, None)


class Driver:
    def __init__(self, device: VirtioDevice, memory: GuestMemory | None = None,
                 vectors: list | None = None, *, loop=None, doorbells=None) -> None:
        self.mem = memory or GuestMemory(16 * MiB)
        self.irq = Line()
        self.fn = VirtioPciDevice(device, self.mem, self.irq, loop or ImmediateLoop(),
                                  doorbells or NoDoorbells(), vectors)
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
            self.mem.write(base, bytes(0x10000))       # fresh rings, as a driver allocates them
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

    def submit(self, q: int, bufs: list[tuple[tuple[int, int], bool]], *, head: int | None = None,
               kick: bool = True) -> int:
        """Chain `bufs` ((addr, len), writable) from descriptor `head` (default: slot of the
        avail index) and make it available."""
        desc, avail, _ = self.rings(q)
        size = self.sizes[q]
        head = self.avail_idx[q] % size if head is None else head
        for i, ((addr, n), writable) in enumerate(bufs):
            idx = (head + i) % size
            last = i == len(bufs) - 1
            flags = (0 if last else 1) | (2 if writable else 0)
            self.mem.write(desc + 16 * idx, struct.pack("<QIHH", addr, n, flags, 0 if last else (idx + 1) % size))
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

    def close(self) -> None:
        self.device.close()
        self.mem.close()


__all__ = ["Driver", "F_EVENT_IDX"]
