"""ACPI S3 on the real /dev/kvm: a guest suspends to RAM through the PM1 control register and
the host wakes it, as a PC resumes.

The guest (a Multiboot kernel in a few instructions, entered in 32-bit protected mode) copies
a tiny real-mode routine below 1 MiB, puts its address in the FACS's FIRMWARE_WAKING_VECTOR
(0x8010: CS 0x801, IP 0, so the CS:IP split shows) and writes SLP_TYP(S3) | SLP_EN. Nothing after
that write may run: it would report 0x7E. Woken, vCPU 0 must enter the routine in real mode with
CS = 0x801 and find WAK_STS set in PM1_STS; it reports through the exit port. Real mode is
emulated ring 0 on a PVM host: the guest is a few dozen instructions.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from support.asm import assemble_flat
from support.cli import corral, corral_popen, one_clear_line

from corral.arch.x86 import layout
from corral.arch.x86.acpi import machine_acpi_tables
from corral.config import MachineConfig
from corral.machine import Machine, VmStateError

LOAD = 0x100000
VECTOR = 0x8010
WOKE_OK, WOKE_BAD_CS, WOKE_NO_WAK_STS, RAN_ON = 0x42, 0x41, 0x43, 0x7E
MEMORY = 32 * layout.MiB


def s3_kernel(facs: int, vector: int) -> str:
    slp = (layout.S3_SLP_TYP << 10) | 0x2000
    return rf"""
    .code32
    .text
hdr:
    .long 0x1BADB002, 0x10000, -(0x1BADB002 + 0x10000)
    .long {LOAD:#x}, {LOAD:#x}, {LOAD:#x} + (end - hdr), {LOAD:#x} + (end - hdr), {LOAD:#x} + 32
    .org 32
    call 1f
1:  pop %esi
    add $(wake - 1b), %esi
    mov ${VECTOR:#x}, %edi
    mov $(wake_end - wake), %ecx
    cld
    rep movsb
    movl ${vector:#x}, {facs + 12:#x}   # FIRMWARE_WAKING_VECTOR
    mov ${layout.PM1_CNT_PORT:#x}, %dx
    mov ${slp:#x}, %ax
    out %ax, %dx                      # to sleep
    mov ${layout.DEBUG_EXIT_PORT:#x}, %dx
    mov ${RAN_ON:#x}, %al             # the vCPU ran on past the sleep
    out %al, %dx
2:  hlt
    jmp 2b

    .code16
wake:
    mov %cs, %ax
    mov ${WOKE_BAD_CS:#x}, %bl
    cmp ${VECTOR >> 4:#x}, %ax
    jne 3f
    mov ${layout.PM1_EVT_PORT:#x}, %dx
    in %dx, %ax                       # PM1_STS
    mov ${WOKE_NO_WAK_STS:#x}, %bl
    test $0x8000, %ax
    jz 3f
    mov ${WOKE_OK:#x}, %bl
3:  mov %bl, %al
    mov ${layout.DEBUG_EXIT_PORT:#x}, %dx
    out %al, %dx
4:  hlt
    jmp 4b
wake_end:
    .code32
end:
"""


def facs_addr(cpus: int) -> int:
    return next(a for a, d in machine_acpi_tables(cpus, MEMORY).blobs if d[:4] == b"FACS")


def boot_to_sleep(tmp_path, vector: int, cpus: int = 2) -> Machine:
    kernel = assemble_flat(s3_kernel(facs_addr(cpus), vector), tmp_path, "s3.elf")
    m = Machine(MachineConfig.build(kernel=kernel, memory="32M", cpus=cpus), console=lambda b: None)
    m.start()
    deadline = time.monotonic() + 30
    while not m.suspended:
        assert m.wait(0.05) is None, f"the guest stopped instead of suspending: {m.wait(0)}"
        assert time.monotonic() < deadline, "the guest did not suspend within 30 s"
    return m


def test_guest_suspends_to_ram_and_wakes_at_the_real_mode_vector(tmp_path):
    m = boot_to_sleep(tmp_path, VECTOR)
    try:
        assert m.status().state == "suspended"
        # asleep: nothing runs, and a pause/resume from the host does not wake it
        m.pause()
        m.resume()
        assert m.wait(0.3) is None and m.suspended
        assert all(v.parked.is_set() for v in m.vcpus)
        m.wake()
        assert not m.suspended
        # the AP waits for the OS's INIT/SIPI, as after a reset
        assert m.vcpus[1].mp_state_name() == "wait-for-SIPI"
        r = m.wait(30)
        assert r is not None, "the woken guest did not report"
        assert (r.kind, r.status) == ("exit", WOKE_OK), hex(r.status)
        with pytest.raises(VmStateError, match="not suspended"):
            m.wake()
    finally:
        m.close()


def test_wake_without_a_waking_vector_fails_and_the_guest_sleeps_on(tmp_path):
    m = boot_to_sleep(tmp_path, 0, cpus=1)
    try:
        with pytest.raises(VmStateError, match="set no waking vector.*stays suspended"):
            m.wake()
        assert m.suspended and m.status().state == "suspended"
        assert m.wait(0.3) is None
    finally:
        m.close()


def test_wake_from_the_command_line_and_the_api(tmp_path):
    """`corral run --api`, the guest sleeps (`corral status` says so), curl's PUT /corral/wake
    on a running guest is refused with one line, `corral wake` wakes it, and it exits 0x42."""
    kernel = assemble_flat(s3_kernel(facs_addr(1), VECTOR), tmp_path, "s3.elf")
    api = tmp_path / "vm.sock"
    proc = corral_popen("run", "--kernel", str(kernel), "--memory", "32M", "--api", str(api))
    try:
        deadline = time.monotonic() + 30
        while not (api.exists() and corral("status", "--api", str(api)).stdout.startswith("suspended")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.1)
        assert corral("wake", "--api", str(api)).returncode == 0
        assert proc.wait(30) == WOKE_OK
    finally:
        proc.kill()
        proc.wait()


def test_wake_refused_when_the_guest_is_awake(tmp_path):
    kernel = assemble_flat(s3_kernel(facs_addr(1), VECTOR).replace("out %ax, %dx", "jmp 2f"), tmp_path, "k")
    api = tmp_path / "vm.sock"
    proc = corral_popen("run", "--kernel", str(kernel), "--memory", "32M", "--api", str(api))
    try:
        deadline = time.monotonic() + 30
        while not api.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        line = one_clear_line(corral("wake", "--api", str(api)))
        assert "not suspended" in line
        r = subprocess.run(
            ["curl", "-s", "--unix-socket", str(api), "-X", "PUT", "http://localhost/corral/wake"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "not suspended to RAM" in json.loads(r.stdout)["fault_message"]
        assert corral("status", "--api", str(api)).stdout.startswith("running")
    finally:
        proc.kill()
        proc.wait()
