"""KVM state capture: a vCPU's registers, MSRs, LAPIC and events and a VM's irqchips, PIT and
clock saved from one real VM and loaded into a fresh one come back the same, through JSON too;
refused MSRs are skipped on save and on load; malformed records are refused by name."""

import struct

import pytest
from support.kvm_fakes import RealModeVm, lapic_u32, set_lapic_u32

from corral.kvm import KvmError
from corral.kvm import structs as S
from corral.vstate.kvm_state import (
    VcpuState,
    VmKvmState,
    cpuid_entries,
    load_vcpu,
    load_vm,
    readable_msrs,
    savable_msrs,
    save_vcpu,
    save_vm,
    set_clock,
)

MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_KERNEL_GS_BASE, MSR_BOGUS = 0x174, 0x175, 0xC000_0102, 0xDEAD_0000
LAPIC_TPR, LAPIC_SVR = 0x80, 0xF0
PIC_MASTER, IOAPIC = 0, 2
IOAPIC_REDIR0 = 24  # kvm_ioapic_state: base_address, ioregsel, id, irr, pad, redirtbl[24]


class _MsrFd:
    """A vCPU fd whose KVM_GET_MSRS stops at the first index in `refused`, as KVM does."""

    def __init__(self, refused):
        self.refused = set(refused)
        self.asked = []

    def get_msrs(self, indices):
        self.asked.append(list(indices))
        out = {}
        for i in indices:
            if i in self.refused:
                break
            out[i] = 0
        return out


@pytest.mark.parametrize("refused", [[], [1], [5], [3, 4], [1, 3, 5]])
def test_savable_msrs_skips_exactly_the_refused_ones(refused):
    fd = _MsrFd(refused)
    assert savable_msrs(fd, [1, 2, 3, 4, 5]) == [i for i in [1, 2, 3, 4, 5] if i not in refused]


@pytest.mark.parametrize("refused", [[], [1], [5], [3, 4], [1, 3, 5]])
def test_readable_msrs_reads_past_the_refused_ones_in_as_few_reads(refused):
    fd = _MsrFd(refused)
    assert readable_msrs(fd, [1, 2, 3, 4, 5]) == {i: 0 for i in [1, 2, 3, 4, 5] if i not in refused}
    # one read when none is refused (the probe and the read of a save are one ioctl)
    assert len(fd.asked) == 1 + sum(1 for i in refused if i != 5)


def test_cpuid_entries_round_trip_through_the_state_bytes():
    entries = [S.KvmCpuidEntry2(function=f, index=0, eax=f * 3, ebx=7) for f in (0, 1, 0x8000_0001)]
    state = VcpuState(
        index=0,
        cpuid=b"".join(bytes(memoryview(e).cast("B")) for e in entries),
        regs=b"",
        sregs=b"",
        xsave=b"",
        xcrs=b"",
        lapic=b"",
        events=b"",
        debugregs=b"",
        mp_state=0,
        msrs={},
    )
    back = cpuid_entries(state)
    assert [(e.function, e.eax, e.ebx) for e in back] == [(0, 0, 7), (1, 3, 7), (0x8000_0001, 0x8000_0003, 7)]


# -- on real VMs ---------------------------------------------------------------------------------
@pytest.fixture
def vms():
    made = []

    def make():
        vm = RealModeVm(irqchip=True, pit=True)
        made.append(vm)
        return vm

    yield make
    for vm in made:
        vm.close()


def _configured_vcpu(real):
    fd = real.vcpu()
    cpuid = real.kvm.supported_cpuid()
    fd.set_cpuid2(cpuid)
    return fd, cpuid


def _dress(fd):
    """Give a vCPU state no fresh vCPU has."""
    r = fd.get_regs()
    r.rax, r.rbx, r.r15, r.rip, r.rsp, r.rflags = 0x1111, 0x2222, 0xF0F0_F0F0_F0F0, 0x1234, 0x7FF0, 0x202
    fd.set_regs(r)
    s = fd.get_sregs()
    s.gdt.base, s.gdt.limit, s.ds.base, s.cr2 = 0x5000, 0x2F, 0x30000, 0xBAD0
    fd.set_sregs(s)
    fd.set_msrs({MSR_SYSENTER_CS: 0x10, MSR_SYSENTER_ESP: 0x9000, MSR_KERNEL_GS_BASE: 0xFFFF_8880_0000_1000})
    set_lapic_u32(fd, LAPIC_TPR, 0x20)
    set_lapic_u32(fd, LAPIC_SVR, 0x1FF)
    d = fd.get_debugregs()
    d.db[0], d.db[3] = 0x4000, 0x8000
    fd.set_debugregs(d)


MSRS = [MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_KERNEL_GS_BASE]


@pytest.mark.kvm
def test_a_vcpu_saved_and_loaded_into_a_fresh_vm_comes_back_the_same(vms):
    a, b = vms(), vms()
    src, cpuid = _configured_vcpu(a)
    _dress(src)
    state = save_vcpu(src, 0, cpuid, MSRS)
    state = VcpuState.model_validate_json(state.model_dump_json())  # as a snapshot carries it
    dst = b.vcpu()
    load_vcpu(dst, state)
    r, s = dst.get_regs(), dst.get_sregs()
    assert (r.rax, r.rbx, r.r15, r.rip, r.rsp, r.rflags) == (
        0x1111,
        0x2222,
        0xF0F0_F0F0_F0F0,
        0x1234,
        0x7FF0,
        0x202,
    )
    assert (s.gdt.base, s.gdt.limit, s.ds.base, s.cr2) == (0x5000, 0x2F, 0x30000, 0xBAD0)
    assert dst.get_msrs(MSRS) == {
        MSR_SYSENTER_CS: 0x10,
        MSR_SYSENTER_ESP: 0x9000,
        MSR_KERNEL_GS_BASE: 0xFFFF_8880_0000_1000,
    }
    assert (lapic_u32(dst, LAPIC_TPR), lapic_u32(dst, LAPIC_SVR)) == (0x20, 0x1FF)
    d = dst.get_debugregs()
    assert (d.db[0], d.db[3]) == (0x4000, 0x8000)
    assert dst.get_mp_state() == state.mp_state
    again = save_vcpu(dst, 0, cpuid_entries(state), MSRS)
    assert again.model_dump(exclude={"xsave", "events", "lapic"}) == state.model_dump(
        exclude={"xsave", "events", "lapic"}
    )
    assert [(e.function, e.index, e.eax, e.ebx, e.ecx, e.edx) for e in cpuid_entries(state)] == [
        (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx) for e in cpuid
    ]


@pytest.mark.kvm
def test_load_vcpu_skips_an_msr_kvm_refuses_and_sets_the_others(vms):
    a, b = vms(), vms()
    src, cpuid = _configured_vcpu(a)
    _dress(src)
    state = save_vcpu(src, 0, cpuid, MSRS)
    state.msrs = {**state.msrs, MSR_BOGUS: 1}
    dst = b.vcpu()
    with pytest.raises(KvmError):
        dst.set_msrs({MSR_BOGUS: 1})  # the premise: KVM refuses it
    load_vcpu(dst, state)
    assert dst.get_msrs(MSRS) == {i: v for i, v in state.msrs.items() if i != MSR_BOGUS}


@pytest.mark.kvm
def test_savable_msrs_on_a_real_vcpu_are_all_readable(vms):
    real = vms()
    fd, _ = _configured_vcpu(real)
    candidates = real.kvm.msr_index_list() + [MSR_BOGUS]
    good = savable_msrs(fd, candidates)
    assert MSR_BOGUS not in good
    assert MSR_SYSENTER_CS in good
    assert list(fd.get_msrs(good)) == good


@pytest.mark.kvm
def test_readable_msrs_on_a_real_vcpu_are_what_savable_msrs_then_get_msrs_read(vms):
    real = vms()
    fd, _ = _configured_vcpu(real)
    _dress(fd)
    candidates = real.kvm.msr_index_list()
    candidates[1:1] = [MSR_BOGUS]  # refused early: the read must go on past it
    values = readable_msrs(fd, candidates)
    assert list(values) == savable_msrs(fd, candidates) and MSR_BOGUS not in values
    assert values[MSR_SYSENTER_CS] == 0x10 and values[MSR_KERNEL_GS_BASE] == 0xFFFF_8880_0000_1000
    assert save_vcpu(fd, 0, [], candidates).msrs.keys() == values.keys()


@pytest.mark.kvm
def test_load_vcpu_refuses_a_record_of_the_wrong_size_by_name(vms):
    a, b = vms(), vms()
    src, cpuid = _configured_vcpu(a)
    state = save_vcpu(src, 0, cpuid, MSRS)
    state.sregs = state.sregs[:-8]
    with pytest.raises(ValueError, match=r"sregs: \d+ bytes, expected \d+"):
        load_vcpu(b.vcpu(), state)


@pytest.mark.kvm
def test_vm_irqchips_pit_and_clock_round_trip_into_a_fresh_vm(vms):
    a, b = vms(), vms()
    pic = a.vm.get_irqchip(PIC_MASTER)
    pic.chip[2] = 0xA5  # imr
    a.vm.set_irqchip(pic)
    ioapic = a.vm.get_irqchip(IOAPIC)
    struct.pack_into("<Q", ioapic.chip, IOAPIC_REDIR0 + 8 * 5, 0x0000_0000_0001_8035)
    a.vm.set_irqchip(ioapic)
    pit = a.vm.get_pit2()
    struct.pack_into("<I", pit.raw, 0, 0x1234)  # channel 0 count
    a.vm.set_pit2(pit)
    set_clock(a.vm, 5_000_000_000)
    state = VmKvmState.model_validate_json(save_vm(a.vm).model_dump_json())
    assert [
        S.KvmIrqchip.from_buffer_copy(c).chip_id for c in (state.pic_master, state.pic_slave, state.ioapic)
    ] == [PIC_MASTER, 1, IOAPIC]
    assert 5_000_000_000 <= state.clock < 6_000_000_000

    load_vm(b.vm, state)
    assert b.vm.get_irqchip(PIC_MASTER).chip[2] == 0xA5
    assert (
        struct.unpack_from("<Q", bytes(b.vm.get_irqchip(IOAPIC).chip), IOAPIC_REDIR0 + 8 * 5)[0] == 0x1_8035
    )
    assert struct.unpack_from("<I", bytes(b.vm.get_pit2().raw), 0)[0] == 0x1234
    assert state.clock <= b.vm.get_clock().clock < state.clock + 1_000_000_000


@pytest.mark.kvm
def test_load_vm_refuses_a_short_pit_record_by_name(vms):
    state = save_vm(vms().vm)
    state.pit = state.pit[:10]
    with pytest.raises(ValueError, match="pit: 10 bytes, expected 112"):
        load_vm(vms().vm, state)


def test_the_state_models_carry_bytes_as_base64_in_json():
    st = VmKvmState(pic_master=b"\x00\xff", pic_slave=b"", ioapic=b"", pit=b"\x01", clock=7)
    text = st.model_dump_json()
    assert '"AP8="' in text
    assert VmKvmState.model_validate_json(text) == st


def test_the_state_models_refuse_unknown_fields():
    # a damaged or older snapshot fails validation by name instead of loading half a state
    with pytest.raises(ValueError, match="irqchips"):
        VmKvmState.model_validate(
            {"irqchips": [], "pic_master": "", "pic_slave": "", "ioapic": "", "pit": "", "clock": 0}
        )


@pytest.mark.kvm
def test_load_vm_refuses_an_irqchip_saved_in_the_wrong_place(vms):
    state = save_vm(vms().vm)
    state.pic_master, state.ioapic = state.ioapic, state.pic_master
    with pytest.raises(ValueError, match="irqchip: chip 2 saved where chip 0 belongs"):
        load_vm(vms().vm, state)
