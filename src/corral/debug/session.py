"""One debugger's session with the gdb stub: the packet loop, registers, memory, threads,
breakpoints and watchpoints, resume and stop (all-stop), detach and kill, monitor commands.

corral.debug.stub listens and hands each accepted connection to a Session; see its docstring
for what works where (PVM hosts especially).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.debug import x86
from corral.debug.packets import MAX_PACKET, Event, PacketReader, frame, unescape
from corral.errors import CorralError
from corral.kvm import constants as K

if TYPE_CHECKING:
    from corral.machine import Machine
    from corral.vstate.vcpu import DebugHook, Vcpu

log = logging.getLogger(__name__)

PAGE = 4096
MAX_MEMORY = MAX_PACKET // 2 - 16  # bytes per 'm' reply (hex doubles them)
STEP_OVER_TIMEOUT = 2.0  # seconds a step over a breakpoint may take
MAX_XP = 4096  # bytes per `monitor xp`
SIGINT, SIGTRAP = 2, 5
# debug-register lengths (DR7 LEN field) and access kinds (RW field) by gdb's Z type
_DR_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_DR_RW = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}  # exec, write, read (x86: read/write), access
_WATCH_NAMES = {2: "watch", 3: "rwatch", 4: "awatch"}
PVM_SW_BREAK = (
    "E.software breakpoints do not work on this PVM host (/dev/kvm without VT-x/AMD-V: a guest "
    "int3 goes to the guest, not to the debugger): use hbreak, or a host with hardware "
    "virtualization"
)
PVM_RING3_STEP = (
    "corral: single-stepping ring-3 guest code does not work on this PVM host (/dev/kvm without "
    "VT-x/AMD-V: the step trap goes to the guest); the guest did not move: continue instead, or "
    "use a host with hardware virtualization\n"
)
PVM_HW_WARNING = (
    "corral: on this PVM host, hardware breakpoints and watchpoints catch only ring-0 guest "
    "code (ring 3 runs natively without the debug registers)\n"
)


@dataclass
class _Stop:
    """Why the guest stopped, as a T packet says it."""

    vcpu: int
    signal: int = SIGTRAP
    reason: str = ""  # "swbreak:;", "hwbreak:;", "watch:ADDR;" ...

    def packet(self) -> bytes:
        return b"T%02xthread:%x;%s" % (self.signal, self.vcpu + 1, self.reason.encode())


@dataclass
class HwPoint:
    kind: int  # gdb's Z type: 1 exec, 2 write, 3 read, 4 access
    addr: int
    length: int


class Session:
    """One debugger's connection: the packet loop and the breakpoints it set."""

    def __init__(
        self, machine: Machine, conn: socket.socket, *, hook: DebugHook, pvm: bool, was_paused: bool
    ) -> None:
        self.machine = machine
        self.conn = conn
        self.hook = hook  # told of the vCPUs' debug exits (the stub, which forwards to `events`)
        self.pvm = pvm
        self.reader = PacketReader()
        self.events: queue.SimpleQueue[tuple[int, int, int, int]] = queue.SimpleQueue()
        self.ack = True
        self.last_sent = b""
        self.running = False
        self.g_vcpu = 0  # the thread for registers and memory (Hg)
        self.stop = _Stop(0)
        self.sw_points: dict[int, tuple[int, int]] = {}  # gva -> (gpa, original byte)
        self.hw_points: list[HwPoint] = []
        self.closed = False
        self.warned = False
        self.was_paused = was_paused  # detach leaves a machine paused if it was so before
        self.handlers: dict[str, Callable[[bytes], bytes | None]] = {
            "?": lambda _a: self.stop.packet(),
            "g": self._read_registers,
            "G": self._write_registers,
            "p": self._read_register,
            "P": self._write_register,
            "m": self._read_memory,
            "M": self._write_memory,
            "X": self._write_memory_binary,
            "H": self._set_thread,
            "T": self._thread_alive,
            "Z": self._insert_point,
            "z": self._remove_point,
        }

    # -- connection plumbing --------------------------------------------------------------------
    def send(self, payload: bytes) -> None:
        self.last_sent = frame(payload)
        self.conn.sendall(self.last_sent)

    def close(self) -> None:
        self.closed = True
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def vcpus(self) -> list[Vcpu]:
        return self.machine.vcpus

    def vcpu(self, index: int | None = None) -> Vcpu:
        vcpus = self.vcpus()
        i = self.g_vcpu if index is None else index
        if not 0 <= i < len(vcpus):
            raise CorralError(f"no vCPU {i}: the machine has {len(vcpus)}")
        return vcpus[i]

    def run(self) -> None:
        log.info("gdb: debugger attached")
        self.halt()
        self.stop = _Stop(0, SIGTRAP)
        pending: list[Event] = []
        while not self.closed:
            if self.running:
                self._watch_running(pending)
                continue
            if pending:
                self._handle(pending.pop(0))
                continue
            ready, _, _ = select.select([self.conn], [], [], 0.2)
            if not ready:
                if self._machine_ended():
                    return
                continue
            data = self._recv()
            if data is None:
                return
            pending += self.reader.feed(data)

    def _recv(self) -> bytes | None:
        try:
            data = self.conn.recv(65536)
        except OSError:
            return None
        return data or None

    def _machine_ended(self) -> bool:
        return self.machine.wait(0) is not None or not self.machine.vcpus

    def _watch_running(self, pending: list[Event]) -> None:
        """While the guest runs: a debug exit, Ctrl-C or the guest's end stop it."""
        try:
            index, exception, pc, dr6 = self.events.get(timeout=0.05)
        except queue.Empty:
            pass
        else:
            self.halt()
            self.running = False
            self.g_vcpu = index
            self.stop = self._classify(index, exception, pc, dr6)
            self.send(self.stop.packet())
            return
        result = self.machine.wait(0)
        if result is not None or not self.machine.vcpus:
            status = result.status if result is not None else 0
            self.send(b"W%02x" % (status & 0xFF))
            self.running = False
            self.closed = True
            return
        ready, _, _ = select.select([self.conn], [], [], 0)
        if not ready:
            return
        data = self._recv()
        if data is None:
            self.closed = True
            return
        for ev in self.reader.feed(data):
            ctrl_c = ev.kind == "packet" and ev.data == b"vCtrlC"
            if self.running and (ev.kind == "interrupt" or ctrl_c):
                if ctrl_c:
                    self.conn.sendall(b"+" if self.ack else b"")
                    self.send(b"OK")
                self.halt()
                self.running = False
                self.stop = _Stop(self.g_vcpu, SIGINT)
                self.send(self.stop.packet())
            elif ev.kind in ("packet", "bad", "nak"):
                pending.append(ev)  # answered once the guest stops

    def _classify(self, index: int, exception: int, pc: int, dr6: int) -> _Stop:
        if exception == 3:
            # swbreak: the PC is the int3's own address (gdb must not wind it back); should a
            # KVM ever report the address after it, put the vCPU back on the breakpoint
            regs = self.vcpu(index).fd.get_regs()
            if regs.rip not in self.sw_points and regs.rip - 1 in self.sw_points:
                regs.rip -= 1
                self.vcpu(index).fd.set_regs(regs)
            return _Stop(index, SIGTRAP, "swbreak:;")
        for slot, point in enumerate(self.hw_points):
            if dr6 >> slot & 1:
                if point.kind == 1:
                    return _Stop(index, SIGTRAP, "hwbreak:;")
                return _Stop(index, SIGTRAP, f"{_WATCH_NAMES[point.kind]}:{point.addr:x};")
        return _Stop(index, SIGTRAP)  # a single step (DR6.BS)

    def _handle(self, ev: Event) -> None:
        if ev.kind == "nak":
            if self.ack and self.last_sent:  # no-ack mode has no naks: a stray '-' is noise
                self.conn.sendall(self.last_sent)
            return
        if ev.kind == "bad":
            if self.ack:
                self.conn.sendall(b"-")
            log.info("gdb: dropped a malformed packet (%s)", ev.data.decode(errors="replace"))
            return
        if ev.kind != "packet":
            return  # acks; Ctrl-C while stopped means nothing
        if self.ack:
            self.conn.sendall(b"+")
        try:
            reply = self._dispatch(ev.data)
        except (ValueError, IndexError, KeyError) as exc:
            log.info("gdb: bad packet %r: %s", ev.data[:40], exc)
            reply = b"E22"
        except CorralError as exc:
            log.info("gdb: %r failed: %s", ev.data[:40], exc)
            reply = b"E14"
        except OSError as exc:
            log.info("gdb: %r failed: %s", ev.data[:40], exc)
            reply = b"E05"
        if reply is not None:
            self.send(reply)

    # -- packets ------------------------------------------------------------------------------
    def _dispatch(self, pkt: bytes) -> bytes | None:
        head = pkt[:1].decode("latin-1")
        arg = pkt[1:]
        if not head:
            return b""
        if head in self.handlers:
            return self.handlers[head](arg)
        if head in "cCsS":
            return self._resume(step=head in "sS", vcpu=None)
        if head == "v":
            return self._v_packet(pkt)
        if head == "q":
            return self._query(pkt)
        if pkt == b"QStartNoAckMode":
            self.send(b"OK")
            self.ack = False
            return None
        if head == "D":
            self.send(b"OK")
            self.detach()
            return None
        if head == "k":
            self.kill()
            return None
        return b""  # not supported

    def _query(self, pkt: bytes) -> bytes:
        if pkt.startswith(b"qSupported"):
            return (
                b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;vContSupported+"
                % MAX_PACKET
            )
        if pkt.startswith(b"qXfer:features:read:"):
            annex, _, span = pkt[len(b"qXfer:features:read:") :].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            off_s, _, len_s = span.partition(b",")
            off, length = _hex(off_s), min(_hex(len_s), MAX_PACKET - 16)
            xml = x86.target_xml()
            chunk = xml[off : off + length]
            return (b"l" if off + length >= len(xml) else b"m") + chunk
        if pkt == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (v.index + 1) for v in self.vcpus())
        if pkt == b"qsThreadInfo":
            return b"l"
        if pkt == b"qC":
            return b"QC%x" % (self.g_vcpu + 1)
        if pkt.startswith(b"qAttached"):
            return b"1"
        if pkt.startswith(b"qThreadExtraInfo,"):
            tid = _thread(pkt.split(b",", 1)[1])
            v = self.vcpu(tid - 1 if tid > 0 else self.g_vcpu)
            return f"vCPU {v.index} ({v.mp_state_name()})".encode().hex().encode()
        if pkt.startswith(b"qRcmd,"):
            command = bytes.fromhex(pkt[6:].decode()).decode(errors="replace")
            return self._monitor(command).encode().hex().encode()
        if pkt == b"qSymbol::":
            return b"OK"
        return b""

    def _v_packet(self, pkt: bytes) -> bytes | None:
        if pkt == b"vCont?":
            return b"vCont;c;C;s;S"
        if pkt.startswith(b"vCont;"):
            step_vcpu = None
            for action in pkt[6:].split(b";"):
                verb, _, tid = action.partition(b":")
                if verb[:1] in (b"s", b"S"):
                    t = _thread(tid) if tid else None
                    step_vcpu = self.g_vcpu if t in (None, -1, 0) else t - 1
                    break
            return self._resume(step=step_vcpu is not None, vcpu=step_vcpu)
        if pkt == b"vCtrlC":
            return b"OK"  # already stopped
        if pkt.startswith(b"vKill"):
            self.send(b"OK")
            self.kill()
            return None
        if pkt == b"vMustReplyEmpty":
            return b""
        return b""

    # -- registers ----------------------------------------------------------------------------
    def _registers(self) -> x86.RegisterFile:
        fd = self.vcpu().fd
        return x86.RegisterFile(fd.get_regs(), fd.get_sregs(), fd.get_fpu())

    def _store(self, rf: x86.RegisterFile, changed: set[str]) -> None:
        fd = self.vcpu().fd
        if "regs" in changed:
            fd.set_regs(rf.regs)
        if "sregs" in changed:
            fd.set_sregs(rf.sregs)
        if "fpu" in changed:
            fd.set_fpu(rf.fpu)

    def _read_registers(self, _arg: bytes) -> bytes:
        return self._registers().all().hex().encode()

    def _write_registers(self, arg: bytes) -> bytes:
        data = bytes.fromhex(arg.decode())
        if len(data) != x86.G_SIZE:
            return b"E22"
        rf, changed, off = self._registers(), set(), 0
        for num, reg in enumerate(x86.REGS):
            chunk = data[off : off + reg.size]
            off += reg.size
            if chunk != rf.get(num):
                changed.add(rf.set(num, chunk))
        self._store(rf, changed)
        return b"OK"

    def _read_register(self, arg: bytes) -> bytes:
        num = _hex(arg)
        if not 0 <= num < len(x86.REGS):
            return b"E45"
        return self._registers().get(num).hex().encode()

    def _write_register(self, arg: bytes) -> bytes:
        num_s, _, value = arg.partition(b"=")
        num = _hex(num_s)
        if not 0 <= num < len(x86.REGS):
            return b"E45"
        rf = self._registers()
        self._store(rf, {rf.set(num, bytes.fromhex(value.decode()))})
        return b"OK"

    # -- memory -------------------------------------------------------------------------------
    def _gpa(self, gva: int) -> int | None:
        gpa = self.vcpu().fd.translate(gva)
        memory = self.machine.memory
        if gpa is None or memory is None or not memory.contains(gpa):
            return None
        return gpa

    def read_virtual(self, gva: int, length: int) -> bytes:
        """Up to `length` bytes at guest-virtual `gva`, stopping at the first unmapped page."""
        memory = self.machine.memory
        out = bytearray()
        while len(out) < length and memory is not None:
            addr = (gva + len(out)) & 0xFFFF_FFFF_FFFF_FFFF
            n = min(length - len(out), PAGE - (addr & (PAGE - 1)))
            gpa = self._gpa(addr)
            if gpa is None or not memory.contains(gpa, n):
                break
            out += memory.read(gpa, n)
        for bp, (_gpa, original) in self.sw_points.items():
            if gva <= bp < gva + len(out):
                out[bp - gva] = original  # the debugger sees the guest's own bytes
        return bytes(out)

    def write_virtual(self, gva: int, data: bytes) -> bool:
        """Write all of `data` or nothing (every page is translated first)."""
        memory = self.machine.memory
        if memory is None:
            return False
        pieces, done = [], 0
        while done < len(data):
            addr = gva + done
            n = min(len(data) - done, PAGE - (addr & (PAGE - 1)))
            gpa = self._gpa(addr)
            if gpa is None or not memory.contains(gpa, n):
                return False
            pieces.append((gpa, data[done : done + n]))
            done += n
        buf = bytearray(data)
        for bp, (bp_gpa, _original) in list(self.sw_points.items()):
            if gva <= bp < gva + len(data):  # keep the int3; the new byte is the original now
                self.sw_points[bp] = (bp_gpa, buf[bp - gva])
        for gpa, chunk in pieces:
            memory.write(gpa, chunk)
        for bp, (bp_gpa, _original) in self.sw_points.items():
            if gva <= bp < gva + len(data):
                memory.write(bp_gpa, b"\xcc")
        return True

    def _read_memory(self, arg: bytes) -> bytes:
        addr_s, _, len_s = arg.partition(b",")
        addr, length = _hex(addr_s), _hex(len_s)
        if length == 0:
            return b""
        data = self.read_virtual(addr, min(length, MAX_MEMORY))
        return data.hex().encode() if data else b"E14"

    def _write_memory(self, arg: bytes) -> bytes:
        head, _, hexdata = arg.partition(b":")
        addr_s, _, len_s = head.partition(b",")
        data = bytes.fromhex(hexdata.decode())
        if len(data) != _hex(len_s):
            return b"E22"
        return b"OK" if self.write_virtual(_hex(addr_s), data) else b"E14"

    def _write_memory_binary(self, arg: bytes) -> bytes:
        head, sep, raw = arg.partition(b":")
        addr_s, _, len_s = head.partition(b",")
        if not sep:
            return b"E22"
        data = unescape(raw)
        if len(data) != _hex(len_s):
            return b"E22"
        return b"OK" if not data or self.write_virtual(_hex(addr_s), data) else b"E14"

    # -- threads ------------------------------------------------------------------------------
    def _set_thread(self, arg: bytes) -> bytes:
        op, tid = arg[:1], _thread(arg[1:])
        if tid in (0, -1):
            return b"OK"  # any / all: keep the current one
        if not 1 <= tid <= len(self.vcpus()):
            return b"E22"
        if op == b"g":
            self.g_vcpu = tid - 1
        return b"OK"

    def _thread_alive(self, arg: bytes) -> bytes:
        return b"OK" if 1 <= _thread(arg) <= len(self.vcpus()) else b"E22"

    # -- breakpoints and watchpoints ------------------------------------------------------------
    def _insert_point(self, arg: bytes) -> bytes:
        kind, addr, length = _point(arg)
        if kind == 0:
            if self.pvm:
                log.warning("gdb: %s", PVM_SW_BREAK[2:])
                return PVM_SW_BREAK.encode()
            if addr in self.sw_points:
                return b"OK"
            gpa = self._gpa(addr)
            memory = self.machine.memory
            if gpa is None or memory is None:
                return b"E14"
            self.sw_points[addr] = (gpa, memory.read(gpa, 1)[0])
            memory.write(gpa, b"\xcc")
            return b"OK"
        if not 1 <= kind <= 4:
            return b""
        if kind != 1 and (length not in _DR_LEN or addr % length):
            return b"E.x86 debug registers watch 1, 2, 4 or 8 aligned bytes"
        if any(p.kind == kind and p.addr == addr and p.length == length for p in self.hw_points):
            return b"OK"
        if len(self.hw_points) >= 4:
            return b"E.all four x86 debug registers are in use"
        self.hw_points.append(HwPoint(kind, addr, length))
        return b"OK"

    def _remove_point(self, arg: bytes) -> bytes:
        kind, addr, length = _point(arg)
        if kind == 0:
            entry = self.sw_points.pop(addr, None)
            if entry is not None and self.machine.memory is not None:
                self.machine.memory.write(entry[0], bytes((entry[1],)))
            return b"OK"
        self.hw_points = [
            p for p in self.hw_points if not (p.kind == kind and p.addr == addr and p.length == length)
        ]
        return b"OK"

    def _apply_debug(self, step_vcpu: int | None) -> None:
        base = 0
        if self.sw_points:
            base |= K.GUESTDBG_ENABLE | K.GUESTDBG_USE_SW_BP
        if self.hw_points:
            base |= K.GUESTDBG_ENABLE | K.GUESTDBG_USE_HW_BP
        dregs = debug_registers(self.hw_points)
        for v in self.vcpus():
            v.debug_hook = self.hook
            control = base
            if v.index == step_vcpu:
                control |= K.GUESTDBG_ENABLE | K.GUESTDBG_SINGLESTEP
            v.set_guest_debug(control, dregs if control & K.GUESTDBG_USE_HW_BP else None)

    # -- running, stopping, leaving ---------------------------------------------------------------
    def halt(self) -> None:
        """Stop the whole machine (all-stop) unless it is stopped already."""
        if not self.machine.paused and self.machine.vm is not None:
            self.machine.pause()

    def _resume(self, *, step: bool, vcpu: int | None) -> bytes | None:
        step_vcpu = (self.g_vcpu if vcpu is None else vcpu) if step else None
        if step_vcpu is not None and self.pvm:
            if self.vcpu(step_vcpu).fd.get_sregs().cs.dpl == 3:
                # the reply to a step is a stop: say why on gdb's console, then stop in place
                log.warning("gdb: %s", PVM_RING3_STEP.strip().removeprefix("corral: "))
                self.send(b"O" + PVM_RING3_STEP.encode().hex().encode())
                self.stop = _Stop(step_vcpu, SIGTRAP)
                return self.stop.packet()
        stepped = [v.index for v in self.vcpus() if self._step_over_breakpoint(v)]
        if step_vcpu in stepped:  # that step was the one asked for
            self.stop = _Stop(step_vcpu, SIGTRAP)
            return self.stop.packet()
        self._apply_debug(step_vcpu)
        if self.hw_points and self.pvm and not self.warned:
            self.warned = True  # once per session: gdb prints it on its console
            self.send(b"O" + PVM_HW_WARNING.encode().hex().encode())
        while not self.events.empty():  # exits that raced a Ctrl-C: stale now
            self.events.get_nowait()
        self.running = True
        self.machine.resume()
        return None

    def _step_over_breakpoint(self, v: Vcpu) -> bool:
        """A vCPU parked on one of our int3s runs the guest's own instruction there first: the
        byte restored, one step of that vCPU alone (the machine stays paused), the int3 back.
        Returns whether it stepped."""
        memory = self.machine.memory
        if not self.sw_points or memory is None or v.thread is None:
            return False
        hit = self.sw_points.get(v.fd.get_regs().rip)
        if hit is None:
            return False
        gpa, original = hit
        memory.write(gpa, bytes((original,)))
        try:
            self._apply_debug(v.index)
            while not self.events.empty():
                self.events.get_nowait()
            v.resume()
            try:
                self.events.get(timeout=STEP_OVER_TIMEOUT)
            except queue.Empty:  # halted, or waiting for an interrupt the paused machine holds
                v.request_pause()
                v.parked.wait(STEP_OVER_TIMEOUT)
            else:
                v.parked.wait(STEP_OVER_TIMEOUT)
        finally:
            memory.write(gpa, b"\xcc")
        return True

    def cleanup(self) -> None:
        """Leave the guest as it was before the debugger came: no int3 left in its memory, no
        debug exits, and running (unless it was paused when the debugger attached)."""
        memory = self.machine.memory
        for gpa, original in self.sw_points.values():
            if memory is not None:
                try:
                    memory.write(gpa, bytes((original,)))
                except CorralError:
                    pass
        self.sw_points.clear()
        self.hw_points.clear()
        for v in self.vcpus():
            v.debug_hook = None
            try:
                v.set_guest_debug(0)
            except (CorralError, OSError, ValueError):
                pass  # a vCPU already torn down
        if not self.was_paused and self.machine.paused:
            self.machine.resume()
        try:
            self.conn.close()
        except OSError:
            pass
        log.info("gdb: debugger detached")

    def detach(self) -> None:
        self.closed = True

    def kill(self) -> None:
        self.closed = True
        self.was_paused = True  # nothing to resume
        self.machine.stop("killed from the debugger")

    # -- monitor commands ---------------------------------------------------------------------
    def _monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return MONITOR_HELP
        verb, args = words[0], words[1:]
        try:
            if verb == "xp":
                if len(args) != 2:
                    return "usage: monitor xp ADDR LEN (guest-physical; LEN up to 4096)\n"
                return self._xp(int(args[0], 0), int(args[1], 0))
            if verb in ("vcpus", "info") and (verb == "vcpus" or args[:1] == ["vcpus"]):
                return self._describe_vcpus()
            if verb == "pause":
                self.machine.pause()
                return "guest paused\n"
            if verb == "resume":
                self.machine.resume()
                return "guest running (gdb still shows it stopped: use continue to follow it)\n"
            if verb == "status":
                st = self.machine.status()
                return f"{st.state}, {st.cpus} vCPU(s), {st.memory >> 20} MiB\n"
            if verb == "snapshot":
                if len(args) != 1:
                    return "usage: monitor snapshot DIRECTORY\n"
                stats = self.machine.snapshot(args[0])
                return f"snapshot written to {args[0]}: {stats.model_dump_json()}\n"
        except ValueError as exc:
            return f"monitor {verb}: {exc}\n"
        except CorralError as exc:
            return f"monitor {verb}: {exc}\n"
        return f"unknown monitor command {verb!r}\n" + MONITOR_HELP

    def _xp(self, addr: int, length: int) -> str:
        memory = self.machine.memory
        if not 0 < length <= MAX_XP:
            return f"monitor xp: LEN must be 1 to {MAX_XP}\n"
        if memory is None or not memory.contains(addr, length):
            return f"monitor xp: {addr:#x}+{length:#x} is not guest RAM\n"
        data = memory.read(addr, length)
        return "".join(f"{addr + i:016x}: {data[i : i + 16].hex(' ')}\n" for i in range(0, len(data), 16))

    def _describe_vcpus(self) -> str:
        lines = []
        for v in self.vcpus():
            r, s = v.fd.get_regs(), v.fd.get_sregs()
            mode = "64-bit" if s.efer & 0x400 and s.cs.l else "32-bit" if s.cr0 & 1 else "real"
            lines.append(
                f"vCPU {v.index} (thread {v.index + 1}): {v.mp_state_name()}, {mode} ring "
                f"{s.cs.dpl}, rip={r.rip:#x} rsp={r.rsp:#x} cr3={s.cr3:#x}, {v.exits} exits\n"
            )
        return "".join(lines)


MONITOR_HELP = """corral monitor commands:
  xp ADDR LEN        hex dump of guest-physical memory (LEN up to 4096)
  info vcpus         each vCPU's run state, mode, rip, rsp, cr3 and exit count
  status             running or paused, vCPUs, memory
  pause | resume     pause or resume the machine (resume: gdb still shows it stopped)
  snapshot DIR       write a snapshot of the machine to a new directory DIR
"""


def debug_registers(points: list[HwPoint]) -> list[int]:
    """DR0-3 and DR7 (at index 7) for KVM_SET_GUEST_DEBUG: slot i holds points[i], enabled
    globally (G bit), with its access kind (RW) and length (LEN; 0 for execution)."""
    regs = [0] * 8
    dr7 = 0
    for slot, p in enumerate(points[:4]):
        regs[slot] = p.addr
        length = 0 if p.kind == 1 else _DR_LEN[p.length]
        dr7 |= (0b10 << (2 * slot)) | (_DR_RW[p.kind] << (16 + 4 * slot)) | (length << (18 + 4 * slot))
    regs[7] = dr7
    return regs


def _thread(text: bytes) -> int:
    """A thread id from gdb: hex, '-1' for all, '0' for any; 'pPID.TID' takes the TID."""
    if text.startswith(b"p"):
        text = text.split(b".", 1)[1] if b"." in text else b"-1"
    return -1 if text == b"-1" else _hex(text)


def _hex(text: bytes) -> int:
    """A number from gdb: plain hex digits, at most 64 bits (no sign, no 0x, no spaces)."""
    if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
        raise ValueError(f"{text[:20]!r} is not a hex number")
    return int(text, 16)


def _point(arg: bytes) -> tuple[int, int, int]:
    """type, address, kind/length of a Z or z packet ('1,ADDR,LEN' after the letter)."""
    fields = arg.split(b";", 1)[0].split(b",")
    if len(fields) != 3:
        raise ValueError("expected TYPE,ADDR,KIND")
    return _hex(fields[0]), _hex(fields[1]), _hex(fields[2])
