"""A minimal GDB remote-protocol client over a real socket, for the stub's tests: what gdb
itself cannot be made to send (malformed packets, a raw Ctrl-C, a second debugger)."""

from __future__ import annotations

import socket
import time

from corral.debug.packets import PacketReader, frame


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
