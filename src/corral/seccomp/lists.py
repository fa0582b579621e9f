"""The allow-lists, per thread kind, as data.

Found by tracing each thread (strace -ff, one file per thread, from its filter on) through a
VM with a disk, a tap, vsock, the balloon, a console file and rng: pause, resume, snapshot,
balloon, a vsock connect, a migration out and in, restore, the probe's blk and net scenarios,
and `corral firecracker` booting from a config file, snapshotting and loading the snapshot; then
every kvm test under CORRAL_SECCOMP=log (the kernel's audit records name anything a filter would
have stopped). Paths no probe run reaches but the code has (a Linux guest's offload negotiation,
discard, flush, a guest connecting to a host vsock listener) are in with their reason.
`corral seccomp-report` prints the counts.
"""

from __future__ import annotations

import termios
from typing import NamedTuple

from corral.kvm import constants as K

# <sys/socket.h>'s families on Linux: numbers, not the socket module (~2 ms at every launch)
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16

# What any Python thread needs to live: the allocator (mmap and mprotect are added to every
# list, never with PROT_EXEC), the GIL and locks, signals (the vCPU kick's handler is libc's
# getpid), thread exit, stderr (logging, the SIGSYS handler's line).
PYTHON = frozenset(
    {
        "brk",  # malloc's main arena
        "munmap",
        "madvise",  # malloc trims; a thread's exit frees its stack
        "mremap",  # realloc of large buffers
        "futex",  # the GIL, locks, events
        "rt_sigreturn",  # the end of any signal handler (the vCPU kick)
        "rt_sigprocmask",  # libc masks signals around a thread's start and exit
        "restart_syscall",  # a futex wait interrupted by a signal
        "getpid",  # the kick handler itself
        "gettid",
        "write",
        "close",
        "exit",
        "exit_group",  # the process ending (the SIGSYS handler too)
    }
)
# what a thread needs to start threads (the kind's children inherit its filter and enter theirs)
THREAD_START = frozenset({"set_robust_list", "rseq", "prctl", "seccomp"})

# ioctl request numbers by name: KVM_* from corral.kvm.constants, and these
OTHER_IOCTLS = {
    "TCGETS": termios.TCGETS,  # isatty: open() asks, the console sets raw mode
    "TCSETS": termios.TCSETS,
    "TCSETSW": termios.TCSETSW,
    "FIONBIO": termios.FIONBIO,  # socket.setblocking / settimeout
    # the tap (corral.backends.tap): TUNSETIFF creates one, on the VMM thread only (also when a
    # guest reboots); TUNSETOFFLOAD follows the guest's feature negotiation
    "TUNSETIFF": 0x400454CA,
    "TUNSETOFFLOAD": 0x400454D0,
    "TUNSETVNETHDRSZ": 0x400454D8,
}
PR_SET_NAME, PR_SET_NO_NEW_PRIVS = 15, 38


class Policy(NamedTuple):
    """One thread kind's allow-list: plain calls, ioctls by request, socket families."""

    role: str
    syscalls: frozenset[str]
    ioctls: frozenset[str] = frozenset()  # names: KVM_* (corral.kvm.constants) or OTHER_IOCTLS
    socket_families: frozenset[int] = frozenset()
    threads: bool = False  # may start threads: clone with CLONE_THREAD, prctl, seccomp
    # the ioctl the thread makes most (KVM_RUN, once per exit): the filter tests it first
    hot_ioctl: str | None = None

    def ioctl_numbers(self) -> set[int]:
        return {_ioctl_number(n) for n in self.ioctls}

    def hot_ioctl_number(self) -> int | None:
        return None if self.hot_ioctl is None else _ioctl_number(self.hot_ioctl)

    def all_syscalls(self) -> set[str]:
        """Every call this kind may make, argument-filtered ones included."""
        out = set(self.syscalls) | {"mmap", "mprotect"}
        if self.ioctls:
            out.add("ioctl")
        if self.socket_families:
            out.add("socket")
        if self.threads:
            out |= THREAD_START | {"clone"}
        return out


def _ioctl_number(name: str) -> int:
    return OTHER_IOCTLS[name] if name in OTHER_IOCTLS else int(getattr(K, name))


# -- vCPU threads: KVM_RUN and the exits they emulate ----------------------------------------
VCPU = Policy(
    role="a vCPU: KVM_RUN, the exits it emulates",
    # tgkill: a vCPU that stops the machine kicks the others; eventfd2 + epoll_ctl +
    # KVM_IOEVENTFD: a guest enabling a virtio device makes its doorbells on this thread
    syscalls=PYTHON | {"tgkill", "eventfd2", "epoll_ctl"},
    ioctls=frozenset(
        {
            "KVM_RUN",
            "KVM_IOEVENTFD",
            "KVM_IRQ_LINE",  # legacy devices' interrupts (UART, RTC) raised from an exit
            "KVM_IRQFD",  # MSI-X vectors the guest programs
            "KVM_SET_GSI_ROUTING",
            "KVM_GET_REGS",  # a crash report: the registers, the code at RIP
            "KVM_GET_SREGS",
            "KVM_TRANSLATE",
            "TUNSETOFFLOAD",  # a Linux guest's virtio-net feature negotiation
            "KVM_SET_USER_MEMORY_REGION",  # PAM (un)protects the BIOS area; pflash maps its array
        }
    ),
    hot_ioctl="KVM_RUN",
)

# -- the device loop: virtqueues, disks, taps, vsock and console sockets ----------------------
LOOP = Policy(
    role="the device loop: virtqueues, disks, taps, vsock",
    syscalls=PYTHON
    | {
        "epoll_wait",
        "epoll_ctl",
        "read",  # doorbells, taps, sockets
        "getrandom",  # virtio-rng's bytes and MMDS tokens (os.urandom; a Linux guest asks at boot)
        "readv",
        "writev",
        "pread64",
        "pwrite64",
        "preadv",  # disk requests (os.preadv/pwritev: preadv2/pwritev2 in glibc)
        "pwritev",
        "preadv2",
        "pwritev2",
        "fsync",  # virtio-blk flush
        "fdatasync",
        "fallocate",  # discard and write-zeroes punch holes
        "accept4",  # vsock: host programs connecting
        "connect",  # vsock: the guest connecting to a host listener (never blocks)
        "getsockopt",  # ... and that connect's result
        "getsockname",
        "recvfrom",
        "sendto",
        "recvmsg",
        "sendmsg",
        "shutdown",
        "tgkill",  # a device stopping the machine kicks the vCPUs
        "clock_nanosleep",
    },
    ioctls=frozenset({"KVM_IRQ_LINE", "KVM_IRQFD", "KVM_SET_GSI_ROUTING", "TUNSETOFFLOAD", "FIONBIO"}),
    socket_families=frozenset({AF_UNIX}),
)

# -- the control socket: pause, snapshot, migration, balloon, status ---------------------------
STATE_IOCTLS = frozenset(
    {
        "KVM_GET_REGS",
        "KVM_GET_SREGS",
        "KVM_GET_MSRS",
        "KVM_GET_LAPIC",
        "KVM_GET_MP_STATE",
        "KVM_GET_VCPU_EVENTS",
        "KVM_GET_DEBUGREGS",
        "KVM_GET_XSAVE",
        "KVM_GET_XCRS",
        "KVM_KVMCLOCK_CTRL",  # pause tells a kvmclock guest
        "KVM_GET_IRQCHIP",
        "KVM_GET_PIT2",
        "KVM_GET_CLOCK",
        "KVM_SET_CLOCK",  # resume continues the guest clock
        "KVM_GET_DIRTY_LOG",  # migration's rounds
        "KVM_SET_USER_MEMORY_REGION",  # dirty logging on and off
    }
)
# wake from ACPI S3 (PUT /corral/wake) resets the parked vCPUs to the waking vector
WAKE_IOCTLS = frozenset(
    {
        "KVM_SET_REGS",
        "KVM_SET_SREGS",
        "KVM_SET_MSRS",
        "KVM_SET_LAPIC",
        "KVM_SET_MP_STATE",
        "KVM_SET_VCPU_EVENTS",
    }
)
# writing a snapshot (corral.state.snapshot): the API's verb, and gdb's `monitor snapshot`;
# getrandom: tempfile's names for the directory it fills before renaming it into place
SNAPSHOT_FILES = frozenset(
    {
        "openat",
        "newfstatat",
        "lseek",
        "pwrite64",
        "ftruncate",
        "fsync",
        "mkdir",
        "rename",
        "geteuid",
        "getrandom",
    }
)
API = Policy(
    role="the control socket: pause, snapshot, migrate, balloon",
    syscalls=PYTHON
    | SNAPSHOT_FILES
    | {
        "read",
        "accept4",
        "poll",  # socket timeouts
        "recvfrom",
        "sendto",
        "connect",  # migration to its destination
        "getsockname",
        "getpeername",  # TLS asks whether the socket is connected
        "getsockopt",  # SO_PEERCRED: who is calling
        "setsockopt",
        "shutdown",
        "pread64",  # KVM's per-vCPU statistics fds (corral stats)
        "getrandom",  # migration nonces
        "tgkill",  # pause kicks the vCPUs
    },
    ioctls=STATE_IOCTLS | WAKE_IOCTLS | {"TCGETS", "FIONBIO"},
    socket_families=frozenset({AF_UNIX, AF_INET, AF_INET6}),
    threads=True,  # a thread per connection, migration's throttle
)

# -- the gdb stub: one debugger's packets on a socket it already listens on ----------------
# (corral.debug.stub: its accept loop and each session's thread). It pauses and resumes the
# machine as the API does, reads and sets registers, translates addresses, sets breakpoints,
# and `monitor snapshot` writes one.
GDB = Policy(
    role="the gdb stub: a debugger's packets, registers, breakpoints",
    syscalls=PYTHON
    | SNAPSHOT_FILES
    | {
        "read",  # `monitor snapshot` validates state models: pydantic loads its parts on first use
        "accept4",
        "getsockopt",  # SO_PEERCRED: who connects to a unix-socket stub
        "recvfrom",
        "sendto",
        "pselect6",  # select.select: waiting for gdb's Ctrl-C while the guest runs
        "getsockname",  # the stub's own address (its port)
        "poll",  # the second debugger's socket timeout
        "shutdown",
        "tgkill",  # pause kicks the vCPUs
    },
    ioctls=STATE_IOCTLS  # pause, resume and `monitor snapshot`, as the API's
    | {
        "KVM_SET_REGS",
        "KVM_SET_SREGS",
        "KVM_GET_FPU",
        "KVM_SET_FPU",
        "KVM_SET_DEBUGREGS",
        "KVM_TRANSLATE",  # guest-virtual memory
        "KVM_SET_GUEST_DEBUG",  # breakpoints and steps
        "FIONBIO",  # socket timeouts
        "TCGETS",  # open() asks isatty (the snapshot's files)
    },
    threads=True,  # a thread per debugger (a second one is refused on its own)
)

# -- a migration's handshake: TLS and the token, with a peer not yet trusted -----------------
# (corral.migration's handshake threads, one per connection). It only talks on the socket it
# was handed; a proven link goes back to the receiving thread, which builds the machine.
INCOMING = Policy(
    role="a migration's handshake: TLS and the token, an untrusted peer",
    syscalls=PYTHON
    | {
        "read",  # OpenSSL's socket reads (its writes are write, which every list has)
        "recvfrom",
        "sendto",
        "poll",  # socket timeouts: the handshake's deadline
        "getrandom",  # nonces, TLS
        "setsockopt",  # TCP_NODELAY before TLS
        "getsockopt",
        "getpeername",  # TLS asks whether the socket is connected
        "getsockname",
        "shutdown",
    },
    ioctls=frozenset({"FIONBIO"}),
)

# -- the VMM thread: runs the machine, rebuilds it when the guest reboots ---------------------
# Its threads (vCPUs, the loop, on a reboot or a Firecracker InstanceStart) are created under
# its filter and keep it beneath their own, so it holds theirs too.
BUILD_IOCTLS = frozenset(
    {
        "KVM_GET_API_VERSION",
        "KVM_CREATE_VM",
        "KVM_GET_MSR_INDEX_LIST",
        "KVM_GET_MSR_FEATURE_INDEX_LIST",
        "KVM_CHECK_EXTENSION",
        "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_GET_SUPPORTED_CPUID",
        "KVM_CREATE_VCPU",
        "KVM_GET_STATS_FD",  # each vCPU's counters (halts, interrupts), read by corral stats
        "KVM_SET_TSS_ADDR",
        "KVM_SET_IDENTITY_MAP_ADDR",
        "KVM_CREATE_IRQCHIP",
        "KVM_CREATE_PIT2",
        "KVM_SET_IRQCHIP",
        "KVM_SET_PIT2",
        "KVM_SET_BOOT_CPU_ID",
        "KVM_ENABLE_CAP",
        "KVM_REGISTER_COALESCED_MMIO",
        "KVM_UNREGISTER_COALESCED_MMIO",
        "KVM_SET_REGS",
        "KVM_SET_SREGS",
        "KVM_SET_MSRS",
        "KVM_SET_FPU",
        "KVM_SET_LAPIC",
        "KVM_SET_CPUID2",
        "KVM_GET_CPUID2",
        "KVM_SET_MP_STATE",
        "KVM_SET_VCPU_EVENTS",
        "KVM_SET_DEBUGREGS",
        "KVM_SET_XSAVE",
        "KVM_SET_XCRS",
        "KVM_GET_FPU",
        "TUNSETIFF",
        "TUNSETVNETHDRSZ",
        "TCSETS",  # the terminal console: raw mode and back
        "TCSETSW",
    }
)
VMM = Policy(
    role="the VMM thread: runs and rebuilds the machine; Firecracker's API",
    syscalls=VCPU.syscalls
    | LOOP.syscalls
    | API.syscalls
    | GDB.syscalls
    | INCOMING.syscalls
    | {
        "memfd_create",  # guest RAM
        "epoll_create1",  # the device loop
        "eventfd2",
        "pipe2",
        "fcntl",
        "getdents64",
        "getcwd",
        "unlink",  # stale sockets, Firecracker's staging files
        "unlinkat",
        "rmdir",
        "bind",  # sockets it serves (vsock, pyroute2's netlink)
        "listen",
        "pselect6",  # the terminal console's input thread
        "rt_sigaction",  # the kick handler; SIGTERM under Firecracker's API
        "wait4",
        "socketpair",  # pyroute2's IPRoute, when a tap is made after start (Firecracker's API)
        "fchmod",  # the control socket (0600) that `corral receive --api` opens once the guest arrives
    },
    # a gdb stub started through the API (PUT /corral/gdb) starts under this filter and stacks
    # its own on it: this one holds the stub's
    ioctls=VCPU.ioctls | LOOP.ioctls | API.ioctls | GDB.ioctls | BUILD_IOCTLS,
    socket_families=frozenset({AF_UNIX, AF_INET, AF_INET6, AF_NETLINK}),
    threads=True,
)

POLICIES: dict[str, Policy] = {
    "vmm": VMM,
    "api": API,
    "loop": LOOP,
    "vcpu": VCPU,
    "gdb": GDB,
    "incoming": INCOMING,
}
