"""memtest86+ for the lab: Debian bookworm's `memtest86+` package (pinned by SHA-256 in
corral.images.firmware_deb), its memtest86+x64.bin taken out into corral's cache, and a reader
for what it writes on the serial console.

memtest86+ mirrors its 80x25 text screen on the serial line as VT100: cursor moves
(ESC [ row ; col H) followed by the characters of the changed region, colours (ESC [ ... m) and
clears. Grepping that stream for words is unreliable (a field's label and its value arrive in
different updates, far apart), so `Screen` replays it onto a character grid and the tests read
fields off the final screen, as a person would read the monitor.
"""

from __future__ import annotations

import re
from pathlib import Path

from corral.images.firmware_deb import MEMTEST86, extracted

MEMTEST_BIN = "boot/memtest86+x64.bin"
ROWS, COLS = 25, 80
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b[()][0-9A-Za-z]|\x1b[=>78cDEM]")


def ensure_memtest() -> Path:
    """memtest86+x64.bin (Linux boot protocol 2.12, LOADED_HIGH) from the pinned package."""
    return extracted(MEMTEST86, MEMTEST_BIN, progress=False)


class Screen:
    """An 80x25 character grid that a VT100 byte stream is replayed onto (only what memtest86+
    sends: cursor position and moves, erase in display/line, attributes ignored)."""

    def __init__(self, rows: int = ROWS, cols: int = COLS) -> None:
        self.rows, self.cols = rows, cols
        self.grid = [[" "] * cols for _ in range(rows)]
        self.row = self.col = 0

    def feed(self, text: str) -> Screen:
        pos = 0
        for m in _CSI.finditer(text):
            self._put(text[pos : m.start()])
            if m.group(2):
                self._csi(m.group(1), m.group(2))
            pos = m.end()
        self._put(text[pos:])
        return self

    def _put(self, chars: str) -> None:
        for ch in chars:
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row = min(self.row + 1, self.rows - 1)
            elif ch == "\b":
                self.col = max(self.col - 1, 0)
            elif ch >= " ":
                if self.col < self.cols:
                    self.grid[self.row][self.col] = ch
                self.col = min(self.col + 1, self.cols)

    def _csi(self, params: str, cmd: str) -> None:
        nums = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else []
        first = nums[0] if nums and nums[0] else 1
        if cmd in "Hf":
            row = nums[0] if nums and nums[0] else 1
            col = nums[1] if len(nums) > 1 and nums[1] else 1
            self.row, self.col = min(row, self.rows) - 1, min(col, self.cols) - 1
        elif cmd == "A":
            self.row = max(self.row - first, 0)
        elif cmd == "B":
            self.row = min(self.row + first, self.rows - 1)
        elif cmd == "C":
            self.col = min(self.col + first, self.cols - 1)
        elif cmd == "D":
            self.col = max(self.col - first, 0)
        elif cmd == "J":
            mode = nums[0] if nums else 0
            rows = range(self.rows) if mode == 2 else range(self.row + 1, self.rows)
            for r in rows:
                self.grid[r] = [" "] * self.cols
            if mode != 2:
                self.grid[self.row][self.col :] = [" "] * (self.cols - self.col)
        elif cmd == "K":
            self.grid[self.row][self.col :] = [" "] * (self.cols - self.col)

    def text(self) -> str:
        return "\n".join("".join(r).rstrip() for r in self.grid)

    def field(self, label: str) -> str:
        """The word after `label` (e.g. "Pass:") on the screen, or "" when the label is not
        there: memtest86+'s status fields are a label and a value on one line."""
        m = re.search(re.escape(label) + r"\s*(\S+)", self.text())
        return m.group(1) if m else ""


def passes(screen: Screen) -> int:
    """memtest86+'s pass counter ("Pass:" in the status block), -1 before it is drawn."""
    value = screen.field("Pass:")
    return int(value) if value.isdigit() else -1


def pass_percent(screen: Screen) -> int:
    """How far the pass is (the "Pass NN%" bar), -1 before it is drawn."""
    m = re.search(r"Pass\s+(\d+)%", screen.text())
    return int(m.group(1)) if m else -1


def current_test(screen: Screen) -> str:
    """The test memtest86+ runs now, as its status block names it ("#7 [Block move]")."""
    m = re.search(r"Test (#\d+ \[[^\]]*\])", screen.text())
    return m.group(1) if m else ""


def watch(out: Path, pid: int, limit: float, until: str = "", poll: float = 2.0) -> bool:
    """Inside the lab: replay `out` (the VMM's console) until memtest86+ counts a pass (or
    starts the test `until` names, e.g. "#10"), the VMM `pid` ends or `limit` seconds pass.
    Prints when each test starts (seconds since the watch began); True when it got there."""
    import contextlib
    import os
    import time

    t0 = time.monotonic()
    count, shown, screen, held, offset = -1, "", Screen(), "", 0
    while time.monotonic() - t0 < limit:
        with contextlib.suppress(FileNotFoundError), open(out, "rb") as f:
            f.seek(offset)
            chunk = f.read()
            offset += len(chunk)
            text = held + chunk.decode("latin-1")
            cut = text.rfind("\x1b")  # an escape sequence the VMM has not finished writing
            cut = cut if cut >= 0 and _CSI.match(text, cut) is None and len(text) - cut < 16 else len(text)
            screen.feed(text[:cut])
            held = text[cut:]
        count, test = passes(screen), current_test(screen)
        if test != shown:
            print(f"memtest t={time.monotonic() - t0:.0f}s {test}", flush=True)
            shown = test
        if count >= 1:
            print(f"memtest t={time.monotonic() - t0:.0f}s pass {count} complete", flush=True)
            return True
        if until and test.startswith(until + " "):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(poll)
    return False


if __name__ == "__main__":  # python lab_memtest.py OUT PID LIMIT_S [UNTIL_TEST] (inside the lab)
    import sys

    until = sys.argv[4] if len(sys.argv) > 4 else ""
    sys.exit(0 if watch(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), until) else 1)
