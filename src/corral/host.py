"""What the host offers: KVM API, hardware virtualization or PVM, and the capabilities corral uses."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from corral.kvm import Kvm
from corral.kvm import constants as K

# (capability, name, what corral uses it for, needed to run at all)
CAPABILITIES: list[tuple[int, str, str, bool]] = [
    (K.CAP_IRQCHIP, "IRQCHIP", "in-kernel PIC, IOAPIC and LAPIC", True),
    (K.CAP_PIT2, "PIT2", "in-kernel i8254 timer", True),
    (K.CAP_USER_MEMORY, "USER_MEMORY", "guest RAM from a memfd mapping", True),
    (K.CAP_SET_TSS_ADDR, "SET_TSS_ADDR", "real-mode TSS on VMX hosts", True),
    (K.CAP_EXT_CPUID, "EXT_CPUID", "per-vCPU CPUID and topology", True),
    (K.CAP_MP_STATE, "MP_STATE", "SMP bring-up state (INIT/SIPI) and snapshots", False),
    (K.CAP_IOEVENTFD, "IOEVENTFD", "virtio doorbells off the vCPU exit path", False),
    (K.CAP_IRQFD, "IRQFD", "device interrupts without a vCPU exit", False),
    (K.CAP_IRQ_ROUTING, "IRQ_ROUTING", "MSI-X routing for PCI devices", False),
    (K.CAP_COALESCED_MMIO, "COALESCED_MMIO", "batched writes to chatty registers", False),
    (K.CAP_SET_GUEST_DEBUG, "SET_GUEST_DEBUG", "gdb breakpoints and single-step", False),
    (K.CAP_XSAVE, "XSAVE", "FPU/AVX state in snapshots", False),
    (K.CAP_XCRS, "XCRS", "XCR0 in snapshots", False),
    (K.CAP_VCPU_EVENTS, "VCPU_EVENTS", "pending events in snapshots", False),
    (K.CAP_DEBUGREGS, "DEBUGREGS", "debug registers in snapshots", False),
    (K.CAP_ADJUST_CLOCK, "ADJUST_CLOCK", "kvmclock across snapshot/restore", False),
    (K.CAP_MANUAL_DIRTY_LOG_PROTECT2, "MANUAL_DIRTY_LOG_PROTECT2", "live-migration dirty logging", False),
    (K.CAP_DIRTY_LOG_RING, "DIRTY_LOG_RING", "dirty ring for live migration", False),
    (K.CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT", "race-free vCPU kicks", True),
    (K.CAP_READONLY_MEM, "READONLY_MEM", "read-only memory slots (ROMs)", False),
    (K.CAP_TSC_CONTROL, "TSC_CONTROL", "TSC frequency across migration", False),
]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass
class HostReport:
    kvm_path: str
    api_version: int | None = None
    error: str | None = None
    virtualization: str = "unknown"   # "vmx", "svm", "pvm" or "unknown"
    capabilities: dict[str, int] = field(default_factory=dict)
    max_vcpus: int = 0
    recommended_vcpus: int = 0
    missing_required: list[str] = field(default_factory=list)

    @property
    def is_pvm(self) -> bool:
        return self.virtualization == "pvm"

    @property
    def usable(self) -> bool:
        return self.error is None and not self.missing_required


def probe_host(kvm_path: str = "/dev/kvm") -> HostReport:
    rep = HostReport(kvm_path=kvm_path)
    flags = _cpu_flags()
    if os.path.isdir("/sys/module/kvm_pvm"):
        rep.virtualization = "pvm"
    elif "vmx" in flags:
        rep.virtualization = "vmx"
    elif "svm" in flags:
        rep.virtualization = "svm"
    try:
        kvm = Kvm(kvm_path)
    except Exception as exc:  # HostError with its own message
        rep.error = str(exc)
        return rep
    try:
        rep.api_version = K.KVM_API_VERSION
        for cap, name, _, required in CAPABILITIES:
            value = kvm.check_extension(cap)
            rep.capabilities[name] = value
            if required and not value:
                rep.missing_required.append(name)
        rep.max_vcpus = kvm.check_extension(K.CAP_MAX_VCPUS)
        rep.recommended_vcpus = kvm.check_extension(K.CAP_NR_VCPUS)
    finally:
        kvm.close()
    return rep


PVM_EXPLANATION = (
    "this host's /dev/kvm is PVM (no hardware virtualization): guest ring-0 code is emulated at "
    "about a million instructions per second, so a stock Linux kernel cannot boot here; run the "
    "probe guest (corral run --image probe), a PVM-enlightened kernel, or use a host with VT-x/AMD-V"
)
