"""Guest memory dumps: an ELF64 core of a running or paused guest, as QEMU's dump-guest-memory
writes it, so gdb (with the guest's symbols) and `crash` (with a Linux vmlinux) open it.

Layout: the ELF header, one PT_NOTE, then one PT_LOAD per RAM range (guest-physical address in
p_paddr; p_vaddr the same, which is right for identity-mapped guests such as the probe and
ignored by `crash`, which reads p_paddr). The note holds, per vCPU, an NT_PRSTATUS "CORE" note
(x86-64 elf_prstatus with the vCPU's registers; pr_pid = vCPU index + 1, one gdb thread each)
and QEMU's "QEMU" note (QEMUCPUState: segments, descriptor tables, control registers).

The file is sparse: RAM that the guest never touched (holes in the memfd) or that reads all
zeros is not written, so the file's allocated size follows the guest's use, not its RAM size.
It is created 0600 with O_EXCL | O_NOFOLLOW: an existing file or a symlink is refused.
A running machine is paused while its registers and RAM are copied, then resumed.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from corral.errors import CorralError
from corral.files import Refused, create_new
from corral.kvm import structs as S
from corral.kvm.fds import KvmError

if TYPE_CHECKING:
    from corral.machine import Machine
    from corral.memory import GuestMemory
    from corral.vstate.vcpu import Vcpu

PAGE = 4096
CHUNK = 64 * 1024  # RAM is looked at (and skipped when all zero) in chunks this big

ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NOTE_HEADER = struct.Struct("<III")
ET_CORE, EM_X86_64, EV_CURRENT = 4, 62, 1
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
QEMU_NOTE_TYPE = 0
MSR_KERNEL_GS_BASE = 0xC0000102

# struct elf_prstatus (x86-64): pr_info (12) + pr_cursig (2) + pad, sigpend, sighold, pid, ppid,
# pgrp, sid, four timevals, then pr_reg (27 x u64: user_regs_struct), pr_fpvalid, pad = 336 bytes
PRSTATUS_SIZE = 336
PRSTATUS_PID = 32
PRSTATUS_REG = 112
USER_REGS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs"
).split()
# QEMUCPUState (version 1): gprs, rip, rflags, 10 segments of (selector, limit, flags, pad,
# base), cr0-cr4, kernel_gs_base
QEMU_SEGMENT = struct.Struct("<IIIIQ")
QEMU_CPU_HEAD = struct.Struct("<II18Q")
QEMU_CPU_SIZE = QEMU_CPU_HEAD.size + 10 * QEMU_SEGMENT.size + 6 * 8


class DumpError(CorralError):
    """A guest memory dump cannot be written (the file exists, the machine is not built, ...)."""


class DumpStats(BaseModel):
    """What a dump wrote (the reply of PUT /corral/dump)."""

    path: str
    vcpus: int
    ram_bytes: int  # guest RAM covered by the core's PT_LOAD segments
    bytes_written: int  # RAM actually written: the rest are holes
    file_bytes: int  # the file's apparent size
    seconds: float


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return NOTE_HEADER.pack(len(n), len(desc), ntype) + pad(n) + pad(desc)


def prstatus(index: int, regs: S.KvmRegs, sregs: S.KvmSregs) -> bytes:
    """The NT_PRSTATUS descriptor of one vCPU (gdb shows it as thread `index + 1`)."""
    values = {name: getattr(regs, name, 0) for name in USER_REGS}
    values["eflags"] = regs.rflags
    values["orig_rax"] = (1 << 64) - 1  # -1: not in a system call
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        values[seg] = getattr(sregs, seg).selector
    values["fs_base"], values["gs_base"] = sregs.fs.base, sregs.gs.base
    out = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<i", out, PRSTATUS_PID, index + 1)
    struct.pack_into(f"<{len(USER_REGS)}Q", out, PRSTATUS_REG, *(values[n] for n in USER_REGS))
    return bytes(out)


def _segment_flags(seg: S.KvmSegment) -> int:
    """A KVM segment's attributes as the descriptor's high dword (QEMU's SegmentCache.flags)."""
    return (
        (seg.type << 8)
        | (seg.s << 12)
        | (seg.dpl << 13)
        | (seg.present << 15)
        | (seg.avl << 20)
        | (seg.l << 21)
        | (seg.db << 22)
        | (seg.g << 23)
    )


def qemu_cpu_state(regs: S.KvmRegs, sregs: S.KvmSregs, kernel_gs_base: int) -> bytes:
    """QEMU's per-CPU note (QEMUCPUState, version 1), which `crash` and QEMU's tools read."""
    gprs = [getattr(regs, n) for n in "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15".split()]
    out = bytearray(QEMU_CPU_HEAD.pack(1, QEMU_CPU_SIZE, *gprs, regs.rip, regs.rflags))
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr"):
        s = getattr(sregs, name)
        out += QEMU_SEGMENT.pack(s.selector, s.limit, _segment_flags(s), 0, s.base)
    for table in (sregs.gdt, sregs.idt):
        out += QEMU_SEGMENT.pack(0, table.limit, 0, 0, table.base)
    out += struct.pack("<6Q", sregs.cr0, 0, sregs.cr2, sregs.cr3, sregs.cr4, kernel_gs_base)
    return bytes(out)


def vcpu_notes(vcpu: Vcpu) -> tuple[bytes, bytes]:
    """(NT_PRSTATUS note, QEMU note) of a vCPU that is not running."""
    try:
        regs, sregs = vcpu.fd.get_regs(), vcpu.fd.get_sregs()
    except KvmError as exc:
        raise DumpError(f"cannot read vcpu{vcpu.index}'s registers for the dump: {exc}") from None
    try:
        kgs = vcpu.fd.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE, 0)
    except KvmError:
        kgs = 0
    return (
        _note(b"CORE", NT_PRSTATUS, prstatus(vcpu.index, regs, sregs)),
        _note(b"QEMU", QEMU_NOTE_TYPE, qemu_cpu_state(regs, sregs, kgs)),
    )


def _chunks(memory: GuestMemory) -> Iterator[tuple[int, memoryview]]:
    """(backing offset, data) of every non-zero chunk of RAM (holes are not even read)."""
    yield from memory.populated(CHUNK)


def write_core(path: str | os.PathLike[str], memory: GuestMemory, notes: list[bytes]) -> tuple[int, int]:
    """Write the core to `path` (new file); returns (RAM bytes written, file size)."""
    slots = memory.slots
    note = b"".join(notes)
    phnum = 1 + len(slots)
    note_off = ELF_HEADER.size + phnum * PHDR.size
    data_off = (note_off + len(note) + PAGE - 1) & ~(PAGE - 1)
    # each slot's bytes lie in the file at data_off + (its backing offset): backing offsets of
    # consecutive slots are consecutive, so the file mirrors the memfd after the headers
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT, 0]) + bytes(8)
    head = ELF_HEADER.pack(
        ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, ELF_HEADER.size, 0, 0,
        ELF_HEADER.size, PHDR.size, phnum, 64, 0, 0,
    )  # fmt: skip
    phdrs = [PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(note), 0, 0)]
    for s in slots:
        phdrs.append(
            PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, data_off + s.offset, s.gpa, s.gpa, s.size, s.size, PAGE)
        )
    size = data_off + memory.size
    try:
        fd = create_new(path, "dump")
    except Refused as exc:
        raise DumpError(str(exc)) from None
    written = 0
    try:
        os.ftruncate(fd, size)  # the whole file a hole; only populated RAM is written
        os.pwrite(fd, head + b"".join(phdrs) + note, 0)
        for off, data in _chunks(memory):
            pos = data_off + off
            while data:
                n = os.pwrite(fd, data, pos)
                data, pos, written = data[n:], pos + n, written + n
    except OSError as exc:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise DumpError(f"cannot write the dump {path}: {exc.strerror}") from None
    os.close(fd)
    return written, size


def dump_core(machine: Machine, path: str | os.PathLike[str]) -> DumpStats:
    """Write an ELF core of `machine`'s guest to `path` (a new file). A running guest is paused
    for the copy and resumed; a paused or stopped one (all vCPUs out of KVM_RUN) is left so."""
    t0 = time.monotonic()
    with machine.exclusive():
        if machine.vm is None or machine.memory is None or not machine.vcpus:
            raise DumpError("the machine is not built: there is no guest to dump")
        running = any(v.thread is not None and v.thread.is_alive() for v in machine.vcpus)
        pause = running and not machine.paused
        if pause:
            machine.pause()
        try:
            notes = [n for v in machine.vcpus for n in vcpu_notes(v)]
            # the NT_PRSTATUS notes first, in vCPU order (gdb's thread 1 is vcpu0), then QEMU's
            notes = notes[0::2] + notes[1::2]
            written, size = write_core(path, machine.memory, notes)
        finally:
            if pause:
                machine.resume()
        return DumpStats(
            path=str(Path(path).absolute()),
            vcpus=len(machine.vcpus),
            ram_bytes=machine.memory.size,
            bytes_written=written,
            file_bytes=size,
            seconds=time.monotonic() - t0,
        )


__all__ = ["DumpError", "DumpStats", "dump_core", "prstatus", "qemu_cpu_state", "write_core"]
