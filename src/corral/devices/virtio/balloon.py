"""virtio-balloon: the host asks for memory back, the guest hands over pages (virtio 1.2 5.5).

* Inflate/deflate: the host sets a target (`set_target_bytes`); the driver inflates by sending page
  frame numbers of pages it gives up, which corral returns to the host at once
  (GuestMemory.discard), and deflates by sending the numbers of pages it takes back.
* Statistics: the driver keeps a buffer of (tag, value) pairs in the stats queue; corral hands
  it back to ask for fresh ones and keeps the latest (`stats`; `info` asks and reports).
* Free page reporting: the driver reports ranges of free memory, which corral discards too, so
  a guest's free memory flows back to the host without a balloon target.

Every page number and range from the guest is checked against guest RAM; one that is not RAM is
skipped and counted, never acted on.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.devices.base import U32, DeviceState
from corral.devices.virtio.base import VIRTIO_ID_BALLOON, VirtioDevice, VirtioInterrupt
from corral.devices.virtio.queue import VirtqueueError
from corral.errors import GuestMemoryError
from corral.lazymodel import BaseModel, Field

if TYPE_CHECKING:
    from corral.devices.virtio.queue import DescriptorChain, Virtqueue
    from corral.memory import GuestMemory

log = logging.getLogger(__name__)

F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM = 1 << 0, 1 << 1, 1 << 2
F_PAGE_REPORTING = 1 << 5
PFN_SHIFT = 12
PAGE = 1 << PFN_SHIFT  # the balloon's unit: 4 KiB, whatever the guest's page size
STAT = struct.Struct("<HQ")
STAT_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
MAX_PFNS = 256 * 1024  # per inflate request: 1 GiB of 4 KiB pages


class BalloonState(DeviceState):
    target_pages: U32 = Field(description="num_pages: 4 KiB pages the host asked the guest to give up")
    actual_pages: U32 = Field(description="actual: 4 KiB pages the guest says it has given up")


class BalloonInfo(BaseModel):
    """The balloon as the host sees it (the reply of the balloon verb)."""

    target_bytes: int  # what the host asked the guest to give back
    actual_bytes: int  # what the guest says it has given
    host_resident_bytes: int  # host memory now behind guest RAM
    inflated: int  # pages handed over by inflate requests, in all
    deflated: int  # pages taken back by deflate requests, in all
    reported_bytes: int  # free memory reported by the guest and returned to the host
    bad_pfns: int  # page numbers from the guest that were not RAM (skipped)
    stats: dict[str, int]  # the guest's latest memory statistics, by virtio name


class VirtioBalloon(VirtioDevice[BalloonState]):
    device_id = VIRTIO_ID_BALLOON
    queue_sizes = (128, 128, 128, 128)  # inflate, deflate, stats, reporting
    state_model = BalloonState

    def __init__(self) -> None:
        super().__init__()
        self.memory: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.queues: dict[str, Virtqueue] = {}
        self.target_pages = 0
        self.actual_pages = 0
        self.stats: dict[str, int] = {}
        self.stats_updated = threading.Event()
        self._stats_chain: DescriptorChain | None = None
        self.counters = {"inflated": 0, "deflated": 0, "reported_bytes": 0, "bad_pfns": 0}
        self._lock = threading.Lock()

    def device_features(self) -> int:
        return F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING

    def config_bytes(self) -> bytes:
        with self._lock:
            return struct.pack("<IIII", self.target_pages, self.actual_pages, 0, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and size == 4:
            with self._lock:
                self.actual_pages = value

    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        # queues exist only for negotiated features, numbered without gaps (as Linux finds them)
        names = ["inflate", "deflate"]
        if driver_features & F_STATS_VQ:
            names.append("stats")
        if driver_features & F_PAGE_REPORTING:
            names.append("reporting")
        self.memory, self.interrupt = memory, interrupt
        self.queues = dict(zip(names, queues, strict=False))
        self._index = dict(enumerate(names))

    def reset(self) -> None:
        super().reset()
        self.queues, self._stats_chain, self.memory, self.interrupt = {}, None, None, None

    def save_state(self) -> BalloonState:
        return BalloonState(target_pages=self.target_pages, actual_pages=self.actual_pages)

    def load_state(self, state: BalloonState) -> None:
        self.target_pages, self.actual_pages = state.target_pages, state.actual_pages

    # -- host side -------------------------------------------------------------------------------
    def set_target_bytes(self, target: int) -> None:
        """Ask the guest to give up `target` bytes of its RAM, in 4 KiB pages (0: give it all
        back). A driver not yet running reads the target when it starts (Linux does at probe)."""
        with self._lock:
            self.target_pages = min(max(0, target) // PAGE, 0xFFFF_FFFF)
        irq = self.interrupt
        if irq is not None:
            irq.signal_config()

    def set_target(self, pages: int, interrupt: VirtioInterrupt | None = None) -> None:
        """Transitional: today's machine.py calls this; it goes when the machine calls
        `set_target_bytes` (the lead's restructuring)."""
        with self._lock:
            self.target_pages = max(0, pages)
        irq = interrupt or self.interrupt
        if irq is not None:
            irq.signal_config()

    def info(
        self,
        host_resident_bytes: int,
        call_soon: Callable[[Callable[[], None]], object] | None,
        timeout: float,
    ) -> BalloonInfo:
        """The balloon as the host sees it. With a stats queue, first asks the driver for fresh
        statistics (`call_soon` runs `request_stats` on the device event loop) and waits up to
        `timeout` seconds for them; the reply carries whatever statistics are the latest."""
        if call_soon is not None and self.queues.get("stats") is not None:
            self.stats_updated.clear()
            call_soon(self._ask_for_stats)
            self.stats_updated.wait(timeout)
        with self._lock:
            target, actual = self.target_pages, self.actual_pages
        return BalloonInfo(
            target_bytes=target * PAGE,
            actual_bytes=actual * PAGE,
            host_resident_bytes=host_resident_bytes,
            stats=dict(self.stats),
            **self.counters,
        )

    def request_stats(self) -> bool:
        """Hand the stats buffer back so the driver refills it; False if it holds none now."""
        q, chain, irq = self.queues.get("stats"), self._stats_chain, self.interrupt
        if q is None or chain is None or irq is None:
            return False
        self.stats_updated.clear()
        self._stats_chain = None
        q.push(chain.head, 0)
        irq.signal_queue(self._queue_index("stats"))
        return True

    def _ask_for_stats(self) -> None:
        self.request_stats()

    def _queue_index(self, name: str) -> int:
        return next(i for i, n in self._index.items() if n == name)

    # -- guest side --------------------------------------------------------------------------------
    def queue_notify(self, index: int) -> None:
        name = getattr(self, "_index", {}).get(index)
        q, irq = self.queues.get(name or ""), self.interrupt
        if q is None or irq is None:
            return
        if name == "stats":
            try:
                if self._take_stats(q) and q.needs_interrupt():
                    irq.signal_queue(index)  # the driver is waiting on the buffer it replaced
            except VirtqueueError as exc:
                self.fail(str(exc))
                irq.signal_config()
        elif name == "reporting":
            self.serve(q, irq, self._report)
        else:
            self.serve(q, irq, self._inflate if name == "inflate" else self._deflate)

    def _pfns(self, chain: DescriptorChain) -> list[int]:
        assert self.memory is not None
        q = self.queues["inflate"]
        data = q.read_all(chain, 4 * MAX_PFNS)
        n = len(data) // 4
        return list(struct.unpack_from(f"<{n}I", data))

    def _inflate(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        for pfn in self._pfns(chain):
            try:
                self.memory.discard(pfn << PFN_SHIFT, 1 << PFN_SHIFT)
                self.counters["inflated"] += 1
            except GuestMemoryError:
                self.counters["bad_pfns"] += 1
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        self.counters["deflated"] += len(self._pfns(chain))  # the pages fault back in on use
        return 0

    def _report(self, chain: DescriptorChain) -> int:
        # each writable buffer of a report *is* a free range of guest memory
        assert self.memory is not None
        for addr, length in chain.writable + chain.readable:
            try:
                self.memory.discard(addr, length)
                self.counters["reported_bytes"] += length
            except GuestMemoryError:
                self.counters["bad_pfns"] += 1
        return 0

    def _take_stats(self, q: Virtqueue) -> bool:
        """Keep the driver's newest stats buffer; True when an older one went back to it.
        At most a queue's worth per wake (as serve()): a guest handing buffers straight back
        would otherwise hold the loop; the rest waits for the loop's next turn."""
        returned = False
        for _ in range(q.size):
            chain = q.pop()
            if chain is None:
                break
            if self._stats_chain is not None:  # a driver sending two: return the old
                q.push(self._stats_chain.head, 0)
                returned = True
            self._stats_chain = chain
            data = q.read_all(chain, STAT.size * 64)
            stats = {}
            for i in range(len(data) // STAT.size):
                tag, value = STAT.unpack_from(data, i * STAT.size)
                stats[STAT_NAMES.get(tag, f"tag{tag}")] = value
            self.stats = stats
            self.stats_updated.set()
        else:
            q.deferred = q.has_available()
        return returned
