"""Recording stand-ins for what devices are handed instead of KVM: an IrqLine, a VmControl, an
event loop, doorbells, an MSI vector, a clock. One of each, so every device test speaks to the
same narrow Protocols the machine implements.

    line = FakeIrqLine(level_only=True)     # a legacy device: levels only, a pulse fails
    ctl = FakeVmControl(strict=True)        # any use beyond the VmControl Protocol fails
    loop = FakeLoop()                       # call_soon at once; run_ready() services ready fds
"""

from __future__ import annotations

import select


class FakeIrqLine:
    """An IrqLine that records every level it is driven to (`levels`) and counts interrupts
    raised (`raised`: rising edges plus pulses).

    level_only: the device must drive a level, never pulse (the legacy devices).
    strict: level_only, levels must be bools, and any attribute beyond the Protocol fails."""

    def __init__(self, *, level_only: bool = False, strict: bool = False) -> None:
        self.levels: list[bool] = []
        self.raised = 0
        self.level_only = level_only or strict
        self.strict = strict

    def set_level(self, high: bool) -> None:
        if self.strict:
            assert isinstance(high, bool)
        high = bool(high)
        self.raised += high and not self.level
        self.levels.append(high)

    def pulse(self) -> None:
        if self.level_only:
            raise AssertionError("legacy devices drive a level, never a pulse")
        self.raised += 1

    @property
    def level(self) -> bool:
        """The level the line was last driven to (low before any)."""
        return bool(self.levels) and self.levels[-1]

    high = level

    def __getattr__(self, name: str):
        if self.__dict__.get("strict"):
            raise AssertionError(f"device used IrqLine.{name}")
        raise AttributeError(name)


class FakeVmControl:
    """A VmControl that records each request as a tuple: ("exit", status), ("poweroff",), ...

    strict: an exit status outside 0..255, or any attribute beyond the Protocol, fails."""

    def __init__(self, *, strict: bool = False) -> None:
        self.calls: list[tuple] = []
        self.strict = strict

    def request_exit(self, status: int) -> None:
        if self.strict:
            assert isinstance(status, int) and 0 <= status <= 0xFF
        self.calls.append(("exit", status))

    def request_poweroff(self) -> None:
        self.calls.append(("poweroff",))

    def request_reset(self) -> None:
        self.calls.append(("reset",))

    def request_suspend(self) -> None:
        self.calls.append(("suspend",))

    def __getattr__(self, name: str):
        if self.__dict__.get("strict"):
            raise AssertionError(f"device used VmControl.{name}")
        raise AttributeError(name)


class FakeClock:
    """A clock that stands still at `t` until the test moves it."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeLoop:
    """A device's event loop driven by the test.

    call_soon() work runs at once, so a test sees a kick's effect on return; while `held`, it
    waits until `run()`, as on the VM's loop thread. `run_ready()` calls the callbacks of the
    fds that are ready, as the VM's loop would, until nothing is."""

    def __init__(self) -> None:
        self.readers: dict[int, object] = {}
        self.writers: dict[int, object] = {}
        self.held = False
        self.callbacks: list = []

    def add_reader(self, fd, cb) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd, cb) -> None:
        self.writers[fd] = cb

    def remove_writer(self, fd) -> None:
        self.writers.pop(fd, None)

    def call_soon(self, fn) -> None:
        if self.held:
            self.callbacks.append(fn)
        else:
            fn()

    def run(self) -> None:
        """Run the call_soon() work held back so far."""
        while self.callbacks:
            self.callbacks.pop(0)()

    def run_ready(self, timeout: float = 0.05) -> int:
        calls = 0
        while True:
            r, w, _ = select.select(list(self.readers), list(self.writers), [], timeout)
            if not r and not w:
                return calls
            if calls > 10_000:  # a callback that leaves its fd ready forever: a busy loop
                raise AssertionError(
                    f"fds {r} {w} stay ready: "
                    f"{[self.readers.get(f) for f in r]} {[self.writers.get(f) for f in w]}"
                )
            for fd in r:
                if fd in self.readers:
                    self.readers[fd]()
                    calls += 1
            for fd in w:
                if fd in self.writers:
                    self.writers[fd]()
                    calls += 1
            timeout = 0.02


class FakeDoorbells:
    """Doorbells whose callbacks (what an ioeventfd would run) the test calls itself:
    `callbacks[addr]()` rings the doorbell at `addr`."""

    def __init__(self) -> None:
        self.callbacks: dict[int, object] = {}

    def attach(self, addr, length, callback):
        self.callbacks[addr] = callback
        return addr

    def detach(self, handle) -> None:
        self.callbacks.pop(handle, None)


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
