"""seccomp filters per thread: each VMM thread may make only the system calls its job needs.

Linux applies a seccomp filter to the thread that loads it (TSYNC off) and to the threads it
creates afterwards, so each kind of thread enters its own allow-list as its first act
(`enter(kind)`): the vCPU threads, the device loop, the control-socket server, the gdb stub's
threads, an incoming migration's handshakes, and the VMM's main thread once the machine is
built or, for `corral receive`, once it listens (it rebuilds the VM on a guest reboot, so its
list is the widest; threads it creates stack their own, narrower list on top). The lists are
data (corral.seccomp.lists), with argument filters where the argument is a number: ioctl
request numbers (KVM_RUN for a vCPU, never KVM_CREATE_VM), socket families, clone flags
(threads only, never a new process), no PROT_EXEC mappings. Anything else traps: the SIGSYS
handler (corral.seccomp.trap) writes one line naming the call and ends the process with exit
code 148.

Filters are opt-in for the library (`enable()`; an embedding program keeps its threads as they
are) and on by default in the CLI (`--no-seccomp` turns them off, for debugging). The
environment variable CORRAL_SECCOMP=log logs instead of trapping (the kernel's audit log names
each call a thread would have been stopped for), to find what a new code path needs.

What Python does behind a filtered thread's back, and how it is kept inside the lists:
- A traceback (an exception logged, an uncaught one) reads source lines through `linecache`,
  which stats and opens the files: a filtered thread would die on `newfstatat` instead of
  showing the real error. `enter` makes linecache serve filtered threads only what it already
  holds (`_quiet_linecache`); `prepare` loads corral's own sources into it, so tracebacks
  through corral keep their lines.
- A C extension imported lazily is dlopen()ed: an executable mapping, which no filter allows
  (the trap names `mmap`). `prepare` imports those that a filtered thread's lazy paths reach
  (`LAZY_EXTENSIONS`); code that imports inside a function on a filtered thread must import
  its C extensions before the filter, as `_crash_dumper` in corral.cli does.
"""

from __future__ import annotations

import ctypes as C
import errno
import importlib
import linecache
import logging
import os
import sys
import threading
import traceback
from types import ModuleType
from typing import Any, NamedTuple

from corral.errors import CorralError
from corral.seccomp import cache, lists, trap
from corral.seccomp.trap import EXIT_CODE

# The kernel's SECCOMP_RET_* actions (libseccomp's SCMP_ACT_* have the same values).
TRAP = 0x0003_0000
LOG = 0x7FFC_0000


def _libseccomp() -> ModuleType:
    """pyseccomp, imported only to compile a filter the cache (corral.seccomp.cache) lacks."""
    import ctypes.util

    # pyseccomp looks its libraries up with ctypes.util.find_library, which runs
    # `/sbin/ldconfig -p`: a process start, and nothing to run inside a jail's minimal root.
    # The sonames are fixed and the dynamic loader finds them by itself, so hand them over.
    find_library = ctypes.util.find_library
    sonames = {"seccomp": "libseccomp.so.2", "c": "libc.so.6"}
    ctypes.util.find_library = lambda name: sonames.get(name) or find_library(name)
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = find_library
    return pyseccomp


log = logging.getLogger(__name__)

KINDS = ("vmm", "api", "loop", "vcpu", "gdb", "incoming")
# Off in normal use. A test sets this in the process it starts (never through the
# environment alone), and then CORRAL_SECCOMP_SELFTEST=KIND makes that thread kind attempt a
# forbidden call right after entering its filter, to show the trap works there.
SELFTEST = False

_PR_SET_NAME = 15
_CLONE_THREAD = 0x10000
_PROT_EXEC = 0x4


class SeccompError(CorralError):
    """A seccomp filter could not be built or loaded."""


class _State:
    """Whether filters are on, and what a forbidden call does (set by enable())."""

    enabled = False
    action = TRAP


_state = _State()
_lock = threading.Lock()
_filters: dict[str, bytes] = {}  # kind -> its BPF program
_entered = threading.local()  # .kind: the filter this thread is under (entering it twice adds nothing)


def enable(on: bool = True) -> None:
    """Turn per-thread filters on (or off) for this process; threads started from now on
    enter theirs. CORRAL_SECCOMP=log makes them log instead of trap."""
    if not on:
        _state.enabled = False
        return
    mode = os.environ.get("CORRAL_SECCOMP", "trap")
    if mode not in ("trap", "log"):
        raise SeccompError(f"CORRAL_SECCOMP={mode!r}: use 'trap' (the default) or 'log'")
    _state.action = LOG if mode == "log" else TRAP
    if _state.action == TRAP:
        names = cache.syscall_names(trap.MAX_NR, syscall_name)
        trap.install(names.__getitem__)
    _state.enabled = True


def enabled() -> bool:
    return _state.enabled


def syscall_name(nr: int) -> str | None:
    sc = _libseccomp()
    try:
        name: bytes = sc.resolve_syscall(sc.Arch.NATIVE, nr)
    except ValueError:
        return None
    return name.decode()


def _build(kind: str, action: int) -> Any:
    """The libseccomp filter (pyseccomp.SyscallFilter) for `kind`: the list and the rules around it."""
    sc = _libseccomp()
    policy = lists.POLICIES[kind]
    f = sc.SyscallFilter(action)
    for name in sorted(policy.syscalls):
        f.add_rule(sc.ALLOW, name)
    hot = policy.hot_ioctl_number()
    for request in sorted(policy.ioctl_numbers()):
        if request == hot and request < 1 << 31:
            # the whole argument compared, which libseccomp puts before the masked tests (it
            # orders those by value: KVM_RUN came last of ten); below 2**31 a request reads
            # the same whether a caller sign-extends it or not
            f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.EQ, request))
        else:
            f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    if hot is not None:
        f.syscall_priority("ioctl", 255)  # ioctl before the other calls, too
    for family in sorted(policy.socket_families):
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
    # memory: never a new executable mapping (code is mapped before the filters)
    for name in ("mmap", "mprotect"):
        f.add_rule(sc.ALLOW, name, sc.Arg(2, sc.MASKED_EQ, _PROT_EXEC, 0))
    if policy.threads:
        # threads, never a process: clone only with CLONE_THREAD; clone3's flags sit behind a
        # pointer no filter can read, so it fails with ENOSYS and glibc falls back to clone
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        # a new thread's first calls, then its name and its own filter (enter)
        for name in ("set_robust_list", "rseq", "seccomp"):
            f.add_rule(sc.ALLOW, name)
        for option in (lists.PR_SET_NAME, lists.PR_SET_NO_NEW_PRIVS):
            f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, option))
    return f


def compile_bpf(kind: str, action: int) -> bytes:
    """`kind`'s filter compiled by libseccomp: the BPF program its load would install."""
    f = _build(kind, action)
    fd = os.memfd_create(f"corral-seccomp-{kind}", os.MFD_CLOEXEC)
    try:
        with open(fd, "w+b", closefd=False) as out:
            f.export_bpf(out)
        return os.pread(fd, cache.MAX_INSNS * cache.INSN + 1, 0)
    finally:
        os.close(fd)


def _key(kind: str, action: int) -> bytes:
    """What `kind`'s program depends on: its list, the action, the architecture, and the rules
    `_build` adds (by this module's source text)."""
    p = lists.POLICIES[kind]
    with open(__file__, "rb") as src:
        rules = src.read()
    lists_ = (
        sorted(p.syscalls),
        sorted(p.ioctl_numbers()),
        sorted(p.socket_families),
        p.threads,
        p.hot_ioctl,
    )
    return cache.key(kind, action, os.uname().machine, lists_, rules)


def build(kind: str) -> bytes:
    """The BPF program for thread kind `kind`: from this process's, then the disk's cache
    (corral.seccomp.cache), else compiled by libseccomp. A reboot's new threads reuse it."""
    if kind not in lists.POLICIES:
        raise SeccompError(f"no seccomp policy for thread kind {kind!r}: one of {', '.join(KINDS)}")
    with _lock:
        program = _filters.get(kind)
        if program is None:
            action = _state.action
            try:
                program = cache.program(kind, _key(kind, action), lambda: compile_bpf(kind, action))
            except OSError as exc:
                raise SeccompError(f"seccomp: the {kind} filter cannot be built: {exc}") from None
            _filters[kind] = program
        return program


# C extensions that code on a filtered thread imports on first use (found with
# CORRAL_SECCOMP=log over the kvm tests): imported by prepare(), before any filter.
LAZY_EXTENSIONS = (
    "unicodedata",  # socket's host names ("localhost".encode("idna")): a migration's connect
    # a bzImage's payload is peeked with these; the loader is imported with the first such kernel,
    # which for a restored or received guest is its first reboot, on the VMM's filtered thread
    "_bz2",
    "_lzma",
)


def prepare() -> None:
    """Build every filter now, while the process may still do anything (libseccomp itself
    allocates and resolves names), and load what a filtered thread would otherwise load
    lazily: a C extension is mapped executable, which no filter allows; source lines for
    tracebacks are files to open."""
    for name in LAZY_EXTENSIONS:
        importlib.import_module(name)
    "localhost".encode("idna")  # the idna codec itself (a pure-Python module) too
    importlib.import_module("ast")  # traceback's, to mark the failing expression in a line
    for kind in KINDS:
        build(kind)
    _quiet_linecache()
    _cache_sources("corral")


def _filtered() -> bool:
    return getattr(_entered, "kind", None) is not None


def _quiet_linecache() -> None:
    """Make linecache serve a filtered thread only what it already holds: no stat (checkcache),
    no open (updatecache, a lazy entry's loader). A traceback printed there then shows the
    error, with the lines cached before the filter and without the others, instead of ending
    the VMM on `newfstatat`. Other threads keep linecache as it was. Idempotent."""
    if getattr(linecache.updatecache, "_corral_quiet", False):
        return
    check, update = linecache.checkcache, linecache.updatecache

    def checkcache(filename: str | None = None) -> None:
        if not _filtered():
            check(filename)

    def updatecache(filename: str, module_globals: Any = None) -> list[str]:
        return [] if _filtered() else update(filename, module_globals)

    updatecache._corral_quiet = True  # type: ignore[attr-defined]
    linecache.checkcache = checkcache
    linecache.updatecache = updatecache  # getlines looks it up in the module at each call
    # A thread's uncaught exception: the default hook is C, which opens the source files
    # itself; this one prints the same through the traceback module, hence linecache.
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _excepthook


def _excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else threading.get_ident()
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    if sys.stderr is not None:
        sys.stderr.write(f"Exception in thread {name}:\n{text}")
        sys.stderr.flush()


# corral's own sources kept for tracebacks on filtered threads: a bound on what prepare reads
MAX_SOURCE_BYTES = 8 << 20


def _cache_sources(package: str) -> None:
    """Load the source of `package`'s imported modules into linecache (up to
    MAX_SOURCE_BYTES in all), so a filtered thread's traceback through them shows its lines."""
    total = 0
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not (name == package or name.startswith(package + ".")) or not path or not path.endswith(".py"):
            continue
        lines = linecache.getlines(path)
        total += sum(map(len, lines))
        if total > MAX_SOURCE_BYTES:
            return


def enter(kind: str, name: str | None = None) -> None:
    """Put the calling thread under the `kind` filter (a no-op unless enabled). `name` (at most
    15 bytes) becomes the thread's name in /proc and ps."""
    if name is not None:
        libc = C.CDLL(None)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    if not _state.enabled or getattr(_entered, "kind", None) == kind:
        return
    program = build(kind)
    _quiet_linecache()
    selftest = SELFTEST and os.environ.get("CORRAL_SECCOMP_SELFTEST") == kind
    if selftest:
        import socket  # noqa: F401  (before the filter, under which no extension can be mapped)
    try:
        cache.load(program)
    except OSError as exc:
        raise SeccompError(f"seccomp: the {kind} filter cannot be loaded: {exc}") from None
    _entered.kind = kind
    if selftest:
        _forbidden_call()


def _forbidden_call() -> None:
    """What the self-test makes a filtered thread do: open a packet socket to sniff the host's
    network, as a compromised VMM would (no thread may)."""
    import socket  # imported by enter(), before the filter

    log.warning("seccomp self-test: a forbidden socket() from %s", threading.current_thread().name)
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()


# Firecracker's default x86-64 filters, system calls per thread (its docs/seccomp.md and
# resources/seccomp): a yardstick. It has no device-loop thread (its VMM thread runs devices).
FIRECRACKER = {"vmm": 50, "api": 31, "vcpu": 27}


class Count(NamedTuple):
    kind: str
    role: str
    syscalls: int  # distinct system calls allowed
    ioctls: int  # ioctl request numbers allowed
    firecracker: int | None  # Firecracker's count for the same thread, if it has one


def counts() -> list[Count]:
    """The size of each thread kind's allow-list (`corral seccomp-report`)."""
    out = []
    for kind in KINDS:
        p = lists.POLICIES[kind]
        out.append(Count(kind, p.role, len(p.all_syscalls()), len(p.ioctl_numbers()), FIRECRACKER.get(kind)))
    return out


__all__ = [
    "EXIT_CODE",
    "FIRECRACKER",
    "KINDS",
    "LAZY_EXTENSIONS",
    "Count",
    "SeccompError",
    "build",
    "compile_bpf",
    "counts",
    "enable",
    "enabled",
    "enter",
    "prepare",
    "syscall_name",
]
