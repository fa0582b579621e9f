"""A probe guest kept running in the background, with its console captured: for tests that
act on a live machine (pause, snapshot, restore, migration) and watch the guest's progress."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from corral.config import MachineConfig
from corral.images.probe import build_probe
from corral.machine import Machine, WarmVm
from support.results import progress_rounds


class LiveProbe:
    """A started Machine plus its console output. `mem-touch SIZE forever` prints one
    PROGRESS line per round: the round number, the checksum of what it read back (the same for
    a given round and size on every run), and ok=1 when every word read back as written."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._out = bytearray()
        self._lock = threading.Lock()
        machine._console = self._console  # set before start; the UART calls it

    @classmethod
    def boot(cls, cmdline: str = "mem-touch 16M forever", **cfg: object) -> LiveProbe:
        cfg.setdefault("memory", "256M")
        m = Machine(MachineConfig.build(kernel=build_probe(), cmdline=cmdline, no_reboot=True, **cfg))
        probe = cls(m)
        m.start()
        return probe

    @classmethod
    def restore(cls, snapshot: str | Path, warm: WarmVm | None = None) -> LiveProbe:
        probe = cls(Machine.from_snapshot(snapshot, warm=warm))
        probe.machine.start()
        return probe

    def _console(self, data: bytes) -> None:
        with self._lock:
            self._out.extend(data)

    @property
    def output(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace").replace("\r", "")

    def rounds(self) -> dict[int, tuple[str, bool]]:
        return progress_rounds(self.output)

    def last_round(self) -> int:
        return max(self.rounds(), default=0)

    def wait_rounds(self, n: int, timeout: float = 30.0) -> int:
        """Wait until round `n` has been printed; returns the last round seen."""
        deadline = time.monotonic() + timeout
        while self.last_round() < n:
            if self.machine._stopped.is_set():
                raise AssertionError(f"guest stopped: {self.machine._result}\n{self.output[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"guest reached round {self.last_round()}, not {n}, in {timeout}s:\n{self.output[-2000:]}"
                )
            time.sleep(0.02)
        return self.last_round()

    def close(self) -> None:
        self.machine.stop("test done")
        self.machine.wait(5)
        self.machine.close()


_reference: dict[tuple[str, int], dict[int, tuple[str, bool]]] = {}


def reference_rounds(cmdline: str, n: int) -> dict[int, tuple[str, bool]]:
    """Rounds 1..n of an undisturbed run of `cmdline` (cached per process)."""
    have = next((v for (c, k), v in _reference.items() if c == cmdline and k >= n), None)
    if have is None:
        p = LiveProbe.boot(cmdline)
        try:
            p.wait_rounds(n, timeout=120)
        finally:
            p.close()
        have = _reference[(cmdline, n)] = p.rounds()
    return have


def assert_continues(before: LiveProbe | dict[int, tuple[str, bool]], after: LiveProbe) -> None:
    """Every round both guests printed has the same checksum, and every round read back ok.
    `before` may be the reference rounds of an undisturbed run instead of a live guest."""
    a = before if isinstance(before, dict) else before.rounds()
    b = after.rounds()
    assert all(ok for _, ok in a.values()) and all(ok for _, ok in b.values()), after.output[-2000:]
    common = set(a) & set(b)
    assert common, f"no round in common: {sorted(a)[-3:]} vs {sorted(b)[:3]}"
    assert all(a[r][0] == b[r][0] for r in common)
