"""Recording stand-ins for what the legacy devices are handed: a VmControl, an IrqLine, a clock."""


class Ctl:
    """A VmControl that records each request as a tuple: ("exit", status), ("poweroff",), ..."""

    def __init__(self):
        self.calls = []

    def request_exit(self, status):
        self.calls.append(("exit", status))

    def request_poweroff(self):
        self.calls.append(("poweroff",))

    def request_reset(self):
        self.calls.append(("reset",))


class Line:
    """An IrqLine that records every level it is driven to; the legacy devices never pulse."""

    def __init__(self):
        self.levels = []

    def set_level(self, high):
        self.levels.append(bool(high))

    def pulse(self):
        raise AssertionError("legacy devices drive a level, never a pulse")

    @property
    def high(self):
        return bool(self.levels) and self.levels[-1]


class Clock:
    """A clock that stands still at `t` until the test moves it."""

    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t
