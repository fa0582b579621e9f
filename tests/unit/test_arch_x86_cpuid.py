from corral.arch.x86.cpuid import find, vcpu_cpuid
from corral.kvm.structs import KVM_CPUID_FLAG_SIGNIFCANT_INDEX as SIG
from corral.kvm.structs import KvmCpuidEntry2


def E(f, i=0, flags=0, eax=0, ebx=0, ecx=0, edx=0):
    return KvmCpuidEntry2(function=f, index=i, flags=flags, eax=eax, ebx=ebx, ecx=ecx, edx=edx)


SUPPORTED = [
    E(0, eax=0x10),
    E(1, eax=0xA00F11, ebx=0x0102_0800, ecx=0x0120_2000, edx=0x078B_FBFF),
    E(4, 0, SIG, eax=0x121),
    E(4, 1, SIG, eax=0x163),
    E(0xB, 0, SIG, edx=1),
    E(0x8000_0000, eax=0x8000_0022),
    E(0x8000_0001),
    E(0x8000_0002),
    E(0x8000_0003),
    E(0x8000_0004),
    E(0x8000_0008, eax=0x3030, ecx=0x7001),
]


def test_leaf1_carries_apic_id_and_count():
    for n in (1, 2, 8):
        for i in range(n):
            e = find(vcpu_cpuid(SUPPORTED, i, n), 1)
            assert e.ebx >> 24 == i
            assert (e.ebx >> 16) & 0xFF == n
            assert e.ecx & (1 << 31), "hypervisor bit"
            assert bool(e.edx & (1 << 28)) == (n > 1)


def test_leaf_b_topology():
    t = vcpu_cpuid(SUPPORTED, 3, 6)
    smt, core, end = find(t, 0xB, 0), find(t, 0xB, 1), find(t, 0xB, 2)
    assert (smt.ebx, (smt.ecx >> 8) & 0xFF, smt.edx) == (1, 1, 3)
    assert (core.eax, core.ebx, (core.ecx >> 8) & 0xFF, core.edx) == (3, 6, 2, 3)
    assert (end.ecx >> 8) & 0xFF == 0
    assert len([e for e in t if e.function == 0xB]) == 3


def test_leaf4_cores_and_amd_core_count():
    t = vcpu_cpuid(SUPPORTED, 0, 4)
    assert find(t, 4, 0).eax >> 26 == 3
    assert find(t, 4, 1).eax >> 26 == 3 and (find(t, 4, 1).eax >> 14) & 0xFFF == 3  # L3 shared
    assert find(t, 0x8000_0008).ecx & 0xFF == 3


def test_brand_string():
    t = vcpu_cpuid(SUPPORTED, 0, 1)
    raw = b"".join(
        v.to_bytes(4, "little")
        for f in (0x8000_0002, 0x8000_0003, 0x8000_0004)
        for v in (find(t, f).eax, find(t, f).ebx, find(t, f).ecx, find(t, f).edx)
    )
    assert raw.rstrip(b"\0") == b"corral virtual CPU"


def test_supported_table_is_not_mutated():
    before = [(e.function, e.ebx) for e in SUPPORTED]
    vcpu_cpuid(SUPPORTED, 1, 2)
    assert [(e.function, e.ebx) for e in SUPPORTED] == before


def test_hiding_xsave_clears_the_bit_and_drops_leaf_d():
    sup = SUPPORTED + [E(0xD, 0, SIG, eax=0x207), E(0xD, 1, SIG, eax=5)]
    t = vcpu_cpuid(sup, 0, 1, hide=("xsave", "x2apic"))
    leaf1 = find(t, 1)
    assert not leaf1.ecx & (1 << 26) and not leaf1.ecx & (1 << 21)
    assert not [e for e in t if e.function == 0xD]
    assert find(vcpu_cpuid(sup, 0, 1), 0xD) is not None


def test_hiding_xsave_hides_what_needs_it():
    """Without XSAVE the guest cannot enable AVX state (CR4.OSXSAVE): AVX, AVX2, AVX-512 and PKU
    must go too, or its AVX code takes #UD. SSE4.2 and AES-NI stay."""
    leaf1 = find(SUPPORTED, 1)
    avx, avx2, avx512f, pku, sse42, aes = 1 << 28, 1 << 5, 1 << 16, 1 << 3, 1 << 20, 1 << 25
    sup = [e for e in SUPPORTED if (e.function, e.index) not in ((1, 0), (7, 0))] + [
        E(1, 0, 0, ecx=leaf1.ecx | avx | sse42 | aes | (1 << 26), edx=leaf1.edx),
        E(7, 0, SIG, ebx=avx2 | avx512f, ecx=pku),
    ]
    t = vcpu_cpuid(sup, 0, 1, hide=("xsave",))
    l1, l7 = find(t, 1), find(t, 7, 0)
    assert not l1.ecx & avx and not l7.ebx & (avx2 | avx512f) and not l7.ecx & pku
    assert l1.ecx & sse42 and l1.ecx & aes
    kept = vcpu_cpuid(sup, 0, 1)
    assert find(kept, 1).ecx & avx and find(kept, 7, 0).ebx & avx2


def test_unknown_feature_name_is_refused():
    import pytest

    from corral.config import MachineConfig
    from corral.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown CPU feature sse9: choose from"):
        MachineConfig.build(kernel="k", cpu_hide="xsave,sse9")
    assert MachineConfig.build(kernel="k", cpu_hide="xsave, pku").cpu_hide == ("xsave", "pku")


def test_kvm_pv_features_are_the_conservative_default_set():
    sup = SUPPORTED + [E(0x4000_0001, eax=0x1007EFB)]  # what KVM offered on our CI host
    eax = find(vcpu_cpuid(sup, 0, 2), 0x4000_0001).eax
    assert eax & 1 and eax & (1 << 3) and eax & (1 << 24)  # kvmclock and its stable bit
    assert not eax & (1 << 7) and not eax & (1 << 11)  # no PV unhalt, no PV IPIs


def test_no_realtime_hint():
    # KVM offers KVM_HINTS_REALTIME ("vCPUs never preempted") for a VMM to give if it can;
    # corral cannot promise dedicated host CPUs
    sup = SUPPORTED + [E(0x4000_0001, eax=0x1007EFB, edx=1)]
    assert find(vcpu_cpuid(sup, 0, 1), 0x4000_0001).edx == 0
