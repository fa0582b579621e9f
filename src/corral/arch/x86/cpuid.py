"""Per-vCPU CPUID: KVM's supported CPUID, with each vCPU's APIC id and the machine's topology.

Topology model: one socket, `num_cpus` cores, one thread per core, APIC id == vCPU index.
"""

from __future__ import annotations

import copy

from corral.kvm.structs import KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KvmCpuidEntry2

BRAND = b"corral virtual CPU".ljust(48, b"\0")
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
LEVEL_SMT, LEVEL_CORE = 1, 2

# KVM paravirt features (leaf 0x40000001 EAX) a guest gets by default: the set QEMU's default
# CPU models enable. PV unhalt (paravirt spinlocks), PV IPIs, PV TLB flush and the like stay
# opt-in there too; a vCPU that halts with interrupts off waiting for a PV kick is a hang if
# the kick never lands.
KVM_FEATURE_CLOCKSOURCE, KVM_FEATURE_NOP_IO_DELAY, KVM_FEATURE_CLOCKSOURCE2 = 0, 1, 3
KVM_FEATURE_ASYNC_PF, KVM_FEATURE_STEAL_TIME, KVM_FEATURE_PV_EOI = 4, 5, 6
KVM_FEATURE_CLOCKSOURCE_STABLE_BIT = 24
KVM_DEFAULT_PV_FEATURES = sum(
    1 << b
    for b in (
        KVM_FEATURE_CLOCKSOURCE,
        KVM_FEATURE_NOP_IO_DELAY,
        KVM_FEATURE_CLOCKSOURCE2,
        KVM_FEATURE_ASYNC_PF,
        KVM_FEATURE_STEAL_TIME,
        KVM_FEATURE_PV_EOI,
        KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
    )
)

# Features a user may hide from the guest (--cpu-hide): name -> (leaf, subleaf, register, bit).
HIDEABLE: dict[str, tuple[int, int, str, int]] = {
    "xsave": (1, 0, "ecx", 26),
    "avx": (1, 0, "ecx", 28),
    "x2apic": (1, 0, "ecx", 21),
    "tsc-deadline": (1, 0, "ecx", 24),
    "avx2": (7, 0, "ebx", 5),
    "pku": (7, 0, "ecx", 3),
    "rdtscp": (0x8000_0001, 0, "edx", 27),
    "pdpe1gb": (0x8000_0001, 0, "edx", 26),
}


# Features whose register state lives in XSAVE areas: hidden with xsave. Linux does not drop them
# itself when CPUID lacks XSAVE (it only applies its dependency table when it clears a feature),
# so a guest would run AVX code with CR4.OSXSAVE clear and take #UD (aesni_intel did, in the lab).
XSAVE_DEPENDENTS: list[tuple[int, int, str, int]] = [
    *((1, 0, "ecx", b) for b in (12, 28, 29)),  # FMA AVX F16C
    (7, 0, "ebx", 5),  # AVX2
    *((7, 0, "ebx", b) for b in (16, 17, 21, 26, 27, 28, 30, 31)),  # AVX-512 F DQ IFMA PF ER CD BW VL
    # VBMI PKU VBMI2 VAES VPCLMULQDQ VNNI BITALG VPOPCNTDQ
    *((7, 0, "ecx", b) for b in (1, 3, 6, 9, 10, 11, 12, 14)),
    # 4VNNIW 4FMAPS VP2INTERSECT AMX-BF16 FP16 AMX-TILE AMX-INT8
    *((7, 0, "edx", b) for b in (2, 3, 8, 22, 23, 24, 25)),
    *((7, 1, "eax", b) for b in (4, 5)),  # AVX-VNNI AVX512-BF16
]


def _clear(entries: list[KvmCpuidEntry2], leaf: int, sub: int, reg: str, bit: int) -> None:
    for e in entries:
        if e.function == leaf and e.index == sub:
            setattr(e, reg, getattr(e, reg) & ~(1 << bit))


def _bits_for(n: int) -> int:
    """Bits of APIC id needed to number `n` items (x86 topology shift width)."""
    return max(0, (n - 1).bit_length())


def _entry(
    function: int,
    index: int,
    eax: int = 0,
    ebx: int = 0,
    ecx: int = 0,
    edx: int = 0,
    flags: int = KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
) -> KvmCpuidEntry2:
    return KvmCpuidEntry2(function=function, index=index, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


def _topology_leaf(function: int, apic_id: int, num_cpus: int) -> list[KvmCpuidEntry2]:
    core_shift = _bits_for(num_cpus)
    return [
        _entry(function, 0, eax=0, ebx=1, ecx=(LEVEL_SMT << 8) | 0, edx=apic_id),
        _entry(function, 1, eax=core_shift, ebx=num_cpus, ecx=(LEVEL_CORE << 8) | 1, edx=apic_id),
        _entry(function, 2, eax=0, ebx=0, ecx=2, edx=apic_id),
    ]


def vcpu_cpuid(
    supported: list[KvmCpuidEntry2], vcpu_index: int, num_cpus: int, hide: tuple[str, ...] = ()
) -> list[KvmCpuidEntry2]:
    """The CPUID table for vCPU `vcpu_index` of `num_cpus`, derived from KVM's supported set,
    less the features named in `hide` (keys of HIDEABLE)."""
    if not 0 <= vcpu_index < num_cpus:
        raise ValueError(f"vCPU index {vcpu_index} outside 0..{num_cpus - 1}")
    apic_id = vcpu_index
    out: list[KvmCpuidEntry2] = []
    have_1f = False
    max_basic = max((e.function for e in supported if e.function < 0x4000_0000), default=0)
    for src in supported:
        e = copy.copy(src)
        f = e.function
        if f == 1:
            e.ebx = (e.ebx & 0x0000_FFFF) | (min(num_cpus, 255) << 16) | ((apic_id & 0xFF) << 24)
            e.ecx |= LEAF1_ECX_HYPERVISOR
            e.edx = (e.edx | LEAF1_EDX_HTT) if num_cpus > 1 else (e.edx & ~LEAF1_EDX_HTT)
        elif f == 4:
            # Intel deterministic cache parameters: cores per package, threads per cache
            if e.eax & 0x1F:
                cache_level = (e.eax >> 5) & 0x7
                sharing = 1 if cache_level < 3 else num_cpus
                e.eax = (e.eax & 0x3FFF) | ((sharing - 1) << 14) | ((num_cpus - 1) << 26)
        elif f in (0xB, 0x1F):
            have_1f |= f == 0x1F
            if e.index == 0:
                out.extend(_topology_leaf(f, apic_id, num_cpus))
            continue
        elif f == 0x4000_0001:
            e.eax &= KVM_DEFAULT_PV_FEATURES
            # EDX holds hints; KVM lists KVM_HINTS_REALTIME ("vCPUs are never preempted") as one
            # a VMM *may* give. corral cannot promise dedicated host CPUs, so it gives none.
            e.edx = 0
        elif f == 0x8000_0001:
            # AMD CmpLegacy: cores are reported through 0x80000008, not HTT
            e.ecx = (e.ecx | (1 << 1)) if num_cpus > 1 else (e.ecx & ~(1 << 1))
        elif f in (0x8000_0002, 0x8000_0003, 0x8000_0004):
            words = BRAND[(f - 0x8000_0002) * 16 :][:16]
            e.eax, e.ebx, e.ecx, e.edx = (int.from_bytes(words[i : i + 4], "little") for i in range(0, 16, 4))
        elif f == 0x8000_0008:
            e.ecx = (e.ecx & ~0xF0FF) | (_bits_for(num_cpus) << 12) | (num_cpus - 1)
        elif f == 0x8000_001E:
            # AMD extended APIC id / core id; one thread per core, one node
            e.eax, e.ebx, e.ecx = apic_id, apic_id & 0xFF, 0
        out.append(e)
    if max_basic >= 0xB and not any(e.function == 0xB for e in out):
        out.extend(_topology_leaf(0xB, apic_id, num_cpus))
    for name in hide:
        _clear(out, *HIDEABLE[name])
        if name == "xsave":
            for dep in XSAVE_DEPENDENTS:
                _clear(out, *dep)
            out = [e for e in out if e.function != 0xD]
    return out


def find(entries: list[KvmCpuidEntry2], function: int, index: int = 0) -> KvmCpuidEntry2 | None:
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None
