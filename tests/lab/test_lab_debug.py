"""Debugging Debian's unmodified kernel in the lab (real SVM KVM): gdb against the running guest,
a dump read back with gdb, KVM's halt and interrupt counters, and a hardware breakpoint on a
syscall entry.

The lab's SVM is QEMU TCG's, and what reaches KVM through it depends on that QEMU's version:
- Hardware breakpoints (gdb `hbreak`, KVM_GUESTDBG_USE_HW_BP): bookworm's QEMU 7.2 loads the
  nested guest's DR7 from the VMCB in helper_vmrun (target/i386/tcg/sysemu/svm_helper.c) by
  assignment, not through cpu_x86_update_dr7, so TCG's breakpoint list never holds the
  breakpoints KVM arms for its guest: an hbreak on a syscall entry never fired (uname ran through
  it). QEMU 9.1 fixed it ("target/i386: disable/enable breakpoints on vmentry/vmexit",
  8aa76496dfaa). The hbreak test below therefore runs on `lab_new`, the lab on bookworm-backports'
  QEMU 10.0 (tests/support/lab_qemu.py).
- Software breakpoints (gdb `break`, int3 with KVM_GUESTDBG_USE_SW_BP): TCG raises an INT3 as a
  software interrupt and raise_interrupt2 (target/i386/tcg/excp_helper.c) checks it against the
  INTn (SWINT) intercept only, never against the #BP exception intercept KVM sets, so the int3
  reaches the guest kernel ("int3: 0000 [#1]" in __x64_sys_newuname, then a panic): under QEMU
  7.2 and still under 10.0.2 (measured 2026-11-30). No lab test for them; the probe tests on PVM
  cover software breakpoints in ring-0 code.
"""

from __future__ import annotations

import json
import re

import pytest
from support.gdb_remote import BREAK_SYMBOL
from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL, PYTHON, REPO

pytestmark = pytest.mark.lab


def _lab_session(host, debian_build, tag: str, mode: str = "", kinds: str = "") -> dict:
    """One Debian guest under corral --gdb in the lab (support/gdb_remote.py's session for
    `mode`), judged here from the JSON line it prints after `tag`."""
    images = need(debian_build)
    res = host.run(
        f"{PYTHON} -m support.gdb_remote {mode} {CORRAL} {images['bzimage']} {images['initrd']} "
        f"'{BASE_CMDLINE}' '{LAB_CPU}' {kinds}",
        cwd=str(REPO / "tests"),
        timeout=600,
    )
    m = re.search(rf"^{tag} (.*)$", res.output, re.M)
    assert m, res.output
    out = json.loads(m.group(1))
    assert "error" not in out, f"{out['error']}\n--- console ---\n{out['console']}\n{out}"
    assert BANNER in out["console"], out["console"]
    return out


@pytest.fixture(scope="module")
def session(lab, debian_build):
    return _lab_session(lab, debian_build, "DEBUGLAB_JSON")


def test_gdb_stops_the_guest_and_reads_linux_banner(session):
    live = session["gdb_live"]
    syms = session["symbols"]
    # linux_banner at its /proc/kallsyms address (KASLR moved it), read through the page tables
    assert re.search(rf"{syms['linux_banner']}:\s+\"Linux version 6\.", live), live
    # stopped in the kernel (the guest idles there waiting for its console)
    pc = int(re.search(r"STOPPED_AT (0x[0-9a-f]+)", live).group(1), 16)
    assert pc >= 0xFFFFFFFF80000000, live
    # detached: the guest runs on, reads its console and runs uname
    release = re.search(r"Linux version (\S+)", live).group(1)
    assert re.search(rf"^{re.escape(release)}\s*$", session["console_after_uname"], re.M), session
    assert "GUEST_BYE" in session["console"], session["console"]
    assert session["status"] == 0, session["console"]


def test_dump_of_the_running_guest_shows_its_uts_name(session):
    assert session["dump_status"] == 0, session["dump"]
    core = session["gdb_core"]
    # linux_banner and init_uts_ns read from the core's physical memory by System.map-style
    # arithmetic (kallsyms address - _text + the physical start of "Kernel code")
    release = re.search(r"\"Linux version (\S+)", core).group(1)
    # whole strings only (gdb cuts the banner: `"..."...`): sysname, nodename (set by the guest's
    # /init at run time), release, version, machine
    strings = re.findall(r'^0x[0-9a-f]+:\s+"(.*)"$', core, re.M)
    assert strings[:3] == ["Linux", "corral", release], core
    assert strings[4] == "x86_64", core
    assert release in session["console_after_uname"], session["console_after_uname"]


def test_stats_count_halts_and_injected_interrupts(session):
    first, second = session["stats"]
    assert first["kvm_stats"] == "read", first
    v0, v1 = first["vcpus"][0], second["vcpus"][0]
    # with the in-kernel irqchip these never reach the VMM as exits: KVM counts them
    assert v0["kvm"]["halt_exits"] > 0 and v0["interrupts"] > 0, v0
    assert v0["halts"] == v0["kvm"]["halt_exits"], v0
    # an idle guest waits in HLT and is woken by its timer: both keep counting
    assert v1["halts"] > v0["halts"] and v1["interrupts"] > v0["interrupts"], (v0, v1)
    assert re.search(r"vcpu0: \d+ exits, \d+ halts, \d+ interrupts injected", session["stats_cli"]), session[
        "stats_cli"
    ]


@pytest.fixture(scope="module")
def break_session(lab_new, debian_build):
    return _lab_session(lab_new, debian_build, "BREAKLAB_JSON", "--breakpoints", "hbreak")


def test_hbreak_on_a_syscall_entry_stops_the_guest_there(break_session):
    (rnd,) = break_session["rounds"]
    addr = break_session["address"]
    gdb = rnd["gdb"]
    assert f"Hardware assisted breakpoint 1 at {addr}" in gdb, gdb
    # the guest's uname entered the kernel there and stopped: gdb saw the stop, at that pc
    assert re.search(rf"^Breakpoint 1, {addr} in", gdb, re.M), gdb
    assert f"HIT_AT {addr}" in gdb, gdb
    assert "GDB_TIMED_OUT" not in gdb, gdb
    # breakpoint deleted, gdb detached: the syscall completes and the guest runs to its end
    release = re.search(r"^corral debian guest: (\S+)", break_session["console"], re.M)
    after = rnd["console_after"].split("go1", 1)[-1]
    assert release and re.search(rf"^{re.escape(release.group(1))}\s*$", after, re.M), rnd["console_after"]
    assert BREAK_SYMBOL in break_session["console"], break_session["console"]
    assert "GUEST_BYE" in break_session["console"], break_session["console"]
    assert break_session["status"] == 0, break_session["console"]
