"""Exit statistics and the tracing hook of a vCPU's exit loop.

A vCPU whose `observer` is None runs the plain exit loop (the one attribute check per exit is
all that observing costs when it is off). With an ExitObserver it runs the observed loop: each
exit is timed (ns spent in the VMM handling it) and counted by reason, by port (port I/O) and by
address (MMIO), and, with a recorder, handed to it as one trace record (corral.debug.trace).
Counters are plain dicts touched only by the vCPU's own thread; readers copy them (a count may
be one exit stale, never torn: each entry is one list replaced or bumped in place).
"""

from __future__ import annotations

from typing import Protocol

FLAG_WRITE = 1  # a trace record's flags: the access wrote (out / MMIO write)


class ExitRecorder(Protocol):
    """Where an observed vCPU sends each exit: `t_ns` when KVM_RUN returned (perf_counter_ns),
    the exit's reason (KVM_EXIT_*), port or guest-physical address, access length in bytes (all
    repetitions of a string I/O), FLAG_* bits, and the ns the VMM spent handling it."""

    def record(
        self, t_ns: int, vcpu: int, reason: int, addr: int, length: int, flags: int, duration_ns: int
    ) -> None: ...


class ExitObserver:
    """One vCPU's exit counters (and its trace recorder, if any): [count, ns] per key."""

    __slots__ = ("by_reason", "mmio", "pio", "recorder", "run_ns")

    def __init__(self, recorder: ExitRecorder | None = None) -> None:
        self.by_reason: dict[int, list[int]] = {}  # KVM_EXIT_* -> [count, ns handling]
        self.pio: dict[int, list[int]] = {}  # port -> [count, ns]
        self.mmio: dict[int, list[int]] = {}  # guest-physical address -> [count, ns]
        self.run_ns = 0  # time inside KVM_RUN (the guest running, or halted in the kernel)
        self.recorder = recorder

    def count(self, table: dict[int, list[int]], key: int, ns: int) -> None:
        entry = table.get(key)
        if entry is None:
            table[key] = [1, ns]
        else:
            entry[0] += 1
            entry[1] += ns

    def snapshot(self) -> tuple[dict[int, list[int]], dict[int, list[int]], dict[int, list[int]], int]:
        """Copies of (by_reason, pio, mmio) and run_ns, safe to read from another thread."""
        copy = lambda t: {k: list(v) for k, v in list(t.items())}  # noqa: E731
        return copy(self.by_reason), copy(self.pio), copy(self.mmio), self.run_ns


__all__ = ["FLAG_WRITE", "ExitObserver", "ExitRecorder"]
