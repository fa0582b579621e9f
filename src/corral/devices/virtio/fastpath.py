"""The compiled virtqueue fast path, when it is there: a thin shim over `_fastring` (C).

Python alone spends a few microseconds on every request (a chain walked and checked, a
DescriptorChain built, one syscall, a used-ring store): more than a guest's whole request costs
under QEMU. `_fastring.c` does that work in C: `take` walks chains for `Virtqueue.pop_into`
(every device), `net_tx` is virtio-net's whole transmit drain, `net_rx` its receive of frames that fit
the guest's next buffer, and `blk_rw` virtio-blk's reads,
writes and flushes on a raw image, both with the GIL released around their syscalls.

The Python code stays the reference. The C walker applies queue.py's rules in the same order
with the same messages, and the same hypothesis tests drive both (tests/unit/test_fastring.py),
so they cannot disagree. The fast path is off, and the Python path runs, when:
- the extension was not built (it is optional: no compiler at install time),
- `CORRAL_NO_FASTPATH=1` is set in the environment (read at import),
- the VMM tracks its own writes to guest RAM (live migration: `GuestMemory.vmm_dirty`),
- the memory is closed.
Frames the MMDS filter must see, overlays and the rarer block requests (discard, write-zeroes,
get-id, a header split across buffers) stay in Python.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from corral.memory import GuestMemory

try:
    from corral.devices.virtio import _fastring as _ring
except ImportError as exc:  # not built: the Python path serves
    _ring = None  # type: ignore[assignment]
    WHY_NOT = f"not built ({exc})"
else:
    WHY_NOT = ""

BUILT = _ring is not None
ENABLED = BUILT and os.environ.get("CORRAL_NO_FASTPATH", "") in ("", "0")
if BUILT and not ENABLED:
    WHY_NOT = "off (CORRAL_NO_FASTPATH is set)"
_REGION = struct.Struct("<QQQ")


def describe() -> str:
    """One line for `corral doctor`: which virtqueue data path runs."""
    if ENABLED:
        return "compiled (corral.devices.virtio._fastring)"
    return f"Python; the compiled one is {WHY_NOT}"


def regions(memory: GuestMemory) -> bytes:
    """Guest RAM as the C code takes it: (gpa, size, host address) per slot, packed."""
    return b"".join(_REGION.pack(s.gpa, s.size, s.host_addr) for s in memory.slots)


def usable(memory: GuestMemory) -> bool:
    """Whether the compiled path may serve a queue over `memory` now."""
    return ENABLED and memory.vmm_dirty is None and not memory.closed


class _Queue(Protocol):  # what the calls below use of a Virtqueue (queue.py imports this module)
    memory: GuestMemory
    regions: bytes
    desc: int
    avail: int
    used: int
    size: int
    index: int
    indirect: bool
    event_idx: bool
    last_avail: int
    used_idx: int
    deferred: bool


def take(q: _Queue, count: int) -> tuple[list[tuple[int, list[tuple[int, int]], list[tuple[int, int]]]], str]:
    """Pop `count` available chains as (head, readable, writable); the message of the rule
    the next one broke ("" if none). The queue's last_avail moves past every chain looked at.
    It only reads guest RAM, so tracking may start meanwhile, but the memory must stay mapped:
    the caller's `usable` is no promise (the GIL can pass to a thread closing the memory in
    between), so the lock is held and a closed memory fails the pop."""
    with q.memory.direct_access:
        if q.memory.closed:
            return [], f"queue {q.index}: guest memory is closed (the VM is going away)"
        chains, q.last_avail, error = _ring.take(
            q.regions, q.desc, q.avail, q.used, q.size, q.index, q.indirect, q.last_avail, count
        )
    return chains, error or ""


def _queue_args(q: _Queue) -> tuple[bytes, int, int, int, int, int, bool, bool, int, int]:
    """The queue as the drains take it, in their arguments' order (_fastring.c)."""
    return (
        q.regions,
        q.desc,
        q.avail,
        q.used,
        q.size,
        q.index,
        q.indirect,
        q.event_idx,
        q.last_avail,
        q.used_idx,
    )


class Drained(NamedTuple):
    """What a compiled drain did: requests served (frames sent), bytes in and out, requests
    dropped or failed, the rule a chain broke ("" if none), and whether it stopped at a request
    the Python path must serve."""

    served: int
    bytes_in: int
    bytes_out: int
    failed: int
    error: str
    stopped: bool


def _settle(q: _Queue, last_avail: int, used_idx: int, deferred: int) -> None:
    q.last_avail, q.used_idx = last_avail, used_idx
    if deferred >= 0:  # the budget ran out: what is left waits for the loop's next turn
        q.deferred = bool(deferred)


def net_tx(q: _Queue, fd: int) -> Drained | None:
    """virtio-net's transmit drain (no frame filter): every frame written to `fd`; None when
    the compiled path may not serve now (the Python path then does)."""
    with q.memory.direct_access:
        if not usable(q.memory):
            return None
        last, used, frames, out, dropped, error, deferred = _ring.net_tx(*_queue_args(q), q.size, fd)
    _settle(q, last, used, deferred)
    return Drained(frames, 0, out, dropped, error or "", False)


def blk_rw(q: _Queue, fd: int, *, read_only: bool, sectors: int) -> Drained | None:
    """virtio-blk's reads, writes and flushes on a raw image `fd` of `sectors` sectors, up to
    the first request of another kind; None as for `net_tx`."""
    with q.memory.direct_access:
        if not usable(q.memory):
            return None
        last, used, count, rd, wr, errors, error, deferred, stopped = _ring.blk_rw(
            *_queue_args(q), q.size, fd, read_only, sectors
        )
    _settle(q, last, used, deferred)
    return Drained(count, rd, wr, errors, error or "", bool(stopped))


RX_DRAINED, RX_NO_CHAIN, RX_PYTHON, RX_SPILL, RX_FAILED = 0, 1, 2, 3, 4  # why net_rx stopped (_fastring.c)


class Received(NamedTuple):
    """What the compiled receive did: frames delivered and their bytes (without headers), why
    it stopped (RX_*), for RX_SPILL the frame's length (the frame is whole at the start of the
    bounce buffer, its chain still in the ring), and for RX_FAILED the failed read's errno."""

    frames: int
    bytes: int
    status: int
    spilled: int
    errno: int


def net_rx(q: _Queue, fd: int, bounce: memoryview, budget: int) -> Received | None:
    """virtio-net's receive, the common case: up to `budget` frames read from `fd` straight
    into the guest's next chains (one readv each), completed with one used-index store; None
    as for `net_tx`."""
    with q.memory.direct_access:
        if not usable(q.memory):
            return None
        last, used, frames, nbytes, status, spilled, err = _ring.net_rx(*_queue_args(q), budget, fd, bounce)
    q.last_avail, q.used_idx = last, used
    return Received(frames, nbytes, status, spilled, err)
