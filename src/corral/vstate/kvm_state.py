"""The state KVM keeps for a VM and its vCPUs, captured as raw kernel structs.

The structs are carried as bytes: their layouts are the kernel ABI (checked against
<linux/kvm.h> by the tests), so a snapshot holds exactly what KVM handed out and gives it back.
Restore order follows what KVM needs: CPUID first, special registers (APIC base) before the
LAPIC, MSRs after the LAPIC (TSC deadline), pending events last.
"""

from __future__ import annotations

import ctypes as C
import logging
from typing import TypeVar

from corral.devices.base import StateBytes
from corral.kvm import KvmError, VcpuFd, VmFd
from corral.kvm import structs as S
from corral.lazymodel import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

_CPUID_ENTRY = C.sizeof(S.KvmCpuidEntry2)
_S = TypeVar("_S", bound=C.Structure)


class VcpuState(BaseModel):
    """One vCPU as KVM holds it; each bytes field is the named kernel struct, whole."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # built on first save/load

    index: int = Field(ge=0, description="the vCPU's id (its APIC id)")
    cpuid: StateBytes = Field(description="kvm_cpuid_entry2[]: the CPUID the guest sees")
    regs: StateBytes = Field(description="kvm_regs: general registers, rip, rflags")
    sregs: StateBytes = Field(description="kvm_sregs: segments, control registers, EFER, APIC base")
    xsave: StateBytes = Field(description="kvm_xsave: FPU, SSE and AVX state")
    xcrs: StateBytes = Field(description="kvm_xcrs: XCR0")
    lapic: StateBytes = Field(description="kvm_lapic_state: the local APIC's register page")
    events: StateBytes = Field(description="kvm_vcpu_events: pending exceptions, interrupts, NMIs")
    debugregs: StateBytes = Field(description="kvm_debugregs: DR0-DR3, DR6, DR7")
    mp_state: int = Field(ge=0, description="KVM_MP_STATE_*: runnable, halted, waiting for SIPI")
    msrs: dict[int, int] = Field(description="MSR index -> value, for every MSR KVM lets us read")


class VmKvmState(BaseModel):
    """The in-kernel platform devices and clock of a VM."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # built on first save/load

    pic_master: StateBytes = Field(description="kvm_irqchip: the master 8259")
    pic_slave: StateBytes = Field(description="kvm_irqchip: the slave 8259")
    ioapic: StateBytes = Field(description="kvm_irqchip: the IOAPIC")
    pit: StateBytes = Field(description="kvm_pit_state2: the i8254 timer")
    clock: int = Field(description="kvmclock in nanoseconds (when paused: at the pause)")


def _raw(obj: C.Structure) -> bytes:
    return bytes(memoryview(obj).cast("B"))


def readable_msrs(fd: VcpuFd, candidates: list[int]) -> dict[int, int]:
    """The values of the MSRs among `candidates` that this vCPU lets us read (KVM's index list
    names some a given CPU model lacks): KVM_GET_MSRS stops at the first it refuses, so the
    read goes on after it. One ioctl when none is refused."""
    out: dict[int, int] = {}
    rest = list(candidates)
    while rest:
        got = fd.get_msrs(rest)
        out.update(got)
        rest = rest[len(got) + 1 :]
    return out


def savable_msrs(fd: VcpuFd, candidates: list[int]) -> list[int]:
    """The MSRs among `candidates` that this vCPU lets us read."""
    return list(readable_msrs(fd, candidates))


def save_vcpu(fd: VcpuFd, index: int, cpuid: list[S.KvmCpuidEntry2], msr_indices: list[int]) -> VcpuState:
    return VcpuState(
        index=index,
        cpuid=cpuid_bytes(cpuid),
        regs=_raw(fd.get_regs()),
        sregs=_raw(fd.get_sregs()),
        xsave=_raw(fd.get_xsave()),
        xcrs=_raw(fd.get_xcrs()),
        lapic=_raw(fd.get_lapic()),
        events=_raw(fd.get_vcpu_events()),
        debugregs=_raw(fd.get_debugregs()),
        mp_state=fd.get_mp_state(),
        msrs=readable_msrs(fd, msr_indices),
    )


def cpuid_bytes(entries: list[S.KvmCpuidEntry2]) -> bytes:
    """A CPUID table as VcpuState.cpuid carries it."""
    return b"".join(_raw(e) for e in entries)


def cpuid_entries(state: VcpuState) -> list[S.KvmCpuidEntry2]:
    raw = state.cpuid
    return [S.KvmCpuidEntry2.from_buffer_copy(raw, i) for i in range(0, len(raw), _CPUID_ENTRY)]


def _struct(cls: type[_S], raw: bytes, what: str) -> _S:
    if len(raw) != C.sizeof(cls):
        raise ValueError(f"{what}: {len(raw)} bytes, expected {C.sizeof(cls)}")
    return cls.from_buffer_copy(raw)


def load_vcpu(fd: VcpuFd, state: VcpuState, *, cpuid_set: bool = False) -> None:
    """Put `state` into a freshly created vCPU (one that has never run); `cpuid_set`: its
    CPUID already is the state's (set before the state came: not set again)."""
    if not cpuid_set:
        fd.set_cpuid2(cpuid_entries(state))
    fd.set_mp_state(state.mp_state)
    fd.set_regs(_struct(S.KvmRegs, state.regs, "regs"))
    fd.set_sregs(_struct(S.KvmSregs, state.sregs, "sregs"))
    fd.set_xsave(_struct(S.KvmXsave, state.xsave, "xsave"))
    fd.set_xcrs(_struct(S.KvmXcrs, state.xcrs, "xcrs"))
    fd.set_debugregs(_struct(S.KvmDebugregs, state.debugregs, "debugregs"))
    fd.set_lapic(_struct(S.KvmLapicState, state.lapic, "lapic"))
    msrs = state.msrs
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
    return VmKvmState(
        pic_master=_raw(vm.get_irqchip(S.KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=_raw(vm.get_irqchip(S.KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=_raw(vm.get_irqchip(S.KVM_IRQCHIP_IOAPIC)),
        pit=_raw(vm.get_pit2()),
        clock=vm.get_clock().clock,
    )


def load_vm(vm: VmFd, state: VmKvmState) -> None:
    for chip, raw in (
        (S.KVM_IRQCHIP_PIC_MASTER, state.pic_master),
        (S.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave),
        (S.KVM_IRQCHIP_IOAPIC, state.ioapic),
    ):
        irqchip = _struct(S.KvmIrqchip, raw, "irqchip")
        if irqchip.chip_id != chip:
            raise ValueError(f"irqchip: chip {irqchip.chip_id} saved where chip {chip} belongs")
        vm.set_irqchip(irqchip)
    vm.set_pit2(_struct(S.KvmPitState2, state.pit, "pit"))
    set_clock(vm, state.clock)


def set_clock(vm: VmFd, ns: int) -> None:
    vm.set_clock(S.KvmClockData(clock=ns))


__all__ = [
    "VcpuState",
    "VmKvmState",
    "cpuid_bytes",
    "cpuid_entries",
    "load_vcpu",
    "load_vm",
    "savable_msrs",
    "save_vcpu",
    "save_vm",
    "set_clock",
]
