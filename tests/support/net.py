"""A fresh tap device for a test that sends the guest's frames to the host (needs root)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def fresh_tap(prefix: str, *, up: bool = False) -> Iterator[str]:
    """A new tap named `prefix` + 6 random hex digits, deleted afterwards; skips unless root."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a tap")
    tap = prefix + uuid.uuid4().hex[:6]
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    try:
        if up:
            subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        yield tap
    finally:
        subprocess.run(["ip", "tuntap", "del", tap, "mode", "tap"], capture_output=True)


def rx_packets(tap: str) -> int:
    """Frames the host received on `tap` so far."""
    return int(Path(f"/sys/class/net/{tap}/statistics/rx_packets").read_text())
