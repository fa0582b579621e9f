"""virtio-console on a real pseudo-terminal and on a file, driven by the Python driver."""

from __future__ import annotations

import os

import pytest
from support.fakes import FakeLoop
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
    with pytest.raises(ConfigError, match="cannot open console file"):
        ConsoleBackend(f"file={tmp_path}/no/such/dir/x.log")
