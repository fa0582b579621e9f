"""KVM ioctl numbers and constants (x86-64), computed the way <linux/ioctl.h> does."""

from __future__ import annotations

import ctypes as C

from corral.kvm import structs as S

KVMIO = 0xAE
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _ior(nr: int, t: type) -> int:
    return _ioc(_READ, nr, C.sizeof(t))


def _iow(nr: int, t: type) -> int:
    return _ioc(_WRITE, nr, C.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_READ | _WRITE, nr, C.sizeof(t))


class _Cpuid2Hdr(C.Structure):
    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32)]


class _MsrsHdr(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32), ("pad", C.c_uint32)]


class _MsrListHdr(C.Structure):
    _fields_ = [("nmsrs", C.c_uint32)]


class _IrqRoutingHdr(C.Structure):
    _fields_ = [("nr", C.c_uint32), ("flags", C.c_uint32)]


# system
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, _MsrListHdr)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _Cpuid2Hdr)
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, _MsrListHdr)
# vm
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, S.KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, S.KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, C.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, S.KvmIrqLevel)
KVM_GET_IRQCHIP = _iowr(0x62, S.KvmIrqchip)
KVM_SET_IRQCHIP = _ior(0x63, S.KvmIrqchip)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, S.KvmCoalescedMmioZone)
KVM_UNREGISTER_COALESCED_MMIO = _iow(0x68, S.KvmCoalescedMmioZone)
KVM_SET_GSI_ROUTING = _iow(0x6A, _IrqRoutingHdr)
KVM_IRQFD = _iow(0x76, S.KvmIrqfd)
KVM_CREATE_PIT2 = _iow(0x77, S.KvmPitConfig)
KVM_SET_BOOT_CPU_ID = _io(0x78)
KVM_IOEVENTFD = _iow(0x79, S.KvmIoeventfd)
KVM_SET_CLOCK = _iow(0x7B, S.KvmClockData)
KVM_GET_CLOCK = _ior(0x7C, S.KvmClockData)
KVM_GET_PIT2 = _ior(0x9F, S.KvmPitState2)
KVM_SET_PIT2 = _iow(0xA0, S.KvmPitState2)
KVM_ENABLE_CAP = _iow(0xA3, S.KvmEnableCap)
# vcpu
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, S.KvmRegs)
KVM_SET_REGS = _iow(0x82, S.KvmRegs)
KVM_GET_SREGS = _ior(0x83, S.KvmSregs)
KVM_SET_SREGS = _iow(0x84, S.KvmSregs)
KVM_GET_MSRS = _iowr(0x88, _MsrsHdr)
KVM_SET_MSRS = _iow(0x89, _MsrsHdr)
KVM_GET_FPU = _ior(0x8C, S.KvmFpu)
KVM_SET_FPU = _iow(0x8D, S.KvmFpu)
KVM_GET_LAPIC = _ior(0x8E, S.KvmLapicState)
KVM_SET_LAPIC = _iow(0x8F, S.KvmLapicState)
KVM_SET_CPUID2 = _iow(0x90, _Cpuid2Hdr)
KVM_GET_CPUID2 = _iowr(0x91, _Cpuid2Hdr)
KVM_GET_MP_STATE = _ior(0x98, S.KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, S.KvmMpState)
KVM_SET_GUEST_DEBUG = _iow(0x9B, S.KvmGuestDebug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, S.KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, S.KvmVcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, S.KvmDebugregs)
KVM_TRANSLATE = _iowr(0x85, S.KvmTranslation)
KVM_SET_DEBUGREGS = _iow(0xA2, S.KvmDebugregs)
KVM_GET_XSAVE = _ior(0xA4, S.KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, S.KvmXsave)
KVM_GET_XCRS = _ior(0xA6, S.KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, S.KvmXcrs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_STATS_FD = _io(0xCE)  # a vCPU or VM fd: a read-only fd of binary statistics

KVM_API_VERSION = 12

# capabilities (KVM_CHECK_EXTENSION)
CAP_IRQCHIP = 0
CAP_HLT = 1
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_EXT_CPUID = 7
CAP_NR_VCPUS = 9
CAP_NR_MEMSLOTS = 10
CAP_PIT = 11
CAP_COALESCED_MMIO = 15
CAP_SYNC_MMU = 16
CAP_IOMMU = 18
CAP_DESTROY_MEMORY_REGION_WORKS = 21
CAP_USER_NMI = 22
CAP_SET_GUEST_DEBUG = 23
CAP_IRQ_ROUTING = 25
CAP_SET_BOOT_CPU_ID = 34
CAP_SET_IDENTITY_MAP_ADDR = 37
CAP_IOEVENTFD = 36
CAP_ADJUST_CLOCK = 39
CAP_VCPU_EVENTS = 41
CAP_PIT2 = 33
CAP_PIT_STATE2 = 35
CAP_IRQFD = 32
CAP_DEBUGREGS = 50
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_TSC_CONTROL = 60
CAP_KVMCLOCK_CTRL = 76
CAP_SIGNAL_MSI = 77
CAP_READONLY_MEM = 81
CAP_IRQFD_RESAMPLE = 82
CAP_MP_STATE = 14
CAP_MAX_VCPUS = 66
CAP_IMMEDIATE_EXIT = 136
CAP_X86_USER_SPACE_MSR = 188
CAP_X86_MSR_FILTER = 189
CAP_DIRTY_LOG_RING = 192
CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
CAP_SPLIT_IRQCHIP = 121
CAP_X2APIC_API = 129
CAP_X86_DISABLE_EXITS = 143
CAP_SET_GUEST_DEBUG2 = 195  # the GUESTDBG_* flags this KVM accepts
CAP_BINARY_STATS_FD = 203

# exit reasons
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_NMI = 16
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
EXIT_X86_RDMSR = 29
EXIT_X86_WRMSR = 30

EXIT_NAMES = {v: k[5:] for k, v in dict(globals()).items() if k.startswith("EXIT_") and isinstance(v, int)}

EXIT_IO_IN = 0
EXIT_IO_OUT = 1

SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

INTERNAL_ERROR_EMULATION = 1
INTERNAL_ERROR_SIMUL_EX = 2
INTERNAL_ERROR_DELIVERY_EV = 3
INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# KVM_SET_GUEST_DEBUG control bits (linux/kvm.h, asm/kvm.h)
GUESTDBG_ENABLE = 0x1
GUESTDBG_SINGLESTEP = 0x2
GUESTDBG_USE_SW_BP = 0x10000
GUESTDBG_USE_HW_BP = 0x20000
GUESTDBG_INJECT_DB = 0x40000
GUESTDBG_INJECT_BP = 0x80000
GUESTDBG_BLOCKIRQ = 0x100000

MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3
MP_STATE_SIPI_RECEIVED = 4

MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1
