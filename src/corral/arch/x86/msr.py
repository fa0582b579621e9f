"""The MSR values a vCPU starts with, as a Linux guest expects them after firmware."""

from __future__ import annotations

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_IA32_CR_PAT = 0x277
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6
PAT_POWER_ON = 0x0007_0406_0007_0406


def boot_msrs(supported: set[int]) -> dict[int, int]:
    """MSRs to set on every vCPU before it runs, limited to those KVM supports here."""
    wanted = {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        # Firmware would enable MTRRs with write-back as the default type; Linux then maps RAM WB.
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
        MSR_IA32_CR_PAT: PAT_POWER_ON,
    }
    return {k: v for k, v in wanted.items() if k in supported or k == MSR_MTRR_DEF_TYPE}


# kvm paravirtual MSRs a guest enables (kvmclock, steal time, async PF, PV EOI): a reset turns
# them off, and the guest's resume path turns them on again
MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW = 0x12, 0x4B56_4D01
MSR_KVM_ASYNC_PF_EN, MSR_KVM_STEAL_TIME, MSR_KVM_PV_EOI_EN = 0x4B56_4D02, 0x4B56_4D03, 0x4B56_4D04
APICBASE_DEFAULT = 0xFEE0_0000 | 1 << 11  # the xAPIC enabled at its reset address
APICBASE_BSP = 1 << 8


def wake_msrs(supported: set[int], bsp: bool) -> dict[int, int]:
    """MSRs as a CPU has them after the reset an ACPI S3 resume starts with: boot_msrs, the
    xAPIC back in xAPIC mode at its address, and the kvm paravirtual MSRs off."""
    pv = (MSR_KVM_SYSTEM_TIME, MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_ASYNC_PF_EN, MSR_KVM_STEAL_TIME)
    out = {MSR_IA32_APICBASE: APICBASE_DEFAULT | (APICBASE_BSP if bsp else 0)}
    out.update({m: 0 for m in (*pv, MSR_KVM_PV_EOI_EN) if m in supported})
    out.update(boot_msrs(supported))
    return out
