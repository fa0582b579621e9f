"""RAM registered with KVM on a helper thread while a fresh boot goes on (Vm.map_memory with
background=True): its failure reaches the builder, and closing the VM waits for it."""

from __future__ import annotations

import threading
import time

import pytest

from corral.kvm.fds import KvmError
from corral.memory import GuestMemory
from corral.vstate.vm import Vm


@pytest.fixture
def vm():
    v = Vm.create("/dev/kvm", 1)
    yield v
    v.close()


def test_the_slots_are_there_once_waited_for(vm):
    memory = GuestMemory(16 << 20)
    vm.map_memory(memory, background=True)
    vm.wait_mapped()
    vm.wait_mapped()  # a second wait is a no-op
    # KVM has the slot: registering it again with another size is refused (a slot in use
    # cannot be resized), where an unregistered one would be taken
    s = memory.slots[0]
    with pytest.raises(KvmError):
        vm.fd.set_user_memory_region(s.slot, s.gpa, s.size // 2, s.host_addr, 0)
    memory.close()


def test_a_failure_on_the_helper_is_raised_by_wait_mapped(vm):
    def refuse(*args: object) -> None:
        time.sleep(0.05)
        raise KvmError(0x4020AE46, 22, "refused on purpose")

    vm.fd.set_user_memory_region = refuse  # type: ignore[method-assign]
    memory = GuestMemory(16 << 20)
    vm.map_memory(memory, background=True)
    with pytest.raises(KvmError, match="refused on purpose"):
        vm.wait_mapped()
    memory.close()


def test_close_waits_for_the_helper_before_closing_the_fd(vm):
    release, calls = threading.Event(), []
    real = vm.fd.set_user_memory_region

    def slow(*args: object) -> None:
        release.wait(5)
        calls.append(vm.fd.fd)  # the fd still open when the ioctl is made
        real(*args)

    vm.fd.set_user_memory_region = slow  # type: ignore[method-assign]
    memory = GuestMemory(16 << 20)
    vm.map_memory(memory, background=True)
    closer = threading.Thread(target=vm.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive()  # waiting for the helper
    release.set()
    closer.join(5)
    assert not closer.is_alive() and calls and calls[0] >= 0
    memory.close()
