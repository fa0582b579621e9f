"""Guest memory dumps on the real /dev/kvm: the probe's core opened by real gdb with the probe's
symbols, its notes read by binutils' readelf, its sparseness measured on disk; through the
library, the control socket (`corral dump`) and `corral run --dump-on-crash`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import corral, one_clear_line, start_vm
from support.live_probe import LiveProbe

from corral.debug.dump import DumpError, dump_core

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
MiB = 1 << 20


def gdb_core(probe64: Path, core: Path, *commands: str) -> str:
    args = ["gdb", "-batch", "-nx"]
    for c in commands:
        args += ["-ex", c]
    r = subprocess.run([*args, str(probe64), str(core)], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


def test_gdb_reads_the_probes_variables_and_threads_from_a_core_of_a_running_guest(
    tmp_path, probe64, symbols
):
    probe = LiveProbe.boot("gdb 60000", cpus=2)
    m = probe.machine
    try:
        deadline = time.monotonic() + 30
        while "gdb target ready" not in probe.output:
            assert time.monotonic() < deadline, probe.output
            time.sleep(0.05)
        core = tmp_path / "probe.core"
        m.pause()  # so the counter the core holds is the one RAM holds now
        try:
            stats = dump_core(m, core)
            assert m.memory is not None
            counter = m.memory.read_u64(symbols["gdb_counter"])
        finally:
            m.resume()
        assert counter > 0 and stats.vcpus == 2 and stats.ram_bytes == 256 * MiB
        # the guest runs on after a dump: its counter moves
        time.sleep(0.3)
        assert m.memory.read_u64(symbols["gdb_counter"]) != counter
    finally:
        m.stop()
        m.close()
    out = gdb_core(
        probe64,
        core,
        "print (long)gdb_value",
        "print (long)gdb_counter",
        "info threads",
        "thread 1",
        "info registers rip cs",
    )
    assert re.search(r"\$1 = 7\b", out), out
    assert re.search(rf"\$2 = {counter}\b", out), out
    assert "LWP 1" in out and "LWP 2" in out, out  # one thread per vCPU
    rip = int(re.search(r"^rip\s+(0x[0-9a-f]+)", out, re.M).group(1), 16)
    assert symbols["scenario_gdb"] <= rip < symbols["scenario_gdb"] + 0x400 or (
        symbols["gdb_tick"] <= rip < symbols["scenario_gdb"]
    ), out

    # the notes: an NT_PRSTATUS and a QEMU note per vCPU; a PT_LOAD per RAM range at its address
    notes = readelf("-n", str(core))
    assert notes.count("NT_PRSTATUS") == 2 and notes.count("QEMU") == 2, notes
    loads = re.findall(
        r"LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", readelf("-l", str(core))
    )
    assert [(int(v, 16), int(p, 16), int(s, 16)) for _off, v, p, s in loads] == [(0, 0, 256 * MiB)]

    # sparse: the probe touched little of its 256 MiB, and the file holds only that
    st = core.stat()
    assert st.st_size > 256 * MiB
    assert st.st_blocks * 512 < 16 * MiB, st.st_blocks * 512
    assert stats.bytes_written < 16 * MiB
    assert st.st_mode & 0o777 == 0o600


def test_a_dump_never_overwrites_nor_follows_a_symlink(tmp_path):
    probe = LiveProbe.boot("idle", memory="64M")
    m = probe.machine
    try:
        existing = tmp_path / "exists"
        existing.write_text("keep me")
        with pytest.raises(DumpError, match="exists"):
            dump_core(m, existing)
        assert existing.read_text() == "keep me"
        target = tmp_path / "target"
        (tmp_path / "link").symlink_to(target)
        with pytest.raises(DumpError):
            dump_core(m, tmp_path / "link")
        assert not target.exists()
        with pytest.raises(DumpError, match="no such|No such"):
            dump_core(m, tmp_path / "missing-dir" / "core")
        assert not m.paused  # a refused dump leaves the guest running
    finally:
        m.stop()
        m.close()


def test_corral_dump_through_the_control_socket(tmp_path, probe64):
    api = tmp_path / "vm.sock"
    proc = start_vm(api, "gdb 60000")
    try:
        core = tmp_path / "api.core"
        r = corral("dump", "--api", str(api), str(core))
        assert r.returncode == 0, r.stderr
        assert "MiB written" in r.stderr
        assert "7" in gdb_core(probe64, core, "print (long)gdb_value").split("$1 = ")[1][:2]
        # a second dump to the same path is one clear line, and the VM runs on
        again = corral("dump", "--api", str(api), str(core))
        assert again.returncode == 1 and "exists" in one_clear_line(again)
        assert corral("status", "--api", str(api)).stdout.startswith("running")
    finally:
        corral("stop", "--api", str(api))
        proc.wait(30)


def test_dump_on_crash_writes_the_core_of_a_triple_faulting_guest(tmp_path, probe64, symbols):
    out = tmp_path / "crashes"
    out.mkdir()
    r = corral(
        "run", "--image", "probe", "--memory", "64M", "--cmdline", "triple-fault", "--dump-on-crash", str(out)
    )
    assert r.returncode == 1, r.stderr
    assert "triple fault" in r.stderr and "its core is" in r.stderr, r.stderr
    (core,) = out.iterdir()
    assert core.stat().st_mode & 0o777 == 0o600
    text = gdb_core(probe64, core, "print/x (long)crash_marker", "info registers rip")
    assert "0xc0de0dead" in text, text
    # the vCPU's registers at the crash: RIP inside the probe's code
    rip = int(re.search(r"^rip\s+(0x[0-9a-f]+)", text, re.M).group(1), 16)
    assert 0x100000 <= rip < symbols["_end"], text


def test_dump_on_crash_needs_an_existing_directory(tmp_path):
    r = corral("run", "--image", "probe", "--cmdline", "hello", "--dump-on-crash", str(tmp_path / "nope"))
    assert r.returncode == 2 and "create it first" in one_clear_line(r)
    assert not os.path.exists(tmp_path / "nope")
