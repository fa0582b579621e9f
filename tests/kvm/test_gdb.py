"""The gdb stub against the probe guest on the real /dev/kvm: real gdb (`gdb -batch -nx`, the
probe's 64-bit ELF for symbols) and a raw socket for what gdb will not send (a bare Ctrl-C byte,
malformed packets, a second debugger).

The probe's `gdb [MS]` scenario turns in ring 3 calling gdb_tick() (which writes gdb_counter)
until gdb_release is set (or MS milliseconds pass), then prints `RESULT gdb_value=N
released=R`. On a PVM host, int3 and ring-3 steps cannot reach the debugger (see
corral.debug.stub): those tests skip there, and the refusals are tested instead.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from support.cli import corral, one_clear_line
from support.gdb_remote import GdbVm as Vm
from support.gdb_remote import RemoteClient, gdb_batch, wait_for
from support.results import parse_results

from corral import Machine, MachineConfig
from corral.debug import GdbStub
from corral.debug.x86 import G_SIZE
from corral.host import probe_host
from corral.images.probe import build_probe

PVM = probe_host().is_pvm
PVM_REASON = "this host's /dev/kvm is PVM: int3, ring-3 steps and ring-3 debug registers do not reach KVM"
pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


@pytest.fixture
def vms():
    started: list[Vm] = []

    def start(cmdline: str, *extra: str, **kw: str) -> Vm:
        vm = Vm(cmdline, *extra, **kw)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()


def gdb(vm: Vm, probe64: Path, *commands: str, timeout: float = 90) -> str:
    return gdb_batch(vm.target, probe64, *commands, timeout=timeout)


def test_gdb_reads_registers_and_a_variable_changes_it_and_detach_lets_the_guest_finish(
    vms, probe64, symbols, tmp_path
):
    vm = vms("gdb")
    snap = tmp_path / "snap"
    out = gdb(
        vm,
        probe64,
        "info registers rip cs cr0 efer",
        "print (long)gdb_value",
        "print (long)gdb_counter > 0",
        "set var *(long *)&gdb_value = 42",
        f"monitor xp {symbols['gdb_value']:#x} 8",
        "monitor info vcpus",
        f"monitor snapshot {snap}",
        "monitor status",
        "set var *(long *)&gdb_release = 1",
        "detach",
    )
    assert re.search(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+ <(scenario_gdb|gdb_tick)", out), out
    assert re.search(r"cs\s+0x23\s", out), out  # ring 3: the probe's user code segment
    assert re.search(r"cr0\s+0x8000001", out) and re.search(r"efer\s+0x5", out), out  # paging, long mode
    assert "$1 = 7" in out and "$2 = 1" in out, out
    assert f"{symbols['gdb_value']:016x}: 2a 00 00 00 00 00 00 00" in out, out  # the write, seen physically
    assert "vCPU 0 (thread 1): runnable, 64-bit ring 3" in out, out
    assert (snap / "manifest.json").exists() and "paused, 1 vCPU(s), 256 MiB" in out, out
    assert "detached" in out, out
    status, console, err = vm.finish()
    assert status == 0, err
    assert parse_results(console) == {"boot": "pvh", "gdb_value": "42", "released": "1"}


def test_gdb_wait_holds_the_guest_at_its_entry_where_it_steps_and_hits_a_hardware_breakpoint(
    vms, probe64, tmp_path
):
    vm = vms("gdb 200", "--cpus", "2", "--gdb-wait", gdb=f"unix:{tmp_path / 'gdb.sock'}")
    out = gdb(
        vm,
        probe64,
        "print $pc",
        "info threads",
        "stepi",
        "print $pc",
        "hbreak long64",
        "continue",
        "print $pc",
        "delete",
        "detach",
    )
    assert "$1 = (void (*)()) 0x10001a <pvh_start>" in out, out  # not one instruction run
    assert re.search(r"Thread 1 \(vCPU 0 \(runnable\)\)", out), out
    assert re.search(r"Thread 2 \(vCPU 1 \(wait-for-SIPI\)\)", out), out
    assert "$2 = (void (*)()) 0x10001b <pvh_start+1>" in out, out  # `cli` stepped over
    assert re.search(r"hit Breakpoint 1, 0x0+100088 in long64", out), out
    assert "$3 = (void (*)()) 0x100088 <long64>" in out, out
    status, console, err = vm.finish()
    assert status == 0, err
    assert parse_results(console)["gdb_value"] == "7"


@pytest.mark.skipif(PVM, reason=PVM_REASON)
def test_software_breakpoint_watchpoint_and_ring3_step(vms, probe64):
    vm = vms("gdb")
    out = gdb(
        vm,
        probe64,
        "break gdb_tick",
        "continue",
        "print $pc",
        "delete",
        "watch *(long *)&gdb_counter",
        "continue",
        "delete",
        "stepi",
        "set var *(long *)&gdb_release = 1",
        "detach",
    )
    assert re.search(r"Breakpoint 1, 0x[0-9a-f]+ in gdb_tick", out), out
    assert "<gdb_tick>" in out, out
    assert "Hardware watchpoint 2" in out and "New value" in out, out
    status, console, err = vm.finish()
    assert status == 0, err
    assert parse_results(console)["released"] == "1"  # no int3 left behind


@pytest.mark.skipif(PVM, reason=PVM_REASON)
def test_continue_from_a_software_breakpoint_runs_the_guests_own_instruction_first(vms, symbols):
    vm = vms("gdb")
    c = RemoteClient(vm.address)
    assert c.ask(b"QStartNoAckMode") == b"OK"
    counter = b"m%x,8" % symbols["gdb_counter"]
    assert c.ask(b"Z0,%x,1" % symbols["gdb_tick"]) == b"OK"
    assert c.ask(b"m%x,1" % symbols["gdb_tick"]) != b"cc"  # gdb sees the guest's byte
    seen = []
    for _ in range(3):
        assert c.ask(b"vCont;c", timeout=30) == b"T05thread:1;swbreak:;"
        assert int.from_bytes(bytes.fromhex(c.ask(b"p10").decode()), "little") == symbols["gdb_tick"]
        seen.append(int.from_bytes(bytes.fromhex(c.ask(counter).decode()), "little"))
    assert seen[1] == seen[0] + 1 and seen[2] == seen[1] + 1  # one call per stop, none skipped
    assert c.ask(b"vCont;s:1") == b"T05thread:1;"  # a step from the breakpoint moves on
    assert int.from_bytes(bytes.fromhex(c.ask(b"p10").decode()), "little") != symbols["gdb_tick"]
    assert c.ask(b"M%x,8:0100000000000000" % symbols["gdb_release"]) == b"OK"
    assert c.ask(b"D") == b"OK"  # the int3 goes with the debugger
    status, console, err = vm.finish()
    assert status == 0 and parse_results(console)["released"] == "1", err


@pytest.mark.skipif(not PVM, reason="a host with hardware virtualization supports what PVM refuses")
def test_on_pvm_software_breakpoints_and_ring3_steps_are_refused_clearly(vms, probe64, symbols):
    vm = vms("gdb")
    # scenario_gdb's first instruction ran before the loop, so the guest is never stopped on it
    # when gdb attaches. (Stopped on a breakpoint's own address, gdb would step over it first
    # and never insert it: at gdb_tick that happened in CI.)
    out = gdb(vm, probe64, "break *scenario_gdb", "continue", "delete", "stepi", "print $pc", "detach")
    assert "Cannot insert breakpoint 1" in out, out
    assert "single-stepping ring-3 guest code does not work on this PVM host" in out, out
    assert re.search(r"\$1 = \(void \(\*\)\(\)\) 0x[0-9a-f]+ <(scenario_gdb|gdb_tick)", out), out
    c = RemoteClient(vm.address)
    reply = c.ask(b"Z0,%x,1" % symbols["gdb_tick"])
    assert reply.startswith(b"E.software breakpoints do not work on this PVM host"), reply
    c.ask(b"M%x,8:0100000000000000" % symbols["gdb_release"])
    assert c.ask(b"D") == b"OK"
    status, console, err = vm.finish()
    assert status == 0 and parse_results(console)["released"] == "1", err
    assert "software breakpoints do not work on this PVM host" in err  # the VMM says so too


def test_ctrl_c_stops_a_busy_guest_and_kill_ends_it(vms, symbols):
    vm = vms("gdb")
    c = RemoteClient(vm.address)
    assert b"PacketSize=4000" in c.ask(b"qSupported:swbreak+;hwbreak+")
    assert c.ask(b"QStartNoAckMode") == b"OK"
    counter = b"m%x,8" % symbols["gdb_counter"]
    before = int.from_bytes(bytes.fromhex(c.ask(counter).decode()), "little")
    c.send(b"vCont;c")
    time.sleep(0.5)
    c.send_raw(b"\x03")
    assert c.receive(10) == b"T02thread:1;"
    after = int.from_bytes(bytes.fromhex(c.ask(counter).decode()), "little")
    assert after > before  # it ran between the two stops, and stands still now
    assert int.from_bytes(bytes.fromhex(c.ask(counter).decode()), "little") == after
    assert len(c.ask(b"g")) == 2 * G_SIZE
    c.send(b"k")
    _status, _console, err = vm.finish()
    assert "killed from the debugger" in err


def test_malformed_packets_get_errors_a_second_debugger_a_refusal_and_the_vmm_runs_on(vms, symbols):
    vm = vms("gdb")
    c = RemoteClient(vm.address)
    c.send_raw(b"$qC#00")  # bad checksum: a nak, no reply
    c.send_raw(b"$" + b"x" * 40000 + b"#00")  # longer than PacketSize
    c.send_raw(b"\xff\x00garbage#zz}}")
    assert c.ask(b"qC") == b"QC1"
    assert b"-" in c.raw
    for packet, reply in [
        (b"", b""),
        (b"mzz,4", b"E22"),
        (b"m-10,4", b"E22"),
        (b"Z5,0,1", b""),
        (b"Z1,-1,1", b"E22"),
        (b"m0", b"E22"),
        (b"mffffffffffff0000,10", b"E14"),  # not mapped
        (b"M0,4:00", b"E22"),  # length and data disagree
        (b"p999", b"E45"),
        (b"Pzz=00", b"E22"),
        (b"G00", b"E22"),
        (b"Hg9", b"E22"),
        (
            b"Z2,%x,8" % (symbols["gdb_counter"] + 1),
            b"E.x86 debug registers watch 1, 2, 4 or 8 aligned bytes",
        ),
        (b"Z9,0,0", b""),
        (b"qXfer:features:read:other.xml:0,10", b"E00"),
        (b"Jnonsense", b""),
        (b"qRcmd,zz", b"E22"),
    ]:
        assert c.ask(packet) == reply, packet
    assert (
        c.ask(b"qRcmd," + b"xp 0xffffffffff00 16".hex().encode())
        == b"monitor xp: 0xffffffffff00+0x10 is not guest RAM\n".hex().encode()
    )
    xml = c.ask(b"qXfer:features:read:target.xml:0,fff0")
    assert xml.startswith(b"l<?xml") and b"i386:x86-64" in xml
    second = RemoteClient(vm.address)
    assert (
        second.ask(b"qSupported")
        == b"E.another debugger is attached to this VM: detach it first (one debugger at a time)"
    )
    with pytest.raises(ConnectionError):
        second.receive(5)
    assert c.ask(b"M%x,8:0100000000000000" % symbols["gdb_release"]) == b"OK"
    assert c.ask(b"D") == b"OK"
    status, console, err = vm.finish()
    assert status == 0, err
    assert parse_results(console)["released"] == "1"
    assert "Traceback" not in err


def test_bad_gdb_options_are_one_clear_line(tmp_path):
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        port = busy.getsockname()[1]
        cases = [
            (["--gdb", "bogus"], "gdb address 'bogus': expected tcp:[HOST:]PORT|unix:PATH"),
            (["--gdb-wait"], "--gdb-wait needs --gdb"),
            (
                ["--gdb", f"tcp:127.0.0.1:{port}"],
                f"cannot listen for gdb on tcp:127.0.0.1:{port}: Address already in use",
            ),
        ]
        for args, message in cases:
            line = one_clear_line(corral("run", "--image", "probe", "--cmdline", "hello", *args))
            assert message in line, line
    finally:
        busy.close()


def test_a_paused_machine_stays_paused_after_detach_and_a_restored_one_is_debugged(tmp_path, symbols):
    """Through the library: GdbStub on a Machine the caller paused, then on its restored copy."""
    out = bytearray()
    m = Machine(MachineConfig.build(kernel=build_probe(), cmdline="gdb", memory="256M"), console=out.extend)
    stub = GdbStub(m, "tcp:127.0.0.1:0")
    try:
        m.start()
        wait_for(lambda: out, b"gdb target ready")
        m.pause()
        c = RemoteClient(("127.0.0.1", stub.port))
        counter = b"m%x,8" % symbols["gdb_counter"]
        held = c.ask(counter)
        assert c.ask(b"D") == b"OK"
        time.sleep(0.3)
        assert m.paused  # the caller's pause outlives the debugger
        m.snapshot(tmp_path / "snap")
    finally:
        stub.close()
        m.stop()
        m.close()
    out2 = bytearray()
    r = Machine.from_snapshot(tmp_path / "snap", console=out2.extend)
    stub = GdbStub(r, "tcp:127.0.0.1:0", wait=True)
    try:
        r.start()
        c = RemoteClient(("127.0.0.1", stub.port))
        assert c.ask(counter) == held  # held at the snapshot's instruction: not one turn since
        assert c.ask(b"M%x,8:0100000000000000" % symbols["gdb_release"]) == b"OK"
        assert c.ask(b"D") == b"OK"
        result = r.wait(30)
        assert result is not None and (result.kind, result.status) == ("exit", 0)
        assert parse_results(out2.decode())["released"] == "1"
    finally:
        stub.close()
        r.stop()
        r.close()
