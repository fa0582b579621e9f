"""A machine's devices when their loop will not stop: a device call stuck in the host (a read
of a hung NFS disk, say) must not have its files closed under it, or their numbers go to the
next files opened and the stuck call's I/O lands there when it returns."""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace

from corral.builder import Board
from corral.eventloop import EventLoop


class _Device:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _stuck_loop() -> tuple[EventLoop, threading.Event]:
    loop = EventLoop("stuck")
    loop.stop_wait = 0.2
    loop.start()
    entered, release = threading.Event(), threading.Event()

    def stuck() -> None:
        entered.set()
        release.wait(30)

    loop.call_soon(stuck)
    assert entered.wait(5)
    return loop, release


def test_a_loop_stuck_in_a_call_is_not_closed_under_it():
    loop, release = _stuck_loop()
    thread, wake = loop._thread, loop._wake
    try:
        assert loop.close() is False
        os.fstat(wake)  # still open: the thread may still wake on it
        assert thread is not None and thread.is_alive()
    finally:
        release.set()
    thread.join(5)
    assert not thread.is_alive()  # it ends once the call returns
    assert loop.close() is True


def test_a_board_whose_loop_will_not_stop_closes_no_device_and_says_so(caplog):
    loop, release = _stuck_loop()
    dev = _Device()
    board = Board(None, None, None, None, {}, {"net0": SimpleNamespace(device=dev)}, loop=loop)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING):
            board.close()
        assert not dev.closed
        assert any("did not stop" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
    assert loop.close() is True


def test_a_board_whose_loop_stops_closes_its_devices():
    loop = EventLoop("plain")
    loop.start()
    dev = _Device()
    board = Board(None, None, None, None, {}, {"net0": SimpleNamespace(device=dev)}, loop=loop)  # type: ignore[arg-type]
    board.close()
    assert dev.closed and board.loop is None
