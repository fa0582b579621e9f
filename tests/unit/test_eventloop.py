"""The device event loop: fd readers and writers, call_soon from any thread, pause/resume held
between callbacks, stop/close, and one failing handler not stopping the others."""

import logging
import os
import socket
import threading
import time

import pytest

from corral.eventloop import EventLoop

WAIT = 5.0


@pytest.fixture
def loop():
    lp = EventLoop("test-loop")
    yield lp
    lp.close()


def _eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _drain(fd):
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _barrier(loop):
    """Wait until the loop has run everything queued before this call."""
    done = threading.Event()
    loop.call_soon(done.set)
    assert done.wait(WAIT)


def test_reader_runs_on_the_loop_thread_when_its_fd_is_readable(loop):
    fd = _eventfd()
    seen = []
    ran = threading.Event()

    def on_read():
        _drain(fd)
        seen.append(threading.current_thread().name)
        ran.set()

    loop.add_reader(fd, on_read)
    loop.start()
    assert not ran.wait(0.05)  # nothing to read yet
    os.eventfd_write(fd, 1)
    assert ran.wait(WAIT)
    assert seen == ["test-loop"]
    loop.remove_reader(fd)
    os.close(fd)


def test_removed_reader_is_not_called_again(loop):
    fd = _eventfd()
    calls = []
    loop.add_reader(fd, lambda: (_drain(fd), calls.append(1)))
    loop.start()
    os.eventfd_write(fd, 1)
    deadline = time.monotonic() + WAIT
    while not calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert calls == [1]
    loop.remove_reader(fd)
    os.eventfd_write(fd, 1)  # readable, but nobody listens now
    time.sleep(0.05)
    _barrier(loop)
    assert calls == [1]
    os.close(fd)


def test_reader_and_writer_share_one_fd_and_are_removed_independently(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    wrote, read = threading.Event(), threading.Event()
    got = []

    def on_write():
        wrote.set()
        loop.remove_writer(a.fileno())  # nothing more to send

    def on_read():
        got.append(a.recv(16))
        read.set()

    loop.add_reader(a.fileno(), on_read)
    loop.add_writer(a.fileno(), on_write)
    loop.start()
    assert wrote.wait(WAIT)  # a fresh socket is writable at once
    assert not read.is_set()
    b.send(b"ping")  # the reader survived the writer's removal
    assert read.wait(WAIT)
    assert got == [b"ping"]
    loop.remove_reader(a.fileno())
    # with both gone the fd is unregistered; registering it again must work
    read.clear()
    loop.add_reader(a.fileno(), on_read)
    b.send(b"again")
    assert read.wait(WAIT)
    assert got[-1] == b"again"
    loop.remove_reader(a.fileno())
    a.close()
    b.close()


def test_call_soon_from_many_threads_runs_every_call_on_the_loop_in_order_per_thread(loop):
    loop.start()
    ran: dict[int, list[int]] = {t: [] for t in range(4)}
    threads_seen = set()

    def producer(t):
        for i in range(200):

            def call(t=t, i=i):
                threads_seen.add(threading.current_thread().name)
                ran[t].append(i)

            loop.call_soon(call)

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    _barrier(loop)
    assert all(ran[t] == list(range(200)) for t in range(4))
    assert threads_seen == {"test-loop"}


def test_call_soon_before_start_runs_once_started(loop):
    ran = threading.Event()
    loop.call_soon(ran.set)
    assert not ran.wait(0.05)
    loop.start()
    assert ran.wait(WAIT)


def test_a_failing_handler_is_logged_and_the_loop_keeps_serving_others(loop, caplog):
    bad, good = _eventfd(), _eventfd()
    ok = threading.Event()

    def explode():
        _drain(bad)
        raise RuntimeError("device bug")

    loop.add_reader(bad, explode)
    loop.add_reader(good, lambda: (_drain(good), ok.set()))
    loop.start()
    with caplog.at_level(logging.ERROR, logger="corral.eventloop"):
        os.eventfd_write(bad, 1)
        time.sleep(0.05)
        os.eventfd_write(good, 1)
        assert ok.wait(WAIT)
        ok.clear()
        os.eventfd_write(bad, 1)  # the failing device fails again; others still run
        os.eventfd_write(good, 1)
        assert ok.wait(WAIT)
    assert loop._thread is not None and loop._thread.is_alive()
    failures = [r for r in caplog.records if "device event handler failed" in r.getMessage()]
    assert failures and failures[0].exc_info[0] is RuntimeError
    for fd in (bad, good):
        loop.remove_reader(fd)
        os.close(fd)


def test_a_failing_call_does_not_hold_back_the_calls_queued_behind_it(loop):
    ran = threading.Event()

    def explode():
        raise RuntimeError("teardown bug")

    loop.call_soon(explode)
    loop.call_soon(ran.set)  # queued together: one wake-up drains both
    loop.start()
    assert ran.wait(1.0)


def test_a_call_that_queues_itself_again_does_not_starve_the_fds(loop):
    # a device that reschedules the rest of its work (virtio's per-wake budget) runs again
    # on the next turn, after the fds that are ready: here, the one that ends it
    fd = _eventfd()
    stop = threading.Event()
    turns = []

    def again():
        turns.append(1)
        if len(turns) == 1:
            os.eventfd_write(fd, 1)  # ready from now on, while the calls keep coming
        if not stop.is_set() and len(turns) < 1_000_000:
            loop.call_soon(again)

    def on_read():
        _drain(fd)
        stop.set()

    loop.add_reader(fd, on_read)
    loop.call_soon(again)
    loop.start()
    assert stop.wait(WAIT) and len(turns) < 1_000_000
    loop.remove_reader(fd)
    os.close(fd)


def test_pause_holds_the_loop_between_callbacks_until_resume(loop):
    fd = _eventfd()
    counts = []
    rang = threading.Event()

    def ring():
        counts.append(os.eventfd_read(fd))
        rang.set()

    loop.add_reader(fd, ring)
    loop.start()
    assert loop.pause(WAIT) is True
    os.eventfd_write(fd, 1)
    os.eventfd_write(fd, 2)
    assert not rang.wait(0.1)  # held: the doorbell waits in its eventfd
    assert counts == []
    loop.resume()
    assert rang.wait(WAIT)
    assert counts == [3]  # both rings arrive, counted by the eventfd
    loop.remove_reader(fd)
    os.close(fd)


def test_pause_on_a_loop_not_started_and_a_second_pause_return_true_at_once(loop):
    assert loop.pause(0.01) is True  # no thread: nothing to hold
    loop.start()
    assert loop.pause(WAIT) is True
    t0 = time.monotonic()
    assert loop.pause(WAIT) is True  # already held
    assert time.monotonic() - t0 < 1.0
    loop.resume()
    _barrier(loop)


def test_pause_reports_false_while_a_callback_runs_past_the_timeout(loop):
    release, busy = threading.Event(), threading.Event()

    def slow():
        busy.set()
        release.wait(WAIT)

    loop.start()
    loop.call_soon(slow)
    assert busy.wait(WAIT)
    assert loop.pause(0.05) is False
    loop.resume()
    release.set()
    _barrier(loop)  # the loop goes on after the failed pause


def test_stop_runs_calls_queued_before_it_and_ends_the_thread(loop):
    loop.start()
    thread = loop._thread
    ran = []
    loop.call_soon(lambda: ran.append("teardown"))
    loop.stop()
    assert ran == ["teardown"]
    assert not thread.is_alive()


def test_stop_releases_a_paused_loop(loop):
    loop.start()
    thread = loop._thread
    assert loop.pause(WAIT)
    t0 = time.monotonic()
    loop.stop()
    assert time.monotonic() - t0 < 4.0
    assert not thread.is_alive()


def test_a_stopped_loop_starts_again(loop):
    loop.start()
    loop.stop()
    ran = threading.Event()
    loop.start()
    loop.call_soon(ran.set)
    assert ran.wait(WAIT)


def test_close_stops_the_thread_and_closes_the_wake_fd():
    lp = EventLoop("closing")
    lp.start()
    thread, wake = lp._thread, lp._wake
    lp.close()
    assert not thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(wake)


def test_close_of_a_loop_never_started():
    lp = EventLoop()
    wake = lp._wake
    lp.close()
    with pytest.raises(OSError):
        os.fstat(wake)
