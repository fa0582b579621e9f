"""KVM's binary statistics fd, parsed from bytes laid out as Documentation/virt/kvm/api.rst says
(header, id string, descriptors, data), read at explicit offsets (again and again: the fd stays
open with its vCPU), and refused when its header or descriptors lie."""

from __future__ import annotations

import os
import struct

import pytest

from corral.errors import HostError
from corral.kvm.fds import KvmError
from corral.vstate.kvm_stats import DESC, HEADER, MAX_DESCS, StatsFormatError, VcpuStats

NAME_SIZE = 48
CUMULATIVE, PEAK, LOG_HIST = 0, 2, 4


def blob(stats: list[tuple[str, int, list[int]]], *, num_desc: int | None = None, name_size: int = NAME_SIZE):
    """A stats fd's contents: (name, type, values) per descriptor."""
    ident = b"kvm-1234/vcpu-0".ljust(NAME_SIZE, b"\0")
    desc_offset = HEADER.size + len(ident)
    descs, data = b"", b""
    for name, kind, values in stats:
        descs += DESC.pack(kind, 0, len(values), len(data), 0) + name.encode().ljust(name_size, b"\0")
        data += struct.pack(f"<{len(values)}Q", *values)
    data_offset = desc_offset + len(descs)
    n = len(stats) if num_desc is None else num_desc
    return HEADER.pack(0, name_size, n, HEADER.size, desc_offset, data_offset) + ident + descs + data


class FakeVcpuFd:
    """A VcpuFd whose stats fd is a memfd holding `data`, its file position left at the end (as a
    read() would leave KVM's: only pread reads it again)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened: list[int] = []

    def stats_fd(self) -> int:
        fd = os.memfd_create("stats")
        os.write(fd, self.data)
        self.opened.append(fd)
        return fd


def read(data: bytes) -> dict[str, int]:
    stats = VcpuStats.open(FakeVcpuFd(data))  # type: ignore[arg-type]
    assert stats is not None
    try:
        return stats.read()
    finally:
        stats.close()


def test_scalar_counters_are_read_and_histograms_skipped():
    fake = FakeVcpuFd(
        blob(
            [
                ("halt_exits", CUMULATIVE, [41]),
                ("halt_wait_hist", LOG_HIST, list(range(32))),
                ("irq_injections", CUMULATIVE, [1 << 40]),
                ("halt_poll_success_ns", PEAK, [7]),
            ]
        )
    )
    stats = VcpuStats.open(fake)  # type: ignore[arg-type]
    assert stats is not None
    want = {"halt_exits": 41, "irq_injections": 1 << 40, "halt_poll_success_ns": 7}
    assert stats.read() == want and stats.read() == want  # read again: same fd, same answer
    stats.close()
    with pytest.raises(OSError):
        os.fstat(fake.opened[0])


@pytest.mark.parametrize(
    "data, words",
    [
        (blob([("a", 0, [1])], num_desc=5), "descriptor 1 lies past the end"),
        (blob([("a", 0, [1])], num_desc=1 << 30), "descriptors"),  # no 2^30-iteration loop
        (blob([("a", 0, [1])], name_size=1 << 20), "names"),
        (blob([("a", 0, [1])])[:-4], "the value of a lies past the end"),
        (b"\1\2\3", "a 3-byte header"),
    ],
)
def test_a_lying_stats_fd_is_one_clear_error(data, words):
    with pytest.raises(StatsFormatError, match=words) as exc:
        read(data)
    assert isinstance(exc.value, HostError) and "\n" not in str(exc.value)


def test_a_huge_value_offset_is_refused_before_reading():
    data = bytearray(blob([("a", 0, [1])]))
    at = HEADER.size + NAME_SIZE
    struct.pack_into("<I", data, at + 8, 1 << 31)  # the descriptor's offset into the data block
    with pytest.raises(StatsFormatError, match="bytes of statistics"):
        read(bytes(data))


def test_a_kvm_without_stats_fds_gives_none():
    class Old:
        def stats_fd(self) -> int:
            raise KvmError(0xAE_CE, 25)  # ENOTTY: before Linux 5.14

    assert VcpuStats.open(Old()) is None  # type: ignore[arg-type]
    assert MAX_DESCS < 1 << 16
