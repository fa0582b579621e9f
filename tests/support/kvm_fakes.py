"""Stand-ins for the KVM fds, for unit tests of the code that holds them, and a tiny real VM.

The fakes record what would have been ioctls, so a test can check the calls a unit makes
(a routing table, an ioeventfd, a run page) without a kernel. `RealModeVm` is the smallest real
VM that runs a few real-mode instructions on /dev/kvm, for the checks only KVM can answer;
ring-0 and real-mode code is emulated (slowly) on PVM hosts, so keep its guest code tiny.
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import struct
import threading
from collections import deque
from collections.abc import Callable

from corral.kvm import Kvm, VcpuFd, VmFd
from corral.kvm import constants as K
from corral.kvm import structs as S


# -- VmFd -------------------------------------------------------------------------------------
class FakeVmFd:
    """A VmFd that records ioctls in `calls` as (name, args...) tuples; routing tables are
    recorded as lists of (gsi, type, detail) tuples so tests can compare them."""

    def __init__(self) -> None:
        self.fd = 99
        self.calls: list[tuple] = []
        self.fail_ioeventfd: Exception | None = None

    def ioeventfd(self, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0) -> None:
        if self.fail_ioeventfd is not None:
            raise self.fail_ioeventfd
        self.calls.append(("ioeventfd", fd, addr, length, flags))

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        self.calls.append(("irqfd", fd, gsi, flags))

    def set_gsi_routing(self, entries: list[S.KvmIrqRoutingEntry]) -> None:
        self.calls.append(("set_gsi_routing", [route_tuple(e) for e in entries]))

    def tables(self) -> list[list[tuple]]:
        return [c[1] for c in self.calls if c[0] == "set_gsi_routing"]

    def close(self) -> None:
        self.fd = -1


def route_tuple(e: S.KvmIrqRoutingEntry) -> tuple:
    """(gsi, "irqchip", chip, pin) or (gsi, "msi", address, data) for one routing entry."""
    if e.type == 1:
        return (e.gsi, "irqchip", e.u.irqchip.irqchip, e.u.irqchip.pin)
    if e.type == 2:
        return (e.gsi, "msi", e.u.msi.address_lo | (e.u.msi.address_hi << 32), e.u.msi.data)
    return (e.gsi, f"type {e.type}")


# -- VcpuFd -----------------------------------------------------------------------------------
Exit = Callable[[memoryview], None]


class FakeVcpuFd:
    """A VcpuFd whose KVM_RUN plays a script: each entry fills the run page (an exit) or is an
    OSError to raise. When the script is spent, run() waits for `feed` and raises EINTR once
    `immediate_exit` is set, as a kicked KVM_RUN does. `pages` keeps a copy of the run page
    each time KVM_RUN is entered, so a test can read what the vCPU wrote back for an exit."""

    def __init__(self, script: list[Exit | OSError] | None = None) -> None:
        self.id = 0
        self.fd = 7
        self.run_map = bytearray(S.RUN_SIZE)
        self.run_buf = memoryview(self.run_map)
        self.script: deque[Exit | OSError] = deque(script or [])
        self.pages: list[bytes] = []
        self.regs = S.KvmRegs()
        self.sregs = S.KvmSregs()
        self.immediate_exit_seen: list[int] = []
        self._more = threading.Condition()

    def feed(self, *entries: Exit | OSError) -> None:
        with self._more:
            self.script.extend(entries)
            self._more.notify_all()

    def run(self) -> None:
        self.pages.append(bytes(self.run_buf))
        self.immediate_exit_seen.append(self.run_buf[S.RUN_IMMEDIATE_EXIT])
        with self._more:
            while not self.script:
                if self.run_buf[S.RUN_IMMEDIATE_EXIT]:
                    raise OSError(errno.EINTR, "Interrupted system call")
                self._more.wait(0.01)
            step = self.script.popleft()
        if isinstance(step, OSError):
            raise step
        self.run_buf[S.RUN_EXIT_REASON : 64] = bytes(64 - S.RUN_EXIT_REASON)
        step(self.run_buf)

    def get_regs(self) -> S.KvmRegs:
        return self.regs

    def get_sregs(self) -> S.KvmSregs:
        return self.sregs

    def translate(self, gva: int) -> int | None:
        return None


def io_exit(
    port: int,
    size: int,
    out: bool,
    values: list[int] | tuple[int, ...] = (),
    count: int = 1,
    data_offset: int = 0x400,
) -> Exit:
    """A KVM_EXIT_IO for `count` accesses of `size` bytes; an OUT carries `values`."""

    def fill(run: memoryview) -> None:
        struct.pack_into("<I", run, S.RUN_EXIT_REASON, K.EXIT_IO)
        struct.pack_into("<BBHIQ", run, S.RUN_IO_DIRECTION, int(out), size, port, count, data_offset)
        for i, v in enumerate(values):
            run[data_offset + i * size : data_offset + (i + 1) * size] = v.to_bytes(size, "little")

    return fill


def mmio_exit(addr: int, length: int, write: bool, value: int = 0) -> Exit:
    def fill(run: memoryview) -> None:
        struct.pack_into("<I", run, S.RUN_EXIT_REASON, K.EXIT_MMIO)
        struct.pack_into(
            "<Q8sIB", run, S.RUN_MMIO_PHYS_ADDR, addr, value.to_bytes(8, "little"), length, int(write)
        )

    return fill


def plain_exit(reason: int, fields: bytes = b"", at: int = S.RUN_UNION) -> Exit:
    """An exit with `reason` and raw `fields` placed at offset `at` of the run page."""

    def fill(run: memoryview) -> None:
        struct.pack_into("<I", run, S.RUN_EXIT_REASON, reason)
        run[at : at + len(fields)] = fields

    return fill


def system_event(kind: int) -> Exit:
    return plain_exit(K.EXIT_SYSTEM_EVENT, struct.pack("<II", kind, 0), S.RUN_SYSTEM_EVENT_TYPE)


def internal_error(suberror: int, data: list[int]) -> Exit:
    return plain_exit(
        K.EXIT_INTERNAL_ERROR,
        struct.pack(f"<II{len(data)}Q", suberror, len(data), *data),
        S.RUN_INTERNAL_SUBERROR,
    )


# -- what a vCPU reports to, and the devices on its buses --------------------------------------
class RecordingHost:
    """A VcpuHost that records each vcpu_stop(kind, status, message) and signals `stopped`."""

    def __init__(self) -> None:
        self.stops: list[tuple[str, int, str]] = []
        self.stopped = threading.Event()

    def vcpu_stop(self, kind: str, status: int, message: str) -> None:
        self.stops.append((kind, status, message))
        self.stopped.set()


class RecordingDevice:
    """A PIO and MMIO device that records accesses as (op, offset, size, value) and answers
    reads from `reads` (offset -> value), else 0."""

    def __init__(self, reads: dict[int, int] | None = None) -> None:
        self.accesses: list[tuple[str, int, int, int | None]] = []
        self.reads = reads or {}
        self.lock = threading.Lock()

    def _read(self, op: str, offset: int, size: int) -> int:
        value = self.reads.get(offset, 0)
        with self.lock:
            self.accesses.append((op, offset, size, value))
        return value

    def _write(self, op: str, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.accesses.append((op, offset, size, value))

    def pio_read(self, offset: int, size: int) -> int:
        return self._read("pio_read", offset, size)

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self._write("pio_write", offset, size, value)

    def mmio_read(self, offset: int, size: int) -> int:
        return self._read("mmio_read", offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self._write("mmio_write", offset, size, value)


# -- a tiny real VM ----------------------------------------------------------------------------
class RealModeVm:
    """A real KVM VM with `ram` bytes of RAM at guest-physical 0 and vCPUs that start in real
    mode at CODE_ADDR with CS base 0 and DS base DATA_BASE (outside RAM, so data accesses are
    MMIO exits unless a test maps something there)."""

    CODE_ADDR = 0x1000
    DATA_BASE = 0x20000
    TSS_ADDR = 0xFFFB_D000

    def __init__(self, *, irqchip: bool = False, pit: bool = False, ram: int = 0x10000) -> None:
        self.kvm = Kvm()
        self.vm: VmFd = self.kvm.create_vm()
        self.vm.set_tss_addr(self.TSS_ADDR)
        if irqchip:
            self.vm.create_irqchip()
        if pit:
            self.vm.create_pit2()
        self.ram = mmap.mmap(-1, ram)
        self._ram_ptr = C.c_char.from_buffer(self.ram)
        self.vm.set_user_memory_region(0, 0, ram, C.addressof(self._ram_ptr))
        self.vcpus: list[VcpuFd] = []

    def vcpu(self, code: bytes = b"\xf4", index: int | None = None) -> VcpuFd:
        """A new vCPU about to run `code` (default: hlt) in real mode."""
        self.ram[self.CODE_ADDR : self.CODE_ADDR + len(code)] = code
        fd = self.vm.create_vcpu(len(self.vcpus) if index is None else index)
        self.vcpus.append(fd)
        s = fd.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        s.ds.base, s.ds.selector = self.DATA_BASE, self.DATA_BASE >> 4
        fd.set_sregs(s)
        r = S.KvmRegs()
        r.rip, r.rflags = self.CODE_ADDR, 0x2
        fd.set_regs(r)
        return fd

    def close(self) -> None:
        for fd in self.vcpus:
            fd.close()
        self.vm.close()
        del self._ram_ptr
        self.ram.close()
        self.kvm.close()


def exit_reason(fd: VcpuFd) -> int:
    return struct.unpack_from("<I", fd.run_buf, S.RUN_EXIT_REASON)[0]


def lapic_bytes(fd: VcpuFd) -> bytearray:
    """The LAPIC register page as bytes (the struct's c_char field stops at the first NUL)."""
    return bytearray(memoryview(fd.get_lapic()).cast("B"))


def lapic_u32(fd: VcpuFd, reg: int) -> int:
    return struct.unpack_from("<I", lapic_bytes(fd), reg)[0]


def set_lapic_u32(fd: VcpuFd, reg: int, value: int) -> None:
    raw = lapic_bytes(fd)
    struct.pack_into("<I", raw, reg, value)
    fd.set_lapic(S.KvmLapicState.from_buffer_copy(raw))


__all__ = [
    "FakeVcpuFd",
    "FakeVmFd",
    "RealModeVm",
    "RecordingDevice",
    "RecordingHost",
    "exit_reason",
    "internal_error",
    "io_exit",
    "lapic_bytes",
    "lapic_u32",
    "mmio_exit",
    "plain_exit",
    "route_tuple",
    "set_lapic_u32",
    "system_event",
]
