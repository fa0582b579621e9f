"""Kvm, VmFd and VcpuFd: thin typed wrappers over the /dev/kvm file descriptors.

This package is the only place in corral that issues KVM ioctls. Failures raise `KvmError`,
which names the ioctl and the errno.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os
from typing import Any

from corral.errors import HostError
from corral.kvm import constants as K
from corral.kvm import structs as S

_IOCTL_NAMES = {v: k for k, v in vars(K).items() if k.startswith("KVM_") and isinstance(v, int)}
_libc = C.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_libc.ioctl.restype = C.c_int


class KvmError(HostError):
    """A KVM ioctl failed."""

    def __init__(self, request: int, err: int, what: str = "") -> None:
        self.request = request
        self.errno = err
        name = _IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        detail = f" ({what})" if what else ""
        super().__init__(f"{name}{detail} failed: {errno.errorcode.get(err, err)} {os.strerror(err)}")


class _Fd:
    """Owns one KVM file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _ioctl(self, request: int, arg: Any = 0, what: str = "") -> int:
        try:
            if isinstance(arg, int):
                if arg > 0x7FFF_FFFF:
                    # fcntl.ioctl takes only a C int; wide values go through libc directly
                    ret = _libc.ioctl(self.fd, request, arg)
                    if ret < 0:
                        raise OSError(C.get_errno(), os.strerror(C.get_errno()))
                    return ret
                return fcntl.ioctl(self.fd, request, arg)
            return fcntl.ioctl(self.fd, request, arg, True)
        except OSError as exc:
            raise KvmError(request, exc.errno or 0, what) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Kvm(_Fd):
    """The /dev/kvm system fd: capabilities, supported CPUID and MSRs, VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostError(
                f"{path} does not exist: load the kvm module (kvm-intel or kvm-amd) or run on a host with KVM"
            ) from None
        except PermissionError:
            raise HostError(
                f"no permission to open {path}: add your user to the 'kvm' group or run as root"
            ) from None
        except OSError as exc:
            raise HostError(f"cannot open {path}: {exc.strerror}") from None
        super().__init__(fd)
        self.path = path
        version = self._ioctl(K.KVM_GET_API_VERSION)
        if version != K.KVM_API_VERSION:
            self.close()
            raise HostError(f"{path} speaks KVM API {version}, corral needs {K.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return self._ioctl(K.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self._ioctl(K.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[S.KvmCpuidEntry2]:
        n = 256
        while True:
            buf = S.kvm_cpuid2(n)
            try:
                self._ioctl(K.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [S.KvmCpuidEntry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        n = 512
        while True:
            buf = S.kvm_msr_list(n)
            try:
                self._ioctl(K.KVM_GET_MSR_INDEX_LIST, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 16384:
                    n *= 4
                    continue
                raise
            return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> VmFd:
        return VmFd(self._ioctl(K.KVM_CREATE_VM, 0), self)


class VmFd(_Fd):
    """A VM: memory slots, the in-kernel irqchip and PIT, interrupt lines, vCPU creation."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, cap: int) -> int:
        return self._ioctl(K.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = S.KvmUserspaceMemoryRegion(slot, flags, gpa, size, host_addr)
        self._ioctl(K.KVM_SET_USER_MEMORY_REGION, region, f"slot {slot} at {gpa:#x}+{size:#x}")

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl(K.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl(K.KVM_SET_IDENTITY_MAP_ADDR, C.c_uint64(addr))

    def create_irqchip(self) -> None:
        self._ioctl(K.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        self._ioctl(K.KVM_CREATE_PIT2, S.KvmPitConfig(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        self._ioctl(K.KVM_IRQ_LINE, S.KvmIrqLevel(irq, level))

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = S.KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        self._ioctl(K.KVM_ENABLE_CAP, ec, f"cap {cap}")

    def get_irqchip(self, chip_id: int) -> S.KvmIrqchip:
        chip = S.KvmIrqchip(chip_id=chip_id)
        self._ioctl(K.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: S.KvmIrqchip) -> None:
        self._ioctl(K.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> S.KvmPitState2:
        st = S.KvmPitState2()
        self._ioctl(K.KVM_GET_PIT2, st)
        return st

    def set_pit2(self, st: S.KvmPitState2) -> None:
        self._ioctl(K.KVM_SET_PIT2, st)

    def get_clock(self) -> S.KvmClockData:
        cd = S.KvmClockData()
        self._ioctl(K.KVM_GET_CLOCK, cd)
        return cd

    def set_clock(self, cd: S.KvmClockData) -> None:
        self._ioctl(K.KVM_SET_CLOCK, cd)

    def get_dirty_log(self, slot: int, pages: int) -> bytearray:
        """The slot's dirty-page bitmap since the last call (bit n: page n of the slot); KVM
        clears it as it hands it over. The slot must have MEM_LOG_DIRTY_PAGES set."""
        bitmap = bytearray(((pages + 63) // 64) * 8)
        buf = (C.c_char * len(bitmap)).from_buffer(bitmap)
        self._ioctl(
            K.KVM_GET_DIRTY_LOG, S.KvmDirtyLog(slot=slot, dirty_bitmap=C.addressof(buf)), f"slot {slot}"
        )
        del buf
        return bitmap

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        self._ioctl(K.KVM_REGISTER_COALESCED_MMIO, S.KvmCoalescedMmioZone(addr, size, int(pio)))

    def set_gsi_routing(self, entries: list[S.KvmIrqRoutingEntry]) -> None:
        table = S.kvm_irq_routing(len(entries))
        for i, e in enumerate(entries):
            table.entries[i] = e
        self._ioctl(K.KVM_SET_GSI_ROUTING, table, f"{len(entries)} routes")

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        self._ioctl(K.KVM_IRQFD, S.KvmIrqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resamplefd))

    def ioeventfd(self, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0) -> None:
        self._ioctl(
            K.KVM_IOEVENTFD, S.KvmIoeventfd(datamatch=datamatch, addr=addr, len=length, fd=fd, flags=flags)
        )

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = self._ioctl(K.KVM_CREATE_VCPU, vcpu_id, f"vcpu {vcpu_id}")
        return VcpuFd(fd, vcpu_id, self.kvm.vcpu_mmap_size())


class VcpuFd(_Fd):
    """One vCPU: registers, CPUID, MSRs, LAPIC, MP state, and KVM_RUN with its shared page."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.id = vcpu_id
        self.run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_buf = memoryview(self.run_map)

    def run(self) -> None:
        """Enter the guest until the next exit. Raises OSError (EINTR on a signal) as is:
        the vCPU loop handles it on the hot path without wrapping."""
        fcntl.ioctl(self.fd, K.KVM_RUN, 0)

    def get_regs(self) -> S.KvmRegs:
        r = S.KvmRegs()
        self._ioctl(K.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: S.KvmRegs) -> None:
        self._ioctl(K.KVM_SET_REGS, r)

    def get_sregs(self) -> S.KvmSregs:
        s = S.KvmSregs()
        self._ioctl(K.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: S.KvmSregs) -> None:
        self._ioctl(K.KVM_SET_SREGS, s)

    def get_fpu(self) -> S.KvmFpu:
        f = S.KvmFpu()
        self._ioctl(K.KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: S.KvmFpu) -> None:
        self._ioctl(K.KVM_SET_FPU, f)

    def set_cpuid2(self, entries: list[S.KvmCpuidEntry2]) -> None:
        buf = S.kvm_cpuid2(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        self._ioctl(K.KVM_SET_CPUID2, buf)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = S.kvm_msrs(len(indices))
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = self._ioctl(K.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        buf = S.kvm_msrs(len(values))
        for i, (idx, val) in enumerate(values.items()):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        n = self._ioctl(K.KVM_SET_MSRS, buf)
        if n != len(values):
            bad = buf.entries[n].index
            raise KvmError(K.KVM_SET_MSRS, errno.EINVAL, f"KVM refused MSR {bad:#x}")
        return n

    def get_lapic(self) -> S.KvmLapicState:
        s = S.KvmLapicState()
        self._ioctl(K.KVM_GET_LAPIC, s)
        return s

    def set_lapic(self, s: S.KvmLapicState) -> None:
        self._ioctl(K.KVM_SET_LAPIC, s)

    def get_mp_state(self) -> int:
        s = S.KvmMpState()
        self._ioctl(K.KVM_GET_MP_STATE, s)
        return s.mp_state

    def set_mp_state(self, state: int) -> None:
        self._ioctl(K.KVM_SET_MP_STATE, S.KvmMpState(state))

    def get_vcpu_events(self) -> S.KvmVcpuEvents:
        s = S.KvmVcpuEvents()
        self._ioctl(K.KVM_GET_VCPU_EVENTS, s)
        return s

    def set_vcpu_events(self, s: S.KvmVcpuEvents) -> None:
        self._ioctl(K.KVM_SET_VCPU_EVENTS, s)

    def get_debugregs(self) -> S.KvmDebugregs:
        s = S.KvmDebugregs()
        self._ioctl(K.KVM_GET_DEBUGREGS, s)
        return s

    def set_debugregs(self, s: S.KvmDebugregs) -> None:
        self._ioctl(K.KVM_SET_DEBUGREGS, s)

    def get_xsave(self) -> S.KvmXsave:
        s = S.KvmXsave()
        self._ioctl(K.KVM_GET_XSAVE, s)
        return s

    def set_xsave(self, s: S.KvmXsave) -> None:
        self._ioctl(K.KVM_SET_XSAVE, s)

    def get_xcrs(self) -> S.KvmXcrs:
        s = S.KvmXcrs()
        self._ioctl(K.KVM_GET_XCRS, s)
        return s

    def set_xcrs(self, s: S.KvmXcrs) -> None:
        self._ioctl(K.KVM_SET_XCRS, s)

    def translate(self, gva: int) -> int | None:
        """The guest-physical address of guest-virtual `gva` under the vCPU's current page
        tables, or None if it is not mapped."""
        t = S.KvmTranslation(linear_address=gva)
        self._ioctl(K.KVM_TRANSLATE, t)
        return t.physical_address if t.valid else None

    def kvmclock_ctrl(self) -> bool:
        """Tell the guest (through its kvmclock page) that the VM was paused; False when the
        guest has no kvmclock."""
        try:
            self._ioctl(K.KVM_KVMCLOCK_CTRL)
        except KvmError as exc:
            if exc.errno == errno.EINVAL:
                return False
            raise
        return True

    def stats_fd(self) -> int:
        """A new read-only fd of this vCPU's binary statistics (KVM_GET_STATS_FD); the caller
        closes it."""
        return self._ioctl(K.KVM_GET_STATS_FD, what="the vCPU's statistics")

    def set_guest_debug(self, control: int, debugregs: list[int] | None = None) -> None:
        g = S.KvmGuestDebug(control=control)
        for i, v in enumerate(debugregs or []):
            g.debugreg[i] = v
        self._ioctl(K.KVM_SET_GUEST_DEBUG, g)

    def close(self) -> None:
        try:
            self.run_buf.release()
            self.run_map.close()
        except (BufferError, ValueError):
            pass
        super().close()
