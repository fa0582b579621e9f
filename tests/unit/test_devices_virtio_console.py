"""virtio-console on a real pseudo-terminal and on a file, driven by the Python driver."""

from __future__ import annotations

import os
import stat

import pytest
from support.fakes import FakeLoop
from support.hostile import fifo, umask
from support.virtio_driver import Driver

from corral.backends.console import ConsoleBackend
from corral.devices.virtio.console import VirtioConsole
from corral.errors import ConfigError


def test_pty_both_ways():
    loop = FakeLoop()
    backend = ConsoleBackend("pty")
    d = Driver(VirtioConsole(backend, loop))
    user = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
    try:
        d.setup()
        d.submit(1, [(d.alloc(b"hello from hvc0\n"), False)])
        assert os.read(user, 100) == b"hello from hvc0\n"
        bufs = {}
        for _ in range(2):
            b = d.alloc(64)
            bufs[d.submit(0, [(b, True)], kick=False)] = b
        d.kick(0)
        os.write(user, b"typed by the user")
        loop.run_ready(timeout=2)
        ((head, n),) = d.used(0)
        assert d.mem.read(bufs[head][0], n) == b"typed by the user"
    finally:
        os.close(user)
        d.close()


def test_input_waits_for_buffers():
    loop = FakeLoop()
    backend = ConsoleBackend("pty")
    d = Driver(VirtioConsole(backend, loop))
    user = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
    try:
        d.setup()
        os.write(user, b"early")
        loop.run_ready(timeout=1)  # no buffers: nothing read, the pty stops being watched
        assert backend.fd not in loop.readers
        b = d.alloc(64)
        d.submit(0, [(b, True)])  # the kick reads what waited
        ((_head, n),) = d.used(0)
        assert d.mem.read(b[0], n) == b"early"
    finally:
        os.close(user)
        d.close()


def test_file_backend(tmp_path):
    d = Driver(VirtioConsole(ConsoleBackend(f"file={tmp_path / 'hvc0.log'}"), FakeLoop()))
    try:
        d.setup()
        d.submit(1, [(d.alloc(b"line one\n"), False)])
        d.submit(1, [(d.alloc(b"line two\n"), False)])
        assert (tmp_path / "hvc0.log").read_bytes() == b"line one\nline two\n"
    finally:
        d.close()


def test_bad_specs(tmp_path):
    with pytest.raises(ConfigError, match="^virtio_console 'tcp:1234': use 'pty' or 'file=PATH'"):
        ConsoleBackend("tcp:1234")
    with pytest.raises(ConfigError, match="console file .* cannot be created: its directory does not exist"):
        ConsoleBackend(f"file={tmp_path}/no/such/dir/x.log")


def test_a_console_file_is_new_0600_never_a_symlink_never_a_fifo(tmp_path):
    with umask(0):
        ConsoleBackend(f"file={tmp_path / 'hvc0.log'}").close()
    assert stat.S_IMODE(os.stat(tmp_path / "hvc0.log").st_mode) == 0o600
    target = tmp_path / "precious"
    target.write_text("keep")
    (tmp_path / "link.log").symlink_to(target)
    with pytest.raises(ConfigError) as exc:
        ConsoleBackend(f"file={tmp_path / 'link.log'}")
    assert str(exc.value) == (
        f"virtio_console: console file {tmp_path / 'link.log'} is a symbolic link: give the file itself"
    )
    assert target.read_text() == "keep"
    with fifo(tmp_path / "pipe") as pipe:
        with pytest.raises(ConfigError, match="cannot be opened|is not a regular file"):
            ConsoleBackend(f"file={pipe}")
        reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # with a reader the open succeeds
        try:
            with pytest.raises(ConfigError, match=f"console file {pipe} is not a regular file"):
                ConsoleBackend(f"file={pipe}")
        finally:
            os.close(reader)
    ConsoleBackend("file=/dev/null").close()  # a character device is fine


def test_receive_serves_a_queues_worth_per_wake():
    """A pty that never runs dry and a guest that refills each buffer as it is filled would
    hold the device loop forever: one wake fills at most a queue's worth, and the pty stays
    watched so the loop comes back for the rest."""
    loop = FakeLoop()
    backend = ConsoleBackend("pty")
    dev = VirtioConsole(backend, loop)
    d = Driver(dev)
    user = os.open(backend.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        d.setup(queue_size=64)
        assert dev.rx is not None
        push, filled = dev.rx.push, []

        def refill(head: int, written: int) -> None:  # the guest re-posts each buffer at once
            push(head, written)
            filled.append(written)
            d.put_avail(0, head, kick=False)

        dev.rx.push = refill  # type: ignore[method-assign]
        os.write(user, b"x" * 4000)
        for _ in range(64):
            d.submit(0, [(d.alloc(8), True)], kick=False)
        dev._receive()  # one wake of the pty reader
        assert len(filled) == 64 and sum(filled) == 64 * 8
        assert backend.fd in loop.readers  # the rest comes on the loop's next turn
        dev._receive()
        assert len(filled) == 128
    finally:
        os.close(user)
        d.close()
