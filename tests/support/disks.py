"""Host-side material for the probe's virtio scenarios, shared by the corral and QEMU tests and
the benchmark: a disk image whose every sector starts with its number and a marker."""

from __future__ import annotations

import struct
from pathlib import Path

MARKER = b"CORRALDISK"
PROBE_WRITE = b"PROBE-WROTE-THIS"  # what blk-check writes at the start of sector 3


def patterned_image(path: Path, sectors: int = 4096) -> Path:
    path.write_bytes(
        b"".join(struct.pack("<Q", i) + MARKER + bytes(502 - len(MARKER) + 2) for i in range(sectors))
    )
    return path


def sector(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(512 * n)
        return f.read(512)
