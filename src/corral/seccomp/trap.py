"""The SIGSYS handler: a forbidden system call ends the VMM with one line naming it.

A filter's default action is SECCOMP_RET_TRAP: the kernel skips the call and sends SIGSYS to
the thread that made it, with the call's number in `siginfo.si_syscall`. The handler must run
there and then, in whatever state the thread was (inside malloc, holding the GIL or not), so it
cannot be Python (Python's handlers run later, on the main thread) and must be async-signal-safe.
It is 60 bytes of x86-64 machine code placed in a page of its own beside a table of ready-made
messages, one per syscall number: it picks the message, write(2)s it to stderr and calls
exit_group(EXIT_CODE), two calls every filter allows. Built and installed (libc's sigaction)
once per process, before any filter, while mapping code is still allowed.
"""

from __future__ import annotations

import ctypes as C
import mmap
import signal
import struct
import threading
from collections.abc import Callable

EXIT_CODE = 148  # as Firecracker's: the process ended on a forbidden system call
SLOT = 128  # bytes per message: a length byte and the text
MAX_NR = 512  # syscall numbers with a message of their own; the rest share the last slot

_SA_SIGINFO = 4


class _Sigaction(C.Structure):
    _fields_ = [
        ("sa_handler", C.c_void_p),
        ("sa_mask", C.c_uint64 * 16),
        ("sa_flags", C.c_int),
        ("sa_restorer", C.c_void_p),
    ]


def _code(table: int) -> bytes:
    """handler(sig, info, uctx): rsi = info; si_syscall is the int at offset 24."""
    return b"".join(
        [
            b"\x8b\x46\x18",  # mov eax, [rsi+24]        the syscall number
            b"\x3d" + struct.pack("<I", MAX_NR),  # cmp eax, MAX_NR
            b"\x72\x05",  # jb +5
            b"\xb8" + struct.pack("<I", MAX_NR),  # mov eax, MAX_NR   (unknown: the last slot)
            b"\x48\xc1\xe0\x07",  # shl rax, 7                 * SLOT
            b"\x48\xb9" + struct.pack("<Q", table),  # movabs rcx, table
            b"\x48\x01\xc1",  # add rcx, rax
            b"\x0f\xb6\x11",  # movzx edx, byte [rcx]   the length
            b"\x48\x8d\x71\x01",  # lea rsi, [rcx+1]          the text
            b"\xbf\x02\x00\x00\x00",  # mov edi, 2
            b"\xb8\x01\x00\x00\x00",  # mov eax, 1 (write)
            b"\x0f\x05",  # syscall
            b"\xbf" + struct.pack("<I", EXIT_CODE),  # mov edi, EXIT_CODE
            b"\xb8\xe7\x00\x00\x00",  # mov eax, 231 (exit_group)
            b"\x0f\x05",  # syscall
            b"\xf4",  # hlt (never reached)
        ]
    )


def message(nr: int, name: str) -> bytes:
    return (
        f"\ncorral: error: seccomp: a VMM thread made a forbidden system call: {name} (#{nr}); "
        f"the VM was stopped\n".encode()
    )


_lock = threading.Lock()
_page: mmap.mmap | None = None


def install(resolve: Callable[[int], str | None]) -> None:
    """Install the handler for this process (once). `resolve(nr)` names syscall `nr`."""
    global _page
    with _lock:
        if _page is not None:
            return
        table = bytearray()
        for nr in range(MAX_NR + 1):
            name = resolve(nr) if nr < MAX_NR else None
            text = message(nr, name) if name else message(nr, "an unknown call")
            text = text[: SLOT - 1]
            table += bytes([len(text)]) + text.ljust(SLOT - 1, b"\0")
        code_len = mmap.PAGESIZE
        page = mmap.mmap(-1, code_len + len(table), prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = C.addressof(C.c_char.from_buffer(page))
        code = _code(base + code_len)
        page[: len(code)] = code
        page[code_len : code_len + len(table)] = bytes(table)
        libc = C.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
        if libc.mprotect(base, len(page), mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise OSError(C.get_errno(), "mprotect of the SIGSYS handler failed")
        act = _Sigaction()
        act.sa_handler = base
        act.sa_flags = _SA_SIGINFO
        for i in range(16):
            act.sa_mask[i] = (1 << 64) - 1  # nothing interrupts the handler
        if libc.sigaction(int(signal.SIGSYS), C.byref(act), None) != 0:
            raise OSError(C.get_errno(), "sigaction for SIGSYS failed")
        _page = page  # kept mapped for the life of the process
