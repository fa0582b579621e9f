"""KVM's own per-vCPU counters, read from its binary statistics fd (KVM_GET_STATS_FD).

With the in-kernel irqchip a halted vCPU waits inside KVM and interrupts are injected there, so
the VMM never sees either as an exit; KVM counts them (halt_exits, halt_wakeup, irq_injections,
...) and publishes them through this fd: a header, descriptors (name, type, size, offset), then
the values as u64s (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD").

The fd is opened once, with the vCPU, before it first runs, and kept: KVM_GET_STATS_FD is a vCPU
ioctl, so it takes the vCPU's mutex, which KVM_RUN holds for as long as the guest runs. Asked from
another thread while the guest runs, it waits (killable, so in D state) until the vCPU next leaves
KVM_RUN, which an idle guest halted in KVM may not do for seconds; on PVM, where the vCPU's thread
stays on its CPU, the waiter spins on that mutex (seen: a reader in D state spinning a CPU).
Reading the fd takes no lock: pread at explicit offsets (its llseek is a no-op) from any thread.
Every size in the header is bounded before it is used: a kernel that lies cannot make us
allocate or loop without end.
"""

from __future__ import annotations

import os
import struct

from corral.errors import HostError
from corral.kvm.fds import KvmError, VcpuFd

HEADER = struct.Struct("<IIIIII")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size; then the name
TYPE_MASK = 0xF
TYPE_CUMULATIVE, TYPE_INSTANT, TYPE_PEAK = 0, 1, 2  # 3, 4: histograms (not read here)
MAX_NAME = 256
MAX_DESCS = 1024
MAX_BYTES = 1 << 20  # the whole fd: x86 KVM 6.x has ~40 vCPU stats, a few KiB with histograms


class StatsFormatError(HostError):
    """KVM's statistics fd did not hold what its header promised."""

    def __init__(self, what: str) -> None:
        super().__init__(f"KVM_GET_STATS_FD: {what}")


def _pread(fd: int, size: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), offset + len(out))
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


class VcpuStats:
    """One vCPU's statistics fd: `open` it while the vCPU is not running, `read` it from any
    thread, `close` it with the vCPU."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, vcpu_fd: VcpuFd) -> VcpuStats | None:
        """The vCPU's stats fd, or None where KVM has none (before Linux 5.14)."""
        try:
            return cls(vcpu_fd.stats_fd())
        except KvmError:
            return None

    def read(self) -> dict[str, int]:
        """Every scalar counter KVM keeps for this vCPU, by KVM's name (halt_exits,
        irq_injections, halt_wakeup, exits, ...), counted since the vCPU was created."""
        fd = self.fd
        blob = _pread(fd, HEADER.size, 0)
        if len(blob) != HEADER.size:
            raise StatsFormatError(f"a {len(blob)}-byte header")
        header = HEADER.unpack(blob)
        _flags, name_size, num_desc, _id, _desc_offset, data_offset = header
        if name_size > MAX_NAME or num_desc > MAX_DESCS or not HEADER.size <= data_offset <= MAX_BYTES:
            raise StatsFormatError(f"{num_desc} descriptors, {name_size}-byte names, data at {data_offset}")
        blob = _pread(fd, data_offset, 0)
        end = max(
            (data_offset + off + 8 * size for _n, _f, size, off in descriptors(blob, header)), default=0
        )
        if end > MAX_BYTES:
            raise StatsFormatError(f"{end} bytes of statistics")
        return parse(_pread(fd, end, 0), header)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["StatsFormatError", "VcpuStats", "descriptors", "parse"]
