"""KVM's own per-vCPU counters, read from its binary statistics fd (KVM_GET_STATS_FD).

With the in-kernel irqchip a halted vCPU waits inside KVM and interrupts are injected there, so
the VMM never sees either as an exit; KVM counts them (halt_exits, halt_wakeup, irq_injections,
...) and publishes them through this fd: a header, descriptors (name, type, size, offset), then
the values as u64s (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD").

The fd is read from offset 0 in one pass each time (its llseek is a no-op, so no seek back), and
every size in the header is bounded before it is used: a kernel that lies cannot make us allocate
or loop without end.

PVM (kvm_pvm, the project's CI hosts): reading a vCPU's stats fd there once left the reader in D
state spinning a CPU, so `refusal()` names that host and corral never opens the fd on it.
"""

from __future__ import annotations

import os
import struct

from corral.errors import HostError
from corral.kvm.fds import VcpuFd

HEADER = struct.Struct("<IIIIII")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size; then the name
TYPE_MASK = 0xF
TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK = 0, 1, 2  # 3, 4: histograms (not read here)
MAX_NAME = 256
MAX_DESCS = 1024
MAX_BYTES = 1 << 20  # the whole fd: x86 KVM 6.x has ~40 vCPU stats, a few KiB with histograms

PVM_REFUSAL = (
    "KVM's statistics fd is not read on a PVM host (kvm_pvm): reading it once hung the reader "
    "in the kernel; halts and injected interrupts are counted only on VT-x/AMD-V hosts"
)


class StatsFormatError(HostError):
    """KVM's statistics fd did not hold what its header promised."""

    def __init__(self, what: str) -> None:
        super().__init__(f"KVM_GET_STATS_FD: {what}")


def refusal(is_pvm: bool) -> str | None:
    """Why this host's stats fd is not read (one line), or None when it is."""
    return PVM_REFUSAL if is_pvm else None


def _read(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.read(fd, size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def descriptors(blob: bytes, header: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
    """(name, flags, size in u64s, offset in the data block) of each descriptor in `blob` (the
    fd's bytes up to the data block)."""
    _flags, name_size, num_desc, _id_offset, desc_offset, _data_offset = header
    step = DESC.size + name_size
    out = []
    for i in range(num_desc):
        at = desc_offset + i * step
        if at + step > len(blob):
            raise StatsFormatError(f"descriptor {i} lies past the end ({len(blob)} bytes)")
        flags, _exp, size, offset, _bucket = DESC.unpack_from(blob, at)
        name = blob[at + DESC.size : at + step].split(b"\0", 1)[0].decode("ascii", "replace")
        out.append((name, flags, size, offset))
    return out


def parse(blob: bytes, header: tuple[int, ...]) -> dict[str, int]:
    """The scalar (cumulative, instant and peak) values in one stats fd's contents."""
    data_offset = header[5]
    values: dict[str, int] = {}
    for name, flags, size, offset in descriptors(blob, header):
        if flags & TYPE_MASK not in (TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK) or size != 1:
            continue  # histograms
        where = data_offset + offset
        if where + 8 > len(blob):
            raise StatsFormatError(f"the value of {name} lies past the end ({len(blob)} bytes)")
        values[name] = struct.unpack_from("<Q", blob, where)[0]
    return values


def read_vcpu_stats(vcpu_fd: VcpuFd) -> dict[str, int]:
    """Every scalar counter KVM keeps for this vCPU, by KVM's name (halt_exits, irq_injections,
    halt_wakeup, exits, ...). Raises KvmError when KVM has no stats fd (before Linux 5.14)."""
    fd = vcpu_fd.stats_fd()
    try:
        blob = _read(fd, HEADER.size)
        if len(blob) != HEADER.size:
            raise StatsFormatError(f"a {len(blob)}-byte header")
        header = HEADER.unpack(blob)
        _flags, name_size, num_desc, _id, _desc_offset, data_offset = header
        if name_size > MAX_NAME or num_desc > MAX_DESCS or not HEADER.size <= data_offset <= MAX_BYTES:
            raise StatsFormatError(f"{num_desc} descriptors, {name_size}-byte names, data at {data_offset}")
        blob += _read(fd, data_offset - HEADER.size)
        end = max(
            (data_offset + off + 8 * size for _n, _f, size, off in descriptors(blob, header)), default=0
        )
        if end > MAX_BYTES:
            raise StatsFormatError(f"{end} bytes of statistics")
        return parse(blob + _read(fd, end - len(blob)), header)
    finally:
        os.close(fd)


__all__ = ["PVM_REFUSAL", "StatsFormatError", "descriptors", "parse", "read_vcpu_stats", "refusal"]
