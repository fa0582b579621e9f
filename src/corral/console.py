"""The host terminal as the guest's serial console: raw input, Ctrl-A escapes as in QEMU."""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable

CTRL_A = 0x01
HELP = b"\r\nC-a x    quit corral\r\nC-a h    this help\r\nC-a C-a  send C-a to the guest\r\n"


class TerminalConsole:
    """Forwards host stdin to the guest; Ctrl-A X asks the machine to stop."""

    def __init__(
        self, send: Callable[[bytes], None], quit_: Callable[[], None], stdin_fd: int | None = None
    ) -> None:
        self.send = send
        self.quit = quit_
        self.fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
        self._saved: list | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._escape = False

    def __enter__(self) -> TerminalConsole:
        try:
            is_tty = os.isatty(self.fd)
        except OSError:
            is_tty = False
        if is_tty:
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
            # keep output processing so guest "\n" still returns the carriage
            attrs = termios.tcgetattr(self.fd)
            attrs[1] |= termios.OPOST | termios.ONLCR
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self._thread = threading.Thread(target=self._pump, name="console-in", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _pump(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return  # EOF: the guest keeps running without input
            self.send(self._filter(data))

    def _filter(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b in (ord("x"), ord("X")):
                    self.quit()
                elif b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("h"), ord("H"), ord("?")):
                    sys.stdout.buffer.write(HELP)
                    sys.stdout.buffer.flush()
            elif b == CTRL_A:
                self._escape = True
            else:
                out.append(b)
        return bytes(out)
