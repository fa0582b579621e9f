"""ctypes mirrors of the <linux/kvm.h> structures corral passes to KVM (x86-64).

Layouts follow /usr/include/linux/kvm.h and asm/kvm.h; tests/unit/test_kvm_structs.py compiles
a C program against the real header and compares every size and offset.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class KvmUserspaceMemoryRegion(C.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmRegs(C.Structure):
    _fields_ = [
        (n, u64) for n in "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
    ]


class KvmSegment(C.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class KvmSregs(C.Structure):
    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmFpu(C.Structure):
    _fields_ = [
        ("fpr", u8 * 128),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", u8 * 256),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmLapicState(C.Structure):
    # bytes, not c_char: a c_char array reads as a string cut at its first NUL
    _fields_ = [("regs", C.c_uint8 * 1024)]


class KvmCpuidEntry2(C.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


def kvm_cpuid2(n: int) -> C.Structure:
    """A `struct kvm_cpuid2` with room for `n` entries."""

    class KvmCpuid2(C.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]

    return KvmCpuid2(nent=n)


class KvmIrqRoutingIrqchip(C.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class KvmIrqRoutingMsi(C.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _KvmIrqRoutingU(C.Union):
    _fields_ = [("irqchip", KvmIrqRoutingIrqchip), ("msi", KvmIrqRoutingMsi), ("pad", u32 * 8)]


class KvmIrqRoutingEntry(C.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _KvmIrqRoutingU)]


def kvm_irq_routing(n: int) -> C.Structure:
    """A `struct kvm_irq_routing` with room for `n` entries."""

    class KvmIrqRouting(C.Structure):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", KvmIrqRoutingEntry * n)]

    return KvmIrqRouting(nr=n)


class KvmMsrEntry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


def kvm_msrs(n: int) -> C.Structure:
    """A `struct kvm_msrs` with room for `n` entries."""

    class KvmMsrs(C.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * n)]

    return KvmMsrs(nmsrs=n)


def kvm_msr_list(n: int) -> C.Structure:
    class KvmMsrList(C.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return KvmMsrList(nmsrs=n)


class KvmPitConfig(C.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class KvmIrqLevel(C.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmMpState(C.Structure):
    _fields_ = [("mp_state", u32)]


class KvmTranslation(C.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class KvmDebugregs(C.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class KvmVcpuEvents(C.Structure):
    # Kept opaque: snapshot code saves and restores it as bytes.
    _fields_ = [("raw", u8 * 64)]


class KvmXsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


class KvmXcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmIrqchip(C.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2


class KvmPitState2(C.Structure):
    _fields_ = [("raw", u8 * 112)]


class KvmClockData(C.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class KvmEnableCap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmGuestDebug(C.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


class KvmCoalescedMmioZone(C.Structure):
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class KvmIrqfd(C.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class KvmIoeventfd(C.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", C.c_int32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class KvmDirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


# ---- struct kvm_run: read through fixed offsets on the mmap'ed page (no copies per exit) ---
RUN_REQUEST_INTERRUPT_WINDOW = 0
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_READY_FOR_INJECTION = 12
RUN_IF_FLAG = 13
RUN_UNION = 32
RUN_IO_DIRECTION = 32
RUN_IO_SIZE = 33
RUN_IO_PORT = 34
RUN_IO_COUNT = 36
RUN_IO_DATA_OFFSET = 40
RUN_MMIO_PHYS_ADDR = 32
RUN_MMIO_DATA = 40
RUN_MMIO_LEN = 48
RUN_MMIO_IS_WRITE = 52
RUN_INTERNAL_SUBERROR = 32
RUN_INTERNAL_NDATA = 36
RUN_INTERNAL_DATA = 40
RUN_SYSTEM_EVENT_TYPE = 32
RUN_SYSTEM_EVENT_NDATA = 36
RUN_SYSTEM_EVENT_DATA = 40
RUN_DEBUG_EXCEPTION = 32  # struct kvm_debug_exit_arch: exception, pad, pc, dr6, dr7
RUN_DEBUG_PC = 40
RUN_DEBUG_DR6 = 48
RUN_DEBUG_DR7 = 56
RUN_FAIL_ENTRY_REASON = 32
RUN_FAIL_ENTRY_CPU = 40
RUN_SIZE = 2352
