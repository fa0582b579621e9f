"""The IRQ router: the PC routes it must always rewrite, MSI vector GSIs, irqfd wiring, masking
and pending delivery, close; and on a real VM, that KVM takes the table and delivers through it."""

import os
import struct
import time

import pytest
from support.kvm_fakes import FakeVmFd, RealModeVm, lapic_u32, route_tuple, set_lapic_u32

from corral.vstate.irq import FIRST_MSI_GSI, IrqRouter, pc_routes
from corral.vstate.vm import Vm

PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2


def _pc_table():
    return [route_tuple(e) for e in pc_routes()]


def _counter(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_pc_routes_put_isa_gsis_on_the_8259_pair_without_the_cascade_pin():
    pic = [r for r in _pc_table() if r[2] in (PIC_MASTER, PIC_SLAVE)]
    expected = [(g, "irqchip", PIC_MASTER if g < 8 else PIC_SLAVE, g % 8) for g in range(16) if g != 2]
    assert pic == expected


def test_pc_routes_put_gsi_0_on_ioapic_pin_2_and_the_rest_on_their_own_pins():
    ioapic = {r[0]: r[3] for r in _pc_table() if r[2] == IOAPIC}
    assert ioapic[0] == 2  # the PIT, as the MADT override says
    assert 2 not in ioapic  # GSI 2 has no route (pin 2 belongs to GSI 0)
    assert {g: p for g, p in ioapic.items() if g} == {g: g for g in range(1, 24) if g != 2}
    assert all(r[1] == "irqchip" for r in _pc_table())


def test_msi_vectors_get_consecutive_gsis_from_24_with_an_irqfd_each():
    vm = FakeVmFd()
    router = IrqRouter(vm)
    vectors = [router.msi_vector() for _ in range(3)]
    assert [v.gsi for v in vectors] == [FIRST_MSI_GSI, FIRST_MSI_GSI + 1, FIRST_MSI_GSI + 2] == [24, 25, 26]
    irqfds = [c for c in vm.calls if c[0] == "irqfd"]
    assert irqfds == [("irqfd", v.fd, v.gsi, 0) for v in vectors]
    assert len({v.fd for v in vectors}) == 3
    # each vector's route is in the table before its irqfd is wired
    for v in vectors:
        i = vm.calls.index(("irqfd", v.fd, v.gsi, 0))
        table = vm.calls[i - 1]
        assert table[0] == "set_gsi_routing" and any(r[0] == v.gsi for r in table[1])
    router.close()


def test_every_table_written_keeps_the_pc_routes_and_one_msi_route_per_vector():
    vm = FakeVmFd()
    router = IrqRouter(vm)
    a, b = router.msi_vector(), router.msi_vector()
    a.update(0xFEE0_0000, 0x41, masked=False)
    b.update(0x1_FEE0_1000, 0x4042, masked=True)
    last = vm.tables()[-1]
    assert last[: len(_pc_table())] == _pc_table()
    assert last[len(_pc_table()) :] == [(24, "msi", 0xFEE0_0000, 0x41), (25, "msi", 0x1_FEE0_1000, 0x4042)]
    assert all(t[: len(_pc_table())] == _pc_table() for t in vm.tables())
    router.close()


def test_update_rewrites_the_table_only_when_the_message_changes():
    vm = FakeVmFd()
    router = IrqRouter(vm)
    v = router.msi_vector()
    n = len(vm.tables())
    v.update(0xFEE0_0000, 0x30, masked=True)
    assert len(vm.tables()) == n + 1
    v.update(0xFEE0_0000, 0x30, masked=False)  # only the mask bit changed
    assert len(vm.tables()) == n + 1
    assert v.masked is False
    router.close()


def test_trigger_on_a_live_vector_writes_its_irqfd():
    router = IrqRouter(FakeVmFd())
    v = router.msi_vector()
    v.update(0xFEE0_0000, 0x30, masked=False)
    assert v.trigger() is True
    assert v.trigger() is True
    assert _counter(v.fd) == 2
    assert v.pending is False
    router.close()


@pytest.mark.parametrize("address,masked", [(0xFEE0_0000, True), (0, False)])
def test_trigger_on_a_masked_or_unprogrammed_vector_only_records_it_pending(address, masked):
    router = IrqRouter(FakeVmFd())
    v = router.msi_vector()
    v.update(address, 0x30, masked=masked)
    assert v.trigger() is False
    assert v.pending is True
    assert _counter(v.fd) == 0
    router.close()


def test_unmasking_delivers_what_waited_once():
    router = IrqRouter(FakeVmFd())
    v = router.msi_vector()
    v.update(0xFEE0_0000, 0x30, masked=True)
    v.trigger()
    v.trigger()
    v.update(0xFEE0_0000, 0x30, masked=False)
    assert _counter(v.fd) == 1  # one pending bit, one interrupt
    assert v.pending is False
    v.update(0xFEE0_0000, 0x30, masked=False)
    assert _counter(v.fd) == 0
    router.close()


def test_close_closes_every_vector_fd():
    router = IrqRouter(FakeVmFd())
    fds = [router.msi_vector().fd for _ in range(2)]
    router.close()
    assert router.vectors == []
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# -- on a real VM ------------------------------------------------------------------------------
IOAPIC_IRR = 16  # kvm_ioapic_state: base_address u64, ioregsel u32, id u32, irr u32
PIC_IRR = 1  # kvm_pic_state: last_irr u8, irr u8
LAPIC_SVR, LAPIC_IRR = 0xF0, 0x200


@pytest.fixture
def real_vm():
    vm = RealModeVm(irqchip=True)
    yield vm
    vm.close()


@pytest.mark.kvm
def test_kvm_routes_gsi_0_to_ioapic_pin_2_and_pic_pin_0_after_commit(real_vm):
    router = IrqRouter(real_vm.vm)
    router.commit()
    real_vm.vm.irq_line(0, 1)
    ioapic_irr = struct.unpack_from("<I", bytes(real_vm.vm.get_irqchip(IOAPIC).chip), IOAPIC_IRR)[0]
    pic_irr = bytes(real_vm.vm.get_irqchip(PIC_MASTER).chip)[PIC_IRR]
    assert ioapic_irr == 1 << 2
    assert pic_irr == 1 << 0
    router.close()


@pytest.mark.kvm
def test_a_new_vm_routes_gsi_0_to_ioapic_pin_2_without_any_msi_vector():
    # KVM's default table puts GSI 0 on IOAPIC pin 0, where no guest that read our MADT looks
    # for the PIT: Vm.create must write the PC routes itself (nolapic_timer guests hung).
    vm = Vm.create("/dev/kvm", 1)
    try:
        vm.fd.irq_line(0, 1)
        ioapic_irr = struct.unpack_from("<I", bytes(vm.fd.get_irqchip(IOAPIC).chip), IOAPIC_IRR)[0]
        assert ioapic_irr == 1 << 2
        assert bytes(vm.fd.get_irqchip(PIC_MASTER).chip)[PIC_IRR] == 1 << 0
    finally:
        vm.close()


@pytest.mark.kvm
def test_kvm_delivers_a_triggered_msi_vector_to_the_lapic_and_holds_a_masked_one(real_vm):
    fd = real_vm.vcpu()
    set_lapic_u32(fd, LAPIC_SVR, lapic_u32(fd, LAPIC_SVR) | 0x100)  # software-enable the LAPIC
    router = IrqRouter(real_vm.vm)
    quiet, live = router.msi_vector(), router.msi_vector()
    quiet.update(0xFEE0_0000, 0x51, masked=True)
    live.update(0xFEE0_0000, 0x45, masked=False)  # fixed, edge, to APIC ID 0

    def irr_bit(vector):
        return (lapic_u32(fd, LAPIC_IRR + 0x10 * (vector // 32)) >> (vector % 32)) & 1

    assert quiet.trigger() is False
    assert live.trigger() is True
    deadline = time.monotonic() + 2
    while not irr_bit(0x45) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert irr_bit(0x45) == 1
    assert irr_bit(0x51) == 0
    quiet.update(0xFEE0_0000, 0x51, masked=False)  # unmasking delivers the pending one
    deadline = time.monotonic() + 2
    while not irr_bit(0x51) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert irr_bit(0x51) == 1
    router.close()
