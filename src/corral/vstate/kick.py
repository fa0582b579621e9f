"""Kicking a vCPU thread out of KVM_RUN.

A signal interrupts the KVM_RUN ioctl (EINTR); `immediate_exit` in the run page covers a kick
that lands just before the thread enters KVM_RUN. The handler is installed with libc's sigaction
(not Python's signal module) so it works whichever thread builds the VM, and never runs Python
code: it points at libc's getpid, an async-signal-safe function that ignores its argument.
"""

from __future__ import annotations

import ctypes as C
import signal
import threading

KICK_SIGNAL = signal.SIGRTMIN + 3

_installed = False
_lock = threading.Lock()


class _Sigaction(C.Structure):
    _fields_ = [
        ("sa_handler", C.c_void_p),
        ("sa_mask", C.c_uint64 * 16),
        ("sa_flags", C.c_int),
        ("sa_restorer", C.c_void_p),
    ]


def install_kick_handler() -> None:
    """Install the no-op handler once per process (without SA_RESTART, so KVM_RUN returns)."""
    global _installed
    with _lock:
        if _installed:
            return
        libc = C.CDLL(None, use_errno=True)
        act = _Sigaction()
        act.sa_handler = C.cast(libc.getpid, C.c_void_p).value
        act.sa_flags = 0
        if libc.sigaction(int(KICK_SIGNAL), C.byref(act), None) != 0:
            raise OSError(C.get_errno(), "sigaction for the vCPU kick signal failed")
        _installed = True


def kick_thread(thread_ident: int) -> None:
    try:
        signal.pthread_kill(thread_ident, KICK_SIGNAL)
    except ProcessLookupError:
        pass
