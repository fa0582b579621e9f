"""The CPU state a loader asks the boot vCPU to start in, as plain data (no KVM types).

The vCPU layer turns this into KVM_SET_REGS/KVM_SET_SREGS; loaders never talk to KVM.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple


class Segment(NamedTuple):
    base: int
    limit: int
    selector: int
    type: int  # 4-bit descriptor type
    present: int = 1
    dpl: int = 0
    db: int = 0  # 1 = 32-bit default operand size
    s: int = 1  # 1 = code/data, 0 = system
    l: int = 0  # noqa: E741 - the L (64-bit code) bit, named as in the SDM and kvm_segment
    g: int = 1


class BootCpuState(NamedTuple):
    """Registers of the boot CPU at the kernel's entry point.

    `gprs` holds general registers by lower-case name ("rsi", "rbx", "rax", ...); anything not
    named starts at zero. Segments cover cs and ds (ds is used for ds/es/fs/gs/ss); `tr` is the
    TSS KVM requires to be valid even though the kernel never uses it.
    """

    rip: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment
    tr: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    rsp: int = 0
    rflags: int = 0x2
    gprs: Mapping[str, int] = MappingProxyType({})
