"""vCPU threads: configure a vCPU, run it, and dispatch its exits to the buses.

The exit path is the hot path of every emulated device access: it reads the kvm_run page
through precompiled structs and a memoryview, and calls the bus directly. Where the optional
extension `_exitloop` (C, built by `pip install`) is there, it runs KVM_RUN and the port-I/O
and MMIO dispatch in C (from the buses' own tables, PioBus.ports and MMIO's index, as their
read and write do), and hands every other exit back: the
Python loop below stays the reference (CORRAL_NO_FASTPATH=1 runs it, and the exit statistics
always do). It saves the interpreter's work around each exit, which matters most where KVM_RUN
is cheap (VT-x/AMD-V: a round trip of 1-2 us, against ~27 us on a PVM host).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from time import perf_counter_ns
from typing import TYPE_CHECKING, Protocol

from corral.boot.cpu_state import BootCpuState, Segment
from corral.kvm import constants as K
from corral.kvm import structs as S
from corral.kvm.fds import KvmError, VcpuFd
from corral.seccomp import enter as enter_seccomp
from corral.vstate.exits import FLAG_WRITE, ExitObserver
from corral.vstate.kick import install_kick_handler, kick_thread
from corral.vstate.kvm_state import VcpuState, cpuid_bytes, cpuid_entries, load_vcpu, save_vcpu
from corral.vstate.kvm_stats import VcpuStats

if TYPE_CHECKING:
    from corral.devices.bus import MmioBus, PioBus

try:
    from corral.vstate import _exitloop
except ImportError:  # not built: the Python loop serves
    _exitloop = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# the compiled loop (_exitloop.c), unless it was not built or CORRAL_NO_FASTPATH is set
EXIT_LOOP = _exitloop is not None and os.environ.get("CORRAL_NO_FASTPATH", "") in ("", "0")
# exits the compiled loop serves per call before Python looks at its flags again (a stop or a
# pause kicks the vCPU out of KVM_RUN at once; this bounds the rest)
EXIT_LOOP_BUDGET = 4096
_BUDGET_SPENT, _RUN_FAILED = -1, -2  # _exitloop.run's reasons that are no KVM exit


def describe_exit_loop() -> str:
    """One line for `corral doctor`: which vCPU loop runs."""
    if EXIT_LOOP:
        return "compiled (corral.vstate._exitloop)"
    return "Python; the compiled one is " + (
        "not built" if _exitloop is None else "off (CORRAL_NO_FASTPATH is set)"
    )


_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_U32 = struct.Struct("<I")
_INTERNAL = struct.Struct("<II")  # suberror, ndata
_SYSEVENT = struct.Struct("<II")  # type, ndata
_DEBUG = struct.Struct("<I4xQQQ")  # kvm_debug_exit_arch: exception, pc, dr6, dr7

_MP_STATE_NAMES = {
    K.MP_STATE_RUNNABLE: "runnable",
    K.MP_STATE_UNINITIALIZED: "wait-for-SIPI",
    K.MP_STATE_INIT_RECEIVED: "INIT received",
    K.MP_STATE_HALTED: "halted",
    K.MP_STATE_SIPI_RECEIVED: "SIPI received",
}

LAPIC_LVT0 = 0x350
LAPIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


class VcpuHost(Protocol):
    """What a vCPU thread reports to the machine that owns it."""

    def vcpu_stop(self, kind: str, status: int, message: str) -> None: ...


class DebugHook(Protocol):
    """A debugger's ear on a vCPU: told of every debug exit (breakpoint, watchpoint, single
    step), on the vCPU's thread, which then parks until the debugger resumes it (all-stop)."""

    def debug_exit(self, vcpu: Vcpu, exception: int, pc: int, dr6: int, dr7: int) -> None: ...


class Vcpu:
    def __init__(self, fd: VcpuFd, index: int, pio: PioBus, mmio: MmioBus, host: VcpuHost) -> None:
        self.fd = fd
        self.index = index
        self.pio = pio
        self.mmio = mmio
        self.host = host
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.cpuid: list[S.KvmCpuidEntry2] = []  # what the guest sees (snapshots carry it)
        self._preset_cpuid: bytes | None = None  # preset_cpuid()'s table, until load_state()
        # pause protocol: the machine sets pause_requested and kicks; the thread finishes any
        # pending I/O inside KVM (immediate_exit), then parks until resumed
        self.pause_requested = False
        self.parked = threading.Event()
        self._resume = threading.Event()
        self.debug_hook: DebugHook | None = None  # set by a debugger (corral.debug)
        # exit statistics and tracing (vstate.exits): None runs the plain loop
        self.observer: ExitObserver | None = None
        # bench/dispatch_bench.py: CLOCK_MONOTONIC ns around each KVM_RUN of the compiled loop
        self.exit_stamps: memoryview | None = None
        # KVM's own counters (halts, injected interrupts): opened by the builder before it runs
        self.kvm_stats: VcpuStats | None = None

    # -- configuration ----------------------------------------------------------------------
    def configure(self, cpuid: list[S.KvmCpuidEntry2], msrs: dict[int, int]) -> None:
        self.cpuid = cpuid
        self.fd.set_cpuid2(cpuid)
        self.fd.set_msrs(msrs)
        fpu = S.KvmFpu()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        self.fd.set_fpu(fpu)
        self._set_lint()

    def preset_cpuid(self, cpuid: list[S.KvmCpuidEntry2]) -> None:
        """Give a vCPU whose state comes later the CPUID it most likely carries (this host's
        for this config, as the source computed it): load_state() then skips setting it again
        when it is the same (~0.3 ms, in an incoming migration's downtime), and sets the
        state's when not (allowed: the vCPU has not run)."""
        self.cpuid = cpuid
        self.fd.set_cpuid2(cpuid)
        self._preset_cpuid = cpuid_bytes(cpuid)

    def _set_lint(self) -> None:
        """Virtual-wire mode: LINT0 takes ExtINT from the PIC, LINT1 takes NMI (as firmware leaves it)."""
        lapic = self.fd.get_lapic()
        raw = bytearray(lapic.regs)

        def set_mode(off: int, mode: int) -> None:
            v = int.from_bytes(raw[off : off + 4], "little")
            v = (v & ~0x700) | (mode << 8)
            raw[off : off + 4] = v.to_bytes(4, "little")

        set_mode(LAPIC_LVT0, APIC_MODE_EXTINT)
        set_mode(LAPIC_LVT1, APIC_MODE_NMI)
        lapic.regs[:] = raw
        self.fd.set_lapic(lapic)

    def set_boot_state(self, st: BootCpuState) -> None:
        sregs = self.fd.get_sregs()
        for name in ("cs",):
            _apply_segment(getattr(sregs, name), st.cs)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _apply_segment(getattr(sregs, name), st.ds)
        _apply_segment(sregs.tr, st.tr)
        sregs.gdt.base, sregs.gdt.limit = st.gdt_base, st.gdt_limit
        sregs.idt.base, sregs.idt.limit = st.idt_base, st.idt_limit
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = st.cr0, st.cr3, st.cr4, st.efer
        self.fd.set_sregs(sregs)
        regs = S.KvmRegs()
        regs.rip, regs.rsp, regs.rflags = st.rip, st.rsp, st.rflags
        for name, value in st.gprs.items():
            setattr(regs, name, value)
        self.fd.set_regs(regs)

    def reset_for_wake(self, msrs: dict[int, int], vector: int | None, protected: bool = False) -> None:
        """Put this parked vCPU where a PC leaves it on an ACPI S3 resume (RAM kept, CPU reset):
        the LAPIC reset (virtual wire, as firmware leaves it), no pending events, `msrs` set
        (arch.x86.msr.wake_msrs). With `vector`, the CPU runs from there: real mode with
        CS = vector >> 4 and IP = vector & 0xF (FIRMWARE_WAKING_VECTOR), or with `protected`
        flat 32-bit protected mode, paging off (X_FIRMWARE_WAKING_VECTOR). Without, it waits
        for INIT/SIPI, as an AP does until the OS starts it again."""
        self.fd.set_msrs(msrs)
        lapic = self.fd.get_lapic()
        raw = bytearray(lapic.regs)
        ident = raw[LAPIC_ID : LAPIC_ID + 4]
        version = raw[LAPIC_VERSION : LAPIC_VERSION + 4]
        raw[:] = bytes(len(raw))
        raw[LAPIC_ID : LAPIC_ID + 4] = ident
        raw[LAPIC_VERSION : LAPIC_VERSION + 4] = version
        for off, value in _LAPIC_RESET.items():
            raw[off : off + 4] = value.to_bytes(4, "little")
        lapic.regs[:] = raw
        self.fd.set_lapic(lapic)
        self._set_lint()
        self.fd.set_vcpu_events(S.KvmVcpuEvents())  # nothing injected or pending
        if vector is None:
            self.fd.set_mp_state(K.MP_STATE_UNINITIALIZED)
            return
        sregs = self.fd.get_sregs()
        if protected:
            code, data = _FLAT_CODE32, _FLAT_DATA32
            cs_seg, ip = code, vector
            sregs.cr0 = CR0_PE | CR0_RESET
        else:
            data = _REAL_DATA
            cs_seg = Segment(vector >> 4 << 4, 0xFFFF, vector >> 4, 0xB, g=0)
            ip = vector & 0xF
            sregs.cr0 = CR0_RESET
        _apply_segment(sregs.cs, cs_seg)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _apply_segment(getattr(sregs, name), data)
        _apply_segment(sregs.tr, _RESET_TR)
        _apply_segment(sregs.ldt, _RESET_LDT)
        sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
        sregs.idt.base, sregs.idt.limit = 0, 0xFFFF
        sregs.cr2 = sregs.cr3 = sregs.cr4 = sregs.efer = 0
        sregs.interrupt_bitmap[:] = [0] * len(sregs.interrupt_bitmap)
        self.fd.set_sregs(sregs)
        regs = S.KvmRegs()
        regs.rip, regs.rflags = ip, 0x2
        self.fd.set_regs(regs)
        self.fd.set_mp_state(K.MP_STATE_RUNNABLE)

    # -- running ----------------------------------------------------------------------------
    def start(self) -> None:
        install_kick_handler()
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        """Make the thread leave KVM_RUN and notice `stopping`."""
        self.stopping = True
        self._resume.set()
        self._interrupt()

    def _interrupt(self) -> None:
        self.fd.run_buf[S.RUN_IMMEDIATE_EXIT] = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            kick_thread(t.ident)

    def set_observer(self, observer: ExitObserver | None) -> None:
        """Time and count every exit from now on (exit statistics, a trace), or stop (None)."""
        if observer is self.observer:
            return
        self.observer = observer
        if EXIT_LOOP and self.thread is not None:
            self._interrupt()  # the compiled loop looks at it between its calls only

    def request_pause(self) -> None:
        """Ask the thread to park; `parked` is set once the vCPU's state is consistent (no
        I/O half done) and stays so until `resume`. A vCPU not yet started counts as parked."""
        self._resume.clear()
        self.pause_requested = True
        if self.thread is None or not self.thread.is_alive():
            # not running (yet): if it starts before a resume, it parks before its first
            # instruction. (A thread made but not yet started counts too: `start` is two steps,
            # and a debugger attaching between them once left the guest running "paused".)
            self.fd.run_buf[S.RUN_IMMEDIATE_EXIT] = 1
            self.parked.set()
            return
        self._interrupt()

    def resume(self) -> None:
        self.pause_requested = False
        self.parked.clear()
        self._resume.set()

    def _park(self) -> None:
        # `parked` is set on every turn: a resume followed at once by a new pause (before this
        # thread woke) clears it, and the thread, still here, must report parked again
        while self.pause_requested and not self.stopping:
            self.parked.set()
            self._resume.wait()
        self.parked.clear()

    def set_guest_debug(self, control: int, debugregs: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG on this (parked) vCPU: K.GUESTDBG_* flags, DR0-3 and DR7 at [0:4]
        and [7] of `debugregs`; control 0 gives the guest its own debug state back."""
        self.fd.set_guest_debug(control, debugregs)

    def join(self, timeout: float | None = None) -> None:
        t = self.thread
        if t is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
                return
            except RuntimeError:
                # a Ctrl-C in start() ended its wait for the new thread, which starts now
                if deadline is not None and time.monotonic() >= deadline:
                    return
                time.sleep(0.001)

    def close(self) -> None:
        if self.kvm_stats is not None:
            self.kvm_stats.close()
        self.fd.close()

    # -- state ------------------------------------------------------------------------------
    def save_state(self, msr_indices: list[int]) -> VcpuState:
        """KVM's state of this (parked or never started) vCPU, with the MSRs among `msr_indices`
        that KVM lets it read."""
        return save_vcpu(self.fd, self.index, self.cpuid, msr_indices)

    def load_state(self, state: VcpuState) -> None:
        """Put `state` into this freshly created vCPU (one that has never run)."""
        preset, self._preset_cpuid = self._preset_cpuid, None
        same = preset is not None and preset == state.cpuid
        if not same:
            self.cpuid = cpuid_entries(state)
        load_vcpu(self.fd, state, cpuid_set=same)

    def notify_paused(self) -> None:
        """Tell a kvmclock guest it was paused on purpose (its watchdogs should not fire)."""
        self.fd.kvmclock_ctrl()

    def mp_state_name(self) -> str:
        try:
            return _MP_STATE_NAMES.get(self.fd.get_mp_state(), "?")
        except KvmError as exc:
            return f"unknown ({exc})"

    def _thread_main(self) -> None:
        try:
            enter_seccomp("vcpu", f"corral-vcpu{self.index}")
            self._loop()
        except Exception as exc:
            log.exception("vcpu%d crashed", self.index)
            self.host.vcpu_stop("error", 1, f"vcpu{self.index}: VMM error: {exc!r}")

    def _loop(self) -> None:
        fd = self.fd
        run = fd.run_buf
        run_ioctl = fd.run
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        io_unpack = _IO.unpack_from
        mmio_unpack = _MMIO.unpack_from
        from_bytes = int.from_bytes
        EXIT_IO, EXIT_MMIO = K.EXIT_IO, K.EXIT_MMIO
        # (it runs KVM_RUN itself: a stand-in fd, a test's scripted exits, goes through fd.run)
        compiled = _exitloop.run if EXIT_LOOP and type(fd) is VcpuFd else None
        exits = 0
        while not self.stopping:
            if self.observer is not None:  # the one check observing costs when it is off
                self.exits += exits
                exits = 0
                if not self._observed_turn(self.observer):
                    return
                continue
            if compiled is not None:
                stamps = self.exit_stamps
                n, reason, err = compiled(
                    fd.fd, run, self.pio.ports, self.mmio,
                    EXIT_LOOP_BUDGET, K.KVM_RUN, EXIT_IO, EXIT_MMIO, stamps,
                )  # fmt: skip
                exits += n
                if stamps is not None:
                    self.exit_stamps = stamps[2 * n :]
                if reason == _BUDGET_SPENT:
                    continue
                if reason == _RUN_FAILED:
                    if self._run_failed(OSError(err, os.strerror(err))):
                        continue
                    return
                self.exits += exits
                exits = 0
                if not self._slow_exit(reason):
                    return
                continue
            try:
                run_ioctl()
            except OSError as exc:
                if self._run_failed(exc):
                    continue
                return
            exits += 1
            reason = run[8]
            if reason == EXIT_IO:
                direction, size, port, count, off = io_unpack(run, 32)
                if direction:  # out
                    for _ in range(count):
                        pio_write(port, size, from_bytes(run[off : off + size], "little"))
                        off += size
                else:
                    for _ in range(count):
                        run[off : off + size] = pio_read(port, size).to_bytes(size, "little")
                        off += size
            elif reason == EXIT_MMIO:
                addr, data, length, is_write = mmio_unpack(run, 32)
                if length > 8:
                    length = 8
                if is_write:
                    mmio_write(addr, length, from_bytes(data[:length], "little"))
                else:
                    run[40 : 40 + length] = mmio_read(addr, length).to_bytes(length, "little")
            else:
                self.exits += exits
                exits = 0
                if not self._slow_exit(_U32.unpack_from(run, 8)[0]):
                    return
        self.exits += exits

    def _run_failed(self, exc: OSError) -> bool:
        """KVM_RUN returned an error: True for an interruption (kick, pause), after which the
        loop goes on; False when this vCPU must stop."""
        if exc.errno in (errno.EINTR, errno.EAGAIN):
            # KVM completed any pending I/O before returning: state is consistent here
            self.fd.run_buf[S.RUN_IMMEDIATE_EXIT] = 0
            if self.pause_requested:
                self._park()
            return True
        self.host.vcpu_stop("error", 1, f"vcpu{self.index}: KVM_RUN failed: {exc.strerror}")
        return False

    def _observed_turn(self, obs: ExitObserver) -> bool:
        """One KVM_RUN and its exit, timed, counted and recorded (exit statistics or a trace
        are on). Returns False when this vCPU must stop."""
        run = self.fd.run_buf
        t0 = perf_counter_ns()
        try:
            self.fd.run()
        except OSError as exc:
            obs.run_ns += perf_counter_ns() - t0
            return self._run_failed(exc)
        t1 = perf_counter_ns()
        obs.run_ns += t1 - t0
        self.exits += 1
        reason = _U32.unpack_from(run, 8)[0]
        addr = length = flags = 0
        go_on = True
        if reason == K.EXIT_IO:
            direction, size, addr, count, off = _IO.unpack_from(run, 32)
            length, flags = size * count, FLAG_WRITE if direction else 0
            for _ in range(count):
                if direction:
                    self.pio.write(addr, size, int.from_bytes(run[off : off + size], "little"))
                else:
                    run[off : off + size] = self.pio.read(addr, size).to_bytes(size, "little")
                off += size
        elif reason == K.EXIT_MMIO:
            addr, data, length, is_write = _MMIO.unpack_from(run, 32)
            length, flags = min(length, 8), FLAG_WRITE if is_write else 0
            if is_write:
                self.mmio.write(addr, length, int.from_bytes(data[:length], "little"))
            else:
                run[40 : 40 + length] = self.mmio.read(addr, length).to_bytes(length, "little")
        else:
            go_on = self._slow_exit(reason)
        ns = perf_counter_ns() - t1
        obs.count(obs.by_reason, reason, ns)
        if reason == K.EXIT_IO:
            obs.count(obs.pio, addr, ns)
        elif reason == K.EXIT_MMIO:
            obs.count(obs.mmio, addr, ns)
        if obs.recorder is not None:
            obs.recorder.record(t1, self.index, reason, addr, length, flags, ns)
        return go_on

    def _slow_exit(self, reason: int) -> bool:
        """Handle a rare exit. Returns False when this vCPU must stop."""
        run = self.fd.run_buf
        if reason == K.EXIT_HLT:
            # Only without an in-kernel LAPIC; treat as a halted machine.
            self.host.vcpu_stop("halt", 0, f"vcpu{self.index} halted")
            return False
        if reason == K.EXIT_SHUTDOWN:
            self.host.vcpu_stop(
                "crash", 1, f"vcpu{self.index}: guest triple fault (shutdown)\n" + self.describe_registers()
            )
            return False
        if reason == K.EXIT_SYSTEM_EVENT:
            etype, _ = _SYSEVENT.unpack_from(run, S.RUN_SYSTEM_EVENT_TYPE)
            if etype == K.SYSTEM_EVENT_RESET:
                self.host.vcpu_stop("reset", 0, "guest requested reset")
            elif etype == K.SYSTEM_EVENT_SHUTDOWN:
                self.host.vcpu_stop("poweroff", 0, "guest powered off")
            else:
                self.host.vcpu_stop(
                    "crash", 1, f"vcpu{self.index}: guest crash event {etype}\n" + self.describe_registers()
                )
            return False
        if reason == K.EXIT_INTERNAL_ERROR:
            sub, ndata = _INTERNAL.unpack_from(run, S.RUN_INTERNAL_SUBERROR)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", run, S.RUN_INTERNAL_DATA)
            kinds = {
                1: "instruction emulation failed",
                2: "exception while delivering an exception",
                3: "event delivery failed",
                4: "unexpected exit reason",
            }
            self.host.vcpu_stop(
                "crash",
                1,
                f"vcpu{self.index}: KVM internal error: {kinds.get(sub, f'suberror {sub}')} "
                f"(data {' '.join(hex(d) for d in data)})\n" + self.describe_registers(),
            )
            return False
        if reason == K.EXIT_FAIL_ENTRY:
            hw = struct.unpack_from("<Q", run, S.RUN_FAIL_ENTRY_REASON)[0]
            self.host.vcpu_stop(
                "crash",
                1,
                f"vcpu{self.index}: VM entry failed (hardware reason {hw:#x})\n" + self.describe_registers(),
            )
            return False
        if reason in (K.EXIT_INTR, K.EXIT_IRQ_WINDOW_OPEN):
            return True
        if reason == K.EXIT_DEBUG:
            hook = self.debug_hook
            if hook is not None:  # none: a step or breakpoint that outlived its debugger
                exception, pc, dr6, dr7 = _DEBUG.unpack_from(run, S.RUN_DEBUG_EXCEPTION)
                self._resume.clear()
                self.pause_requested = True  # all-stop: park here until the debugger resumes
                hook.debug_exit(self, exception, pc, dr6, dr7)
                self._park()
            return True
        name = K.EXIT_NAMES.get(reason, str(reason))
        self.host.vcpu_stop(
            "crash", 1, f"vcpu{self.index}: unhandled KVM exit {name}\n" + self.describe_registers()
        )
        return False

    def describe_registers(self) -> str:
        try:
            r = self.fd.get_regs()
            s = self.fd.get_sregs()
        except KvmError as exc:
            return f"  (registers unavailable: {exc})"
        g = [
            f"{n.upper()}={getattr(r, n):016x}"
            for n in (
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            )
        ]
        lines = ["  " + " ".join(g[i : i + 4]) for i in range(0, len(g), 4)]
        lines.append(
            f"  CS={s.cs.selector:04x} base={s.cs.base:x} l={s.cs.l} db={s.cs.db} "
            f"dpl={s.cs.dpl}  SS={s.ss.selector:04x}  CR0={s.cr0:x} CR2={s.cr2:x} "
            f"CR3={s.cr3:x} CR4={s.cr4:x} EFER={s.efer:x}"
        )
        lines.append(
            f"  GDT={s.gdt.base:x}/{s.gdt.limit:x} IDT={s.idt.base:x}/{s.idt.limit:x} "
            f"APIC_BASE={s.apic_base:x}"
        )
        stack = self._stack_words(r.rsp, 24)
        if stack:
            lines.append("  stack: " + " ".join(f"{w:x}" for w in stack))
        return "\n".join(lines)

    def _stack_words(self, rsp: int, n: int) -> list[int]:
        """The first `n` qwords at the guest's RSP (through its page tables), for post-mortems."""
        memory = getattr(self.host, "memory", None)
        if memory is None:
            return []
        words = []
        try:
            for i in range(n):
                gpa = self.fd.translate(rsp + 8 * i)
                if gpa is None or not memory.contains(gpa, 8):
                    break
                words.append(memory.read_u64(gpa))
        except KvmError:
            pass
        return words


# what an ACPI S3 resume (a CPU reset) leaves
CR0_RESET = 0x6000_0010  # CD, NW, ET
CR0_PE = 1
_REAL_DATA = Segment(0, 0xFFFF, 0, 0x3, g=0)
_FLAT_CODE32 = Segment(0, 0xFFFF_FFFF, 0x10, 0xB, db=1)
_FLAT_DATA32 = Segment(0, 0xFFFF_FFFF, 0x18, 0x3, db=1)
_RESET_TR = Segment(0, 0xFFFF, 0, 0xB, s=0, g=0)  # busy 32-bit TSS
_RESET_LDT = Segment(0, 0xFFFF, 0, 0x2, s=0, g=0)
LAPIC_ID, LAPIC_VERSION = 0x20, 0x30
# LAPIC registers at reset (SDM 11.4.7.1) other than 0: DFR all ones, the spurious vector
# register 0xFF (software-disabled), every LVT masked
_LAPIC_RESET = {0xE0: 0xFFFF_FFFF, 0xF0: 0xFF} | {
    off: 0x1_0000 for off in range(0x2F0, 0x380, 0x10) if off != 0x300 and off != 0x310
}


def _apply_segment(dst: S.KvmSegment, seg: Segment) -> None:
    dst.base, dst.limit, dst.selector, dst.type = seg.base, seg.limit, seg.selector, seg.type
    dst.present, dst.dpl, dst.db, dst.s, dst.l, dst.g = seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g
    dst.avl, dst.unusable = 0, 0
