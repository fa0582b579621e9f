"""One event loop per VM: a thread that waits on many fds with epoll and runs their callbacks.

Queue doorbells (ioeventfds), tap devices and sockets are fds; the devices behind them run on
this thread, never on a vCPU thread, so a guest's queue kick costs the vCPU no exit into Python.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections import deque
from collections.abc import Callable

from corral.seccomp import enter as enter_seccomp

log = logging.getLogger(__name__)


class EventLoop:
    stop_wait = 5.0  # seconds `stop` waits for the thread: a callback may be stuck in the host

    def __init__(self, name: str = "corral-devices") -> None:
        self.name = name
        self._sel = selectors.EpollSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake, selectors.EVENT_READ, {selectors.EVENT_READ: self._drain_calls})
        self._calls: deque[Callable[[], None]] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._paused: threading.Event | None = None

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._set(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, selectors.EVENT_READ, None)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` while `fd` can be written (remove it once nothing waits)."""
        self._set(fd, selectors.EVENT_WRITE, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, selectors.EVENT_WRITE, None)

    def _set(self, fd: int, event: int, callback: Callable[[], None] | None) -> None:
        # one registration per fd holds {event: callback} for reading and writing
        with self._lock:
            try:
                key = self._sel.get_key(fd)
                handlers = dict(key.data)
            except (KeyError, ValueError):
                key, handlers = None, {}
            if callback is None:
                handlers.pop(event, None)
            else:
                handlers[event] = callback
            mask = 0
            for ev in handlers:
                mask |= ev
            if key is None:
                if mask:
                    self._sel.register(fd, mask, handlers)
            elif mask:
                self._sel.modify(fd, mask, handlers)
            else:
                self._sel.unregister(fd)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread (safe from any thread)."""
        self._calls.append(fn)
        os.eventfd_write(self._wake, 1)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def pause(self, timeout: float = 5.0) -> bool:
        """Hold the loop thread between callbacks until `resume`, so devices are quiescent
        (for a snapshot). Doorbells rung meanwhile stay counted in their eventfds. Returns
        False if the loop did not stop in time."""
        if self._thread is None or self._paused is not None:
            return True
        parked, self._paused = threading.Event(), threading.Event()
        release = self._paused

        def hold() -> None:
            parked.set()
            release.wait()

        self.call_soon(hold)
        return parked.wait(timeout)

    def resume(self) -> None:
        if self._paused is not None:
            self._paused.set()
            self._paused = None

    def stop(self) -> bool:
        """Stop the thread; False when it did not end within `stop_wait` (a callback stuck in a
        host call): it is left to end on its own once the call returns."""
        self.resume()
        self._stopping = True
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        os.eventfd_write(self._wake, 1)
        thread.join(self.stop_wait)
        return not thread.is_alive()

    def close(self) -> bool:
        """Stop and release the loop's fds; False, with them left open, when the thread did not
        stop (it would wake on an fd closed under it, or on another file given its number)."""
        if not self.stop():
            return False
        self._sel.close()
        os.close(self._wake)
        return True

    def _drain_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        # the calls queued so far: those they queue (a device rescheduling the rest of its
        # work) wait for the next turn, after the fds that are ready
        for _ in range(len(self._calls)):
            # each call on its own: one that fails must not hold back the calls queued behind it
            try:
                self._calls.popleft()()
            except Exception:  # a device bug must not stop every other device
                log.exception("device call failed")

    def _run(self) -> None:
        enter_seccomp("loop", self.name[:15])
        while not self._stopping:
            for key, events in self._sel.select():
                for ev, callback in list(key.data.items()):
                    if events & ev:
                        try:
                            callback()
                        except Exception:  # a device bug must not stop every other device
                            log.exception("device event handler failed")
        # calls queued while stopping (device teardown) still run, and the calls they queue
        for _ in range(100):
            if not self._calls:
                break
            self._drain_calls()
