"""The vCPU kick: a libc-installed no-op handler for a real-time signal, without SA_RESTART, so a
signalled thread's blocking call (KVM_RUN) returns EINTR and the process lives on; and
`immediate_exit`, which makes a KVM_RUN entered after the kick return at once."""

import ctypes as C
import errno
import os
import signal
import struct
import threading
import time

import pytest
from support.kvm_fakes import RealModeVm, exit_reason

from corral.kvm import constants as K
from corral.kvm import structs as S
from corral.vstate.kick import KICK_SIGNAL, install_kick_handler, kick_thread

SA_RESTART = 0x1000_0000
SA_SIGINFO = 0x4

libc = C.CDLL(None, use_errno=True)


class _Sigaction(C.Structure):  # glibc's struct sigaction on x86-64
    _fields_ = [
        ("sa_handler", C.c_void_p),
        ("sa_mask", C.c_uint64 * 16),
        ("sa_flags", C.c_int),
        ("sa_restorer", C.c_void_p),
    ]


def _current_action():
    old = _Sigaction()
    assert libc.sigaction(int(KICK_SIGNAL), None, C.byref(old)) == 0
    return old


def test_the_kick_signal_is_a_real_time_signal():
    assert signal.SIGRTMIN <= KICK_SIGNAL <= signal.SIGRTMAX


def test_install_points_the_signal_at_libc_getpid_without_restart():
    install_kick_handler()
    act = _current_action()
    assert act.sa_handler == C.cast(libc.getpid, C.c_void_p).value
    assert act.sa_flags & (SA_RESTART | SA_SIGINFO) == 0


def test_install_twice_is_harmless():
    install_kick_handler()
    install_kick_handler()
    assert _current_action().sa_handler == C.cast(libc.getpid, C.c_void_p).value


def test_a_kicked_thread_blocked_in_a_syscall_gets_eintr_and_the_process_survives():
    install_kick_handler()
    r, w = os.pipe()
    result = []
    entered = threading.Event()

    def blocked_read():
        buf = C.create_string_buffer(1)
        entered.set()
        n = libc.read(r, buf, 1)  # a raw read: Python would retry after EINTR
        result.append((n, C.get_errno()))

    t = threading.Thread(target=blocked_read, daemon=True)
    t.start()
    assert entered.wait(5)
    time.sleep(0.05)  # let it block in read()
    try:
        kick_thread(t.ident)
        t.join(5)
        assert not t.is_alive()
        assert result == [(-1, errno.EINTR)]
    finally:
        if t.is_alive():
            os.write(w, b"x")
        os.close(r)
        os.close(w)


@pytest.fixture
def real_vm():
    vm = RealModeVm()
    yield vm
    vm.close()


@pytest.mark.kvm
def test_a_kick_takes_a_spinning_vcpu_out_of_kvm_run_with_eintr(real_vm):
    install_kick_handler()
    fd = real_vm.vcpu(bytes([0xEB, 0xFE]))  # jmp $
    outcome = []

    def run():
        try:
            fd.run()
            outcome.append("exit")
        except OSError as exc:
            outcome.append(exc.errno)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.1)
    assert t.is_alive()  # the guest spins in KVM_RUN
    kick_thread(t.ident)
    t.join(5)
    assert outcome == [errno.EINTR]
    assert fd.get_regs().rip == RealModeVm.CODE_ADDR


@pytest.mark.kvm
def test_immediate_exit_makes_kvm_run_return_before_running_the_guest(real_vm):
    fd = real_vm.vcpu(bytes([0xE6, 0x80, 0xF4]))  # out 0x80, al; hlt
    fd.run_buf[S.RUN_IMMEDIATE_EXIT] = 1
    with pytest.raises(OSError) as exc:
        fd.run()
    assert exc.value.errno == errno.EINTR
    assert fd.get_regs().rip == RealModeVm.CODE_ADDR  # not one instruction ran
    fd.run_buf[S.RUN_IMMEDIATE_EXIT] = 0
    fd.run()  # cleared: the guest runs to its out
    assert exit_reason(fd) == K.EXIT_IO
    assert struct.unpack_from("<H", fd.run_buf, S.RUN_IO_PORT)[0] == 0x80
