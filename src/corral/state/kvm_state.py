"""The state KVM keeps for a VM and its vCPUs, captured as raw kernel structs.

The structs are carried as bytes: their layouts are the kernel ABI (checked against
<linux/kvm.h> by the tests), so a snapshot holds exactly what KVM handed out and gives it back.
Restore order follows what KVM needs: CPUID first, special registers (APIC base) before the
LAPIC, MSRs after the LAPIC (TSC deadline), pending events last.
"""

from __future__ import annotations

import ctypes as C
import logging

from pydantic import BaseModel

from corral.devices.base import StateBytes

from corral.kvm import KvmError, VcpuFd, VmFd
from corral.kvm import structs as S

log = logging.getLogger(__name__)

IRQCHIPS = (S.KVM_IRQCHIP_PIC_MASTER, S.KVM_IRQCHIP_PIC_SLAVE, S.KVM_IRQCHIP_IOAPIC)
_CPUID_ENTRY = C.sizeof(S.KvmCpuidEntry2)


class VcpuState(BaseModel):
    index: int
    cpuid: StateBytes
    regs: StateBytes
    sregs: StateBytes
    xsave: StateBytes
    xcrs: StateBytes
    lapic: StateBytes
    events: StateBytes
    debugregs: StateBytes
    mp_state: int
    msrs: list[tuple[int, int]]


class VmKvmState(BaseModel):
    irqchips: list[StateBytes]
    pit: StateBytes
    clock: int


def _raw(obj: C.Structure) -> bytes:
    return bytes(memoryview(obj).cast("B"))


def savable_msrs(fd: VcpuFd, candidates: list[int]) -> list[int]:
    """The MSRs among `candidates` that this vCPU lets us read (KVM's index list names some a
    given CPU model lacks); KVM_GET_MSRS stops at the first it refuses."""
    good: list[int] = []
    rest = list(candidates)
    while rest:
        n = len(fd.get_msrs(rest))
        good.extend(rest[:n])
        rest = rest[n + 1:]
    return good


def save_vcpu(fd: VcpuFd, index: int, cpuid: list[S.KvmCpuidEntry2], msr_indices: list[int]) -> VcpuState:
    return VcpuState(
        index=index,
        cpuid=b"".join(_raw(e) for e in cpuid),
        regs=_raw(fd.get_regs()), sregs=_raw(fd.get_sregs()), xsave=_raw(fd.get_xsave()),
        xcrs=_raw(fd.get_xcrs()), lapic=_raw(fd.get_lapic()), events=_raw(fd.get_vcpu_events()),
        debugregs=_raw(fd.get_debugregs()), mp_state=fd.get_mp_state(),
        msrs=sorted(fd.get_msrs(msr_indices).items()),
    )


def cpuid_entries(state: VcpuState) -> list[S.KvmCpuidEntry2]:
    raw = state.cpuid
    return [S.KvmCpuidEntry2.from_buffer_copy(raw, i) for i in range(0, len(raw), _CPUID_ENTRY)]


def _struct(cls: type[C.Structure], raw: bytes, what: str) -> C.Structure:
    if len(raw) != C.sizeof(cls):
        raise ValueError(f"{what}: {len(raw)} bytes, expected {C.sizeof(cls)}")
    return cls.from_buffer_copy(raw)


def load_vcpu(fd: VcpuFd, state: VcpuState) -> None:
    """Put `state` into a freshly created vCPU (one that has never run)."""
    fd.set_cpuid2(cpuid_entries(state))
    fd.set_mp_state(state.mp_state)
    fd.set_regs(_struct(S.KvmRegs, state.regs, "regs"))
    fd.set_sregs(_struct(S.KvmSregs, state.sregs, "sregs"))
    fd.set_xsave(_struct(S.KvmXsave, state.xsave, "xsave"))
    fd.set_xcrs(_struct(S.KvmXcrs, state.xcrs, "xcrs"))
    fd.set_debugregs(_struct(S.KvmDebugregs, state.debugregs, "debugregs"))
    fd.set_lapic(_struct(S.KvmLapicState, state.lapic, "lapic"))
    msrs = dict(state.msrs)
    try:
        fd.set_msrs(msrs)
    except KvmError:
        # one at a time, to name the MSR KVM refuses (only read-only ones should be)
        for idx, value in msrs.items():
            try:
                fd.set_msrs({idx: value})
            except KvmError as exc:
                log.debug("vcpu%d: MSR %#x not restored: %s", state.index, idx, exc)
    fd.set_vcpu_events(_struct(S.KvmVcpuEvents, state.events, "vcpu events"))


def save_vm(vm: VmFd) -> VmKvmState:
    return VmKvmState(irqchips=[_raw(vm.get_irqchip(c)) for c in IRQCHIPS],
                      pit=_raw(vm.get_pit2()), clock=vm.get_clock().clock)


def load_vm(vm: VmFd, state: VmKvmState) -> None:
    for raw in state.irqchips:
        vm.set_irqchip(_struct(S.KvmIrqchip, raw, "irqchip"))
    vm.set_pit2(_struct(S.KvmPitState2, state.pit, "pit"))
    set_clock(vm, state.clock)


def set_clock(vm: VmFd, ns: int) -> None:
    vm.set_clock(S.KvmClockData(clock=ns))


__all__ = ["VcpuState", "VmKvmState", "save_vcpu", "load_vcpu", "save_vm", "load_vm",
           "savable_msrs", "cpuid_entries", "set_clock"]
