"""The host ends of one vsock stream, for the probe's `vsock-tx-bench` and `vsock-rx-bench`
(tests/kvm/test_vsock_probe.py, bench/vsock_bench.py): a Sink that the guest's connect to CID 2
reaches (corral connects it to `<uds>_<port>`), and a Source that connects through the uds with
Firecracker's `CONNECT <port>\\n`, reads `OK <port>\\n` and streams. Each counts the bytes and the
CRC-32 (zlib's, as the probe prints) of what it received or sent, so the two ends can be compared.
Both are threads with a deadline: a peer that never comes ends the thread, never the test run.

    with Sink(uds, 5000, timeout=60) as sink:      # listening before the guest starts
        run = run_probe("vsock-tx-bench 5000 8", vsock=...)
    sink.result                                     # {"bytes": ..., "crc": ..., "error": None}
"""

from __future__ import annotations

import random
import socket
import threading
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

MiB = 1 << 20


class _Peer(threading.Thread):
    def __init__(self, timeout: float) -> None:
        super().__init__(daemon=True)
        self.deadline = time.monotonic() + timeout
        self.result: dict[str, Any] = {"bytes": 0, "crc": 0, "error": None}

    def left(self) -> float:
        return max(0.01, self.deadline - time.monotonic())

    def __enter__(self) -> _Peer:
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.join(self.left() + 1)


class Sink(_Peer):
    """Listens on `<uds>_<port>`, takes one connection and reads it to EOF. With `hold_s`, reads
    nothing for that long after the connection (a slow host program). `first_at` and `last_at`:
    when the first and the last bytes came (time.monotonic)."""

    def __init__(self, uds: Path, port: int, timeout: float, hold_s: float = 0.0) -> None:
        super().__init__(timeout)
        self.hold_s = hold_s
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{uds}_{port}")
        self.listener.listen(1)

    def run(self) -> None:
        crc = n = 0
        try:
            self.listener.settimeout(self.left())
            conn, _ = self.listener.accept()
            with conn:
                time.sleep(min(self.hold_s, self.left()))
                while True:
                    conn.settimeout(self.left())
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    self.result["last_at"] = time.monotonic()
                    if not n:
                        self.result["first_at"] = self.result["last_at"]
                    crc, n = zlib.crc32(data, crc), n + len(data)
        except OSError as exc:
            self.result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            self.listener.close()
            self.result.update(bytes=n, crc=crc)


def pattern(mib: int, seed: int = 16) -> list[memoryview]:
    """`mib` MiB, each MiB a different slice of one random block (a lost or reordered MiB
    changes the CRC)."""
    block = memoryview(random.Random(seed).randbytes(MiB + 65536))
    return [block[(i * 4099) % 65536 :][:MiB] for i in range(mib)]


class Source(_Peer):
    """Connects to the guest's `port` through `uds` (again every 20 ms while the device is not
    up yet: corral closes a CONNECT it cannot forward), streams `size` bytes (whole MiB) after
    the `OK` line, then reads until the guest's end closes the stream (`ok_at`, `sent_at`,
    `eof_at`: when the OK came, the last byte was handed to the socket, the EOF came)."""

    def __init__(self, uds: Path, port: int, size: int, timeout: float) -> None:
        super().__init__(timeout)
        if size % MiB:
            raise ValueError(f"Source streams whole MiB, not {size} bytes")
        self.uds, self.port, self.chunks = uds, port, pattern(size // MiB)
        self.result["ok_at"] = self.result["sent_at"] = self.result["eof_at"] = 0.0

    def _connect(self) -> socket.socket:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(self.left())
                s.connect(str(self.uds))
                s.sendall(f"CONNECT {self.port}\n".encode())
                line = b""
                while not line.endswith(b"\n") and len(line) < 64:
                    c = s.recv(1)
                    if not c:
                        break
                    line += c
                if line.startswith(b"OK "):
                    return s
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
                pass
            s.close()
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"no guest listener on vsock port {self.port}")
            time.sleep(0.02)

    def run(self) -> None:
        crc = n = 0
        try:
            with self._connect() as s:
                self.result["ok_at"] = time.monotonic()
                for chunk in self.chunks:
                    s.settimeout(self.left())
                    s.sendall(chunk)
                    crc, n = zlib.crc32(chunk, crc), n + len(chunk)
                self.result["sent_at"] = time.monotonic()
                s.settimeout(self.left())
                while s.recv(4096):
                    pass
                self.result["eof_at"] = time.monotonic()
        except OSError as exc:
            self.result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            self.result.update(bytes=n, crc=crc)
