"""The split virtqueue (virtio 1.2 section 2.7), device side, with every guest value checked.

The driver owns the descriptor table and the available ring; the device owns the used ring.
Everything read from guest memory is hostile: descriptor indices must be below the queue size,
a chain (its direct descriptors and those of its indirect table together) may not loop or hold
more buffers than the queue size, an indirect table must be whole descriptors, no larger than
the queue and not nested, writable buffers may not precede readable ones, and every buffer must
lie in RAM. So one chain costs at most `size` steps however the guest builds it. A chain that
breaks a rule raises `VirtqueueError`; the device answers that request with an error or, where
the spec wants it, marks itself NEEDS_RESET. The VMM never fails.

This file is the reference; `fastpath` (C, optional) walks chains by the same rules with the
same messages when it is built and on, and the same hypothesis tests hold both to them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, ClassVar

from corral.devices.base import U64, DeviceState
from corral.devices.virtio import fastpath
from corral.lazymodel import Field

if TYPE_CHECKING:
    from corral.memory import GuestMemory

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
MAX_CHAIN_BYTES = 1 << 32  # no request may describe more than 4 GiB of buffers


class VirtqueueError(Exception):
    """The driver put something invalid in the queue."""


QueueSize = Annotated[int, Field(ge=1, le=32768)]
RingIndex = Annotated[int, Field(ge=0, le=0xFFFF)]  # free-running 16-bit ring position


class VirtqueueState(DeviceState):
    """A live queue's position; the rings themselves are in guest RAM."""

    size: QueueSize = Field(description="entries in each ring (a power of two)")
    desc: U64 = Field(description="guest address of the descriptor table")
    avail: U64 = Field(description="guest address of the available (driver) ring")
    used: U64 = Field(description="guest address of the used (device) ring")
    last_avail: RingIndex = Field(description="next available-ring slot the device reads")
    used_idx: RingIndex = Field(description="next used-ring slot the device writes")
    signalled_used: RingIndex = Field(description="used_idx when the driver was last interrupted")
    ready: bool = Field(description="the driver enabled the queue")


@dataclass
class DescriptorChain:
    """One request: the head index and its buffers as (guest address, length) pairs."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class Virtqueue:
    """One queue: `pop()` requests (or `pop_into()` all of them), `push()` completions (or
    `push_many()` a batch with one index publish), `needs_interrupt()` after a batch."""

    state_model: ClassVar[type[VirtqueueState]] = VirtqueueState

    def __init__(
        self,
        memory: GuestMemory,
        index: int,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        if size <= 0 or size > 32768 or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to 32768")
        self.memory = memory
        self.index = index
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx = event_idx
        self.indirect = indirect
        self.ready = True
        self.last_avail = 0  # next available-ring slot to read
        self.used_idx = 0  # next used-ring slot to write
        self._signalled_used = 0  # used_idx when the driver was last interrupted
        self.deferred = False  # requests were left for the loop's next turn (a per-wake budget)
        # the rings must be in RAM as a whole; each access below still goes through `memory`
        for what, addr, length, align in (
            ("descriptor table", desc, 16 * size, 16),
            ("available ring", avail, 6 + 2 * size, 2),
            ("used ring", used, 6 + 8 * size, 4),
        ):
            if addr % align or not memory.contains(addr, length):
                raise VirtqueueError(f"queue {index}: {what} at {addr:#x} is not aligned RAM")
        self.regions = fastpath.regions(memory)  # guest RAM as the compiled path takes it

    # -- driver -> device ------------------------------------------------------------------------
    def _avail_idx(self) -> int:
        return U16.unpack(self.memory.view(self.avail + 2, 2))[0]

    def has_available(self) -> bool:
        return self.ready and self._avail_idx() != self.last_avail

    def _pending(self) -> int:
        """Requests the driver made available that the device has not taken (<= size)."""
        avail_idx = self._avail_idx()
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(
                f"queue {self.index}: avail idx {avail_idx} is {pending} ahead "
                f"of the device, more than the queue size {self.size}"
            )
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available request, validated; None when the ring is empty. Raises
        VirtqueueError for a malformed ring (a bogus avail index) or chain (its head is still
        consumed, so the device can complete it with an error)."""
        if not self.ready or not self._pending():
            return None
        mem = self.memory
        try:
            return self._take(
                mem.view(self.avail + 4, 2 * self.size), mem.view(self.desc, DESC_SIZE * self.size)
            )
        finally:
            if self.event_idx:
                self._publish_avail_event()

    def pop_into(self, out: list[DescriptorChain], limit: int) -> None:
        """Append up to `limit` available requests to `out`, validated, in ring order: every
        request the driver posted before its kick, taken in one pass (one view of each ring,
        the avail event published once per pass). With EVENT_IDX the index is read again after
        that publish, so a request posted meanwhile is taken too, never left without a kick.
        Raises VirtqueueError as `pop` does; `out` then holds the requests taken before it."""
        if not self.ready:
            return
        fast = fastpath.usable(self.memory)
        while limit > 0:
            pending = min(self._pending(), limit)
            if not pending:
                return
            if fast:
                chains, error = fastpath.take(self, pending)
                out.extend([DescriptorChain(head, r, w) for head, r, w in chains])
                if self.event_idx:
                    self._publish_avail_event()
                if error:
                    raise VirtqueueError(error)
                limit -= pending
                continue
            ring = self.memory.view(self.avail + 4, 2 * self.size)
            table = self.memory.view(self.desc, DESC_SIZE * self.size)
            try:
                for _ in range(pending):
                    out.append(self._take(ring, table))
            finally:
                if self.event_idx:
                    self._publish_avail_event()
            limit -= pending

    def _take(self, ring: memoryview, table: memoryview) -> DescriptorChain:
        """The request at `last_avail` (known to be available), through views of the available
        ring's entries and of the descriptor table; the caller publishes the avail event."""
        head = U16.unpack_from(ring, 2 * (self.last_avail % self.size))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise VirtqueueError(f"queue {self.index}: head descriptor {head} >= size {self.size}")
        chain = DescriptorChain(head)
        self._walk(chain, table, head)
        return chain

    def _walk(self, chain: DescriptorChain, table: memoryview, index: int) -> None:
        """Follow the chain from descriptor `index` of `table` (a view of the whole descriptor
        table), into at most one indirect table. Every buffer descriptor, direct or indirect,
        counts against the queue size (the spec's bound on a chain), so a loop or an oversized
        table ends the walk after `size` steps."""
        mem = self.memory
        count = self.size
        budget = self.size  # buffer descriptors the whole chain may still use
        in_table = False
        total = 0
        unpack, contains = DESC.unpack_from, mem.contains
        readable, writable = chain.readable, chain.writable
        while True:
            if budget == 0:
                raise VirtqueueError(
                    f"queue {self.index}: descriptor chain longer than the queue size {self.size} (or a loop)"
                )
            budget -= 1
            addr, length, flags, nxt = unpack(table, DESC_SIZE * index)
            if flags & F_INDIRECT:
                if in_table or not self.indirect:
                    raise VirtqueueError(f"queue {self.index}: indirect descriptor not allowed here")
                if flags & F_NEXT or length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"queue {self.index}: bad indirect table ({length} bytes)")
                if length // DESC_SIZE > self.size:
                    raise VirtqueueError(
                        f"queue {self.index}: indirect table of {length // DESC_SIZE} descriptors "
                        f"is larger than the queue size {self.size}"
                    )
                if not contains(addr, length):
                    raise VirtqueueError(f"queue {self.index}: indirect table outside RAM")
                budget += 1  # the table's own descriptor is no buffer
                table, count, index, in_table = mem.view(addr, length), length // DESC_SIZE, 0, True
                continue
            if length:
                if not contains(addr, length):
                    raise VirtqueueError(
                        f"queue {self.index}: buffer {addr:#x}+{length:#x} is outside guest RAM"
                    )
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"queue {self.index}: request larger than 4 GiB")
                if flags & F_WRITE:
                    writable.append((addr, length))
                elif writable:
                    raise VirtqueueError(f"queue {self.index}: readable buffer after a writable one")
                else:
                    readable.append((addr, length))
            if not flags & F_NEXT:
                return
            if nxt >= count:
                raise VirtqueueError(f"queue {self.index}: next descriptor {nxt} >= {count}")
            index = nxt

    def undo_pop(self, count: int = 1) -> None:
        """Put the last `count` popped requests back (the device could not take them yet). The
        avail event stays where the pops published it: the driver still kicks for what it adds
        after them, which is what a device that ran out of buffers waits for."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    # -- device -> driver ------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return request `head` to the driver, `written` bytes placed in its writable buffers."""
        mem = self.memory
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        USED_ELEM.pack_into(mem.view(slot, 8), 0, head, written)
        # the element is in place before the index that publishes it (x86 keeps stores in order)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.store_u16(self.used + 2, self.used_idx)

    def push_many(self, done: list[tuple[int, int]]) -> None:
        """Return a batch of (head, written) requests with one used-index publish: the driver
        sees the whole batch at once, after every element is in place."""
        if not done:
            return
        size, idx = self.size, self.used_idx
        ring = self.memory.view(self.used + 4, 8 * size)
        pack = USED_ELEM.pack_into
        for head, written in done:
            pack(ring, 8 * (idx % size), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self.memory.store_u16(self.used + 2, idx)

    def needs_interrupt(self) -> bool:
        """After pushing a batch: must the driver be interrupted? (EVENT_IDX or NO_INTERRUPT)"""
        mem = self.memory
        mem.fence()  # the used idx just published, before used_event is read
        old, new = self._signalled_used, self.used_idx
        if self.event_idx:
            used_event = U16.unpack(mem.view(self.avail + 4 + 2 * self.size, 2))[0]
            # vring_need_event: did the used index step past used_event in this batch?
            fire = ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            flags = U16.unpack(mem.view(self.avail, 2))[0]
            fire = new != old and not flags & AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        return fire

    def _publish_avail_event(self) -> None:
        """Where the driver must kick next; fenced, for the caller reads the avail idx next."""
        self.memory.store_u16(self.used + 4 + 8 * self.size, self.last_avail)
        self.memory.fence()

    # -- buffer helpers -------------------------------------------------------------------------
    def read_all(self, chain: DescriptorChain, limit: int | None = None) -> bytes:
        out = bytearray()
        for addr, length in chain.readable:
            if limit is not None and len(out) + length > limit:
                length = limit - len(out)
            out += self.memory.view(addr, length)
            if limit is not None and len(out) >= limit:
                break
        return bytes(out)

    def write_all(self, chain: DescriptorChain, data: bytes, skip: int = 0) -> int:
        """Copy `data` into the writable buffers from byte `skip` on; returns bytes written."""
        done = 0
        for addr, length in chain.writable:
            if skip >= length:
                skip -= length
                continue
            n = min(length - skip, len(data) - done)
            if n <= 0:
                break
            self.memory.view(addr + skip, n)[:] = data[done : done + n]
            done += n
            skip = 0
        return done

    # -- state (snapshot, migration) ------------------------------------------------------------
    def save_state(self) -> VirtqueueState:
        return VirtqueueState(
            size=self.size,
            desc=self.desc,
            avail=self.avail,
            used=self.used,
            last_avail=self.last_avail,
            used_idx=self.used_idx,
            signalled_used=self._signalled_used,
            ready=self.ready,
        )

    def load_state(self, state: VirtqueueState) -> None:
        """Positions only: the queue was rebuilt over the same rings (the transport checks)."""
        self.last_avail = state.last_avail
        self.used_idx = state.used_idx
        self._signalled_used = state.signalled_used
        self.ready = state.ready
