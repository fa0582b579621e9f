"""A minimal GDB remote-protocol client over a real socket, for the stub's tests: what gdb
itself cannot be made to send (malformed packets, a raw Ctrl-C, a second debugger)."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from corral.debug.packets import PacketReader, frame
from support.cli import corral_popen


class RemoteClient:
    def __init__(self, address: tuple[str, int] | str, timeout: float = 20.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.reader = PacketReader()
        self.packets: list[bytes] = []
        self.raw = bytearray()  # every byte received, acks included

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))

    def receive(self, timeout: float = 20.0) -> bytes:
        """The next packet from the stub (acks are skipped; they stay in `raw`)."""
        deadline = time.monotonic() + timeout
        while not self.packets:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the stub closed the connection")
            self.raw += data
            self.packets += [ev.data for ev in self.reader.feed(data) if ev.kind == "packet"]
        return self.packets.pop(0)

    def ask(self, payload: bytes, timeout: float = 20.0) -> bytes:
        self.send(payload)
        return self.receive(timeout)

    def close(self) -> None:
        self.sock.close()


class GdbVm:
    """`corral run --gdb ...` of the probe (or `corral COMMAND... --gdb ...`: `command`), with
    the address its stub listens on."""

    def __init__(
        self, cmdline: str, *extra: str, gdb: str = "tcp:127.0.0.1:0", command: tuple[str, ...] = ()
    ) -> None:
        run = command or ("run", "--image", "probe", "--memory", "256M", "--cmdline", cmdline)
        self.proc = corral_popen(*run, "--gdb", gdb, *extra)
        self.err = b""
        deadline = time.monotonic() + 60
        while b"gdb stub on" not in self.err:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.err.decode()
            if select.select([self.proc.stderr], [], [], 0.2)[0]:
                self.err += os.read(self.proc.stderr.fileno(), 4096)
        where = re.search(rb"gdb stub on (\S+?)(;|\n)", self.err).group(1).decode()
        self.address: tuple[str, int] | str = where[5:]
        if where.startswith("tcp:"):
            host, _, port = where[4:].rpartition(":")
            self.address = (host, int(port))
        self.target = where[5:] if where.startswith("unix:") else f"{self.address[0]}:{self.address[1]}"

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(errors="replace"), (self.err + err).decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(read: Callable[[], bytes | str], text: bytes | str, timeout: float = 30) -> None:
    """Wait until `read()` (a console so far) holds `text`."""
    deadline = time.monotonic() + timeout
    while text not in read():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{text!r} never came: {read()[-2000:]!r}"
        time.sleep(0.05)


def gdb_batch(target: str, elf: Path, *commands: str, timeout: float = 90) -> str:
    """Real gdb in batch mode: `target remote TARGET`, then each command; its whole output."""
    args = ["gdb", "-batch", "-nx", "-ex", f"target remote {target}"]
    for c in commands:
        args += ["-ex", c]
    r = subprocess.run([*args, str(elf)], capture_output=True, text=True, timeout=timeout)
    return r.stdout + r.stderr
