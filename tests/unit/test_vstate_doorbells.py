"""Doorbells: an ioeventfd registered per doorbell, the event loop woken and the handler run when
the eventfd is written (by KVM, on a guest MMIO write), and unregistration on detach/close."""

import errno
import os
import threading

import pytest
from support.kvm_fakes import FakeVmFd, RealModeVm, RecordingDevice, RecordingHost

from corral.devices.bus import MmioBus, PioBus
from corral.eventloop import EventLoop
from corral.kvm import KvmError
from corral.vstate.doorbells import IOEVENTFD_FLAG_DEASSIGN, KvmDoorbells
from corral.vstate.vcpu import Vcpu

WAIT = 5.0


@pytest.fixture
def loop():
    lp = EventLoop("test-doorbells")
    lp.start()
    yield lp
    lp.close()


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


def _closed(fd):
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_attach_registers_an_ioeventfd_for_the_address_and_length(loop):
    vm = FakeVmFd()
    bells = KvmDoorbells(vm, loop)
    bell = bells.attach(0xE000_1000, 4, lambda: None)
    assert vm.calls == [("ioeventfd", bell.fd, 0xE000_1000, 4, 0)]
    assert (bell.addr, bell.length) == (0xE000_1000, 4)
    bells.close()


def test_a_write_to_the_eventfd_wakes_the_loop_and_runs_the_handler_there(loop):
    bells = KvmDoorbells(FakeVmFd(), loop)
    threads, rung = [], threading.Event()

    def handler():
        threads.append(threading.current_thread().name)
        rung.set()

    bell = bells.attach(0x1000, 2, handler)
    os.eventfd_write(bell.fd, 1)  # what KVM does on the guest's write
    assert rung.wait(WAIT)
    assert threads == ["test-doorbells"]
    bells.close()


def test_rings_while_the_loop_is_held_arrive_as_one_call(loop):
    bells = KvmDoorbells(FakeVmFd(), loop)
    calls = []
    rung = threading.Event()
    bell = bells.attach(0x1000, 4, lambda: (calls.append(1), rung.set()))
    assert loop.pause(WAIT)
    for _ in range(3):
        os.eventfd_write(bell.fd, 1)
    loop.resume()
    assert rung.wait(WAIT)
    done = threading.Event()
    loop.call_soon(done.set)
    assert done.wait(WAIT)
    assert calls == [1]  # the eventfd counted them; the queue is walked once
    bells.close()


def test_detach_deassigns_stops_the_handler_and_closes_the_fd(loop):
    vm = FakeVmFd()
    bells = KvmDoorbells(vm, loop)
    calls = []
    bell = bells.attach(0x2000, 4, lambda: calls.append(1))
    fd = bell.fd
    bells.detach(bell)
    assert vm.calls[-1] == ("ioeventfd", fd, 0x2000, 4, IOEVENTFD_FLAG_DEASSIGN)
    assert _closed(fd)
    bells.detach(bell)  # a second detach does nothing
    assert len(vm.calls) == 2
    assert calls == []


def test_detach_after_the_vm_closed_only_closes_the_fd(loop):
    vm = FakeVmFd()
    bells = KvmDoorbells(vm, loop)
    bell = bells.attach(0x2000, 4, lambda: None)
    vm.close()
    bells.detach(bell)
    assert len(vm.calls) == 1  # no deassign on a closed VM fd
    assert _closed(bell.fd)


def test_close_detaches_every_doorbell(loop):
    vm = FakeVmFd()
    bells = KvmDoorbells(vm, loop)
    bs = [bells.attach(0x3000 + 4 * i, 4, lambda: None) for i in range(3)]
    bells.close()
    deassigned = {(c[2], c[4]) for c in vm.calls if c[4] == IOEVENTFD_FLAG_DEASSIGN}
    assert deassigned == {(b.addr, IOEVENTFD_FLAG_DEASSIGN) for b in bs}
    assert all(_closed(b.fd) for b in bs)


def test_a_refused_ioeventfd_leaks_no_fd_and_registers_nothing(loop):
    vm = FakeVmFd()
    vm.fail_ioeventfd = KvmError(0, errno.EEXIST, "doorbell taken")
    bells = KvmDoorbells(vm, loop)
    before = _open_fds()
    with pytest.raises(KvmError):
        bells.attach(0x4000, 4, lambda: None)
    assert _open_fds() == before
    bells.close()
    assert vm.calls == []


@pytest.mark.kvm
def test_a_guest_mmio_write_to_a_doorbell_runs_the_handler_without_a_vcpu_exit(loop):
    # mov dword [0], eax (DS base is the doorbell); then out 0x80, al; hlt
    code = bytes(
        [
            0x66,
            0xB8,
            0x78,
            0x56,
            0x34,
            0x12,  # mov eax, 0x12345678
            0x66,
            0xA3,
            0x00,
            0x00,  # mov [0], eax
            0xE6,
            0x80,  # out 0x80, al
            0xF4,
        ]
    )  # hlt
    real = RealModeVm()
    try:
        bells = KvmDoorbells(real.vm, loop)
        rung = threading.Event()
        bell = bells.attach(RealModeVm.DATA_BASE, 4, rung.set)
        pio, mmio, dev, host = PioBus(), MmioBus(), RecordingDevice(), RecordingHost()
        pio.register(0x80, 1, dev)
        mmio.register(RealModeVm.DATA_BASE, 0x1000, dev)
        vcpu = Vcpu(real.vcpu(code), 0, pio, mmio, host)
        vcpu.start()
        assert host.stopped.wait(WAIT)
        vcpu.join(WAIT)
        assert rung.wait(WAIT)
        assert dev.accesses == [("pio_write", 0, 1, 0x78)]  # the MMIO write never reached the bus
        assert host.stops[0][0] == "halt"
        bells.detach(bell)
    finally:
        real.close()
