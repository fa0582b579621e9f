"""Exit statistics and traces on the real /dev/kvm: the probe's pio-bench and mmio-bench make a
known number of exits to a known port and address, which must appear exactly in the stats
(library, GET /corral/stats through curl, `corral stats`) and in a trace (`corral run --trace`,
`corral trace show`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
from support.cli import corral, one_clear_line, start_vm

from corral.config import MachineConfig
from corral.debug.stats import exit_stats
from corral.debug.trace import TraceWriter, records, summarize
from corral.images.probe import build_probe
from corral.kvm import constants as K
from corral.machine import Machine
from corral.vstate.exits import FLAG_WRITE

N = 3000
BENCH_PORT = 0x504
MMIO_BENCH = 0xD0000000


def run_observed(cmdline: str, trace=None) -> tuple[Machine, str]:
    out = bytearray()
    m = Machine(
        MachineConfig.build(kernel=build_probe(), cmdline=cmdline, memory="64M", no_reboot=True),
        console=out.extend,
    )
    m.build()
    writer = TraceWriter.for_machine(m, trace) if trace else None
    m.observe_exits()
    m.start()
    res = m.wait(60)
    if writer:
        writer.close()
    assert res is not None and res.kind == "exit" and res.status == 0, (res, out.decode(errors="replace"))
    return m, out.decode(errors="replace")


def test_stats_count_every_bench_exit_by_port_address_and_device(tmp_path):
    m, _ = run_observed(f"pio-bench {N}")
    try:
        s = exit_stats(m)
    finally:
        m.close()
    (v,) = s.vcpus
    assert s.enabled
    ports = {c.key: c for c in v.pio_by_port}
    assert ports[hex(BENCH_PORT)].count == N and ports[hex(BENCH_PORT)].ns > 0
    devices = {c.key: c.count for c in v.by_device}
    assert devices["bench-sink (pio)"] == N
    assert devices["com1 (pio)"] > 0  # the probe's own console lines
    reasons = {c.key: c.count for c in v.by_reason}
    assert reasons["IO"] == sum(c.count for c in v.pio_by_port) == v.exits - reasons.get("MMIO", 0)
    assert v.run_ns > 0

    m, _ = run_observed(f"mmio-bench {N}")
    try:
        (v,) = exit_stats(m).vcpus
    finally:
        m.close()
    assert {c.key: c.count for c in v.mmio_by_address}[hex(MMIO_BENCH)] == N
    assert {c.key: c.count for c in v.by_device}["unassigned (mmio)"] == N


def test_halts_and_injected_interrupts_come_from_kvm_while_the_guest_runs():
    # the timer scenario counts LAPIC timer interrupts that KVM injects (never a VMM exit)
    m, out = run_observed("timer")
    try:
        (v,) = exit_stats(m).vcpus
    finally:
        m.close()
    ticks = int(re.search(r"timer_ticks=(\d+)", out).group(1))
    assert ticks > 0 and v.interrupts is not None and v.interrupts >= ticks, (ticks, v.kvm)
    assert v.halts == v.kvm["halt_exits"] == 0  # it never halted

    # a halted vCPU sleeps inside KVM_RUN, holding its mutex: its counters are read all the same,
    # at once (the fd was opened before it ran; asking KVM for one now would wait for the guest)
    m = Machine(
        MachineConfig.build(kernel=build_probe(), cmdline="halt", memory="64M"), console=bytearray().extend
    )
    m.build()
    m.observe_exits()
    m.start()
    try:
        deadline = time.monotonic() + 30
        while exit_stats(m).vcpus[0].halts == 0:
            assert time.monotonic() < deadline, "the probe never halted"
            time.sleep(0.05)
        t0 = time.monotonic()
        s = exit_stats(m)
        assert time.monotonic() - t0 < 0.5
        assert s.kvm_stats == "read" and s.vcpus[0].halts == s.vcpus[0].kvm["halt_exits"] == 1
        assert "HLT" not in {c.key for c in s.vcpus[0].by_reason}  # the VMM saw no HLT exit
    finally:
        m.stop("done")
        m.wait(10)
        m.close()


def test_a_trace_holds_every_bench_exit_in_time_order_per_vcpu(tmp_path):
    path = tmp_path / "pio.trace"
    m, _ = run_observed(f"pio-bench {N}", trace=path)
    exits = m.vcpus[0].exits
    m.close()
    recs = list(records(path))
    assert len(recs) == exits  # nothing dropped, nothing invented
    bench = [r for r in recs if r[3] == K.EXIT_IO and r[4] == BENCH_PORT]
    assert len(bench) == N
    assert all(r[5] == 1 and r[6] & FLAG_WRITE for r in bench)  # 1-byte outs
    times = [r[0] for r in recs]
    assert times == sorted(times)  # one vCPU: its buffers reach the file in order
    s = summarize(path)
    assert s.by_device["bench-sink (pio)"][0] == N and s.by_reason["IO"][0] == exits
    assert sum(s.timeline) == exits and s.dropped == 0
    assert path.stat().st_mode & 0o777 == 0o600


def test_corral_run_trace_and_trace_show(tmp_path):
    path = tmp_path / "cli.trace"
    r = corral(
        "run", "--image", "probe", "--memory", "64M", "--cmdline", f"mmio-bench {N}", "--trace", str(path)
    )
    assert r.returncode == 0, r.stderr
    assert "corral: trace" in r.stderr
    shown = corral("trace", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "exits by reason" in out and "exits by device" in out and "exits over time" in out
    assert f"mmio {MMIO_BENCH:#x}" in out and f"{N:,}" in out
    # the same path again is refused before the guest boots
    again = corral("run", "--image", "probe", "--cmdline", "hello", "--trace", str(path))
    assert again.returncode == 2 and "exists" in one_clear_line(again)
    # a file that is not a trace is one clear line
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"hello")
    bad = corral("trace", "show", str(bogus))
    assert bad.returncode == 1 and "not a corral trace" in one_clear_line(bad)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_stats_over_the_control_socket_with_curl_and_the_cli(tmp_path):
    api = tmp_path / "vm.sock"
    proc = start_vm(api, "mem-touch 8M forever")
    try:

        def curl(*args: str) -> dict:
            out = subprocess.run(
                ["curl", "-sf", "--unix-socket", str(api), *args], capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)

        off = curl("http://localhost/corral/stats")
        assert off["enabled"] is False and off["vcpus"][0]["by_reason"] == []
        # KVM's own counters come whether or not exit statistics are on (the API thread reads
        # the fds the builder opened: its seccomp filter allows that)
        assert (
            off["kvm_stats"] == "read" and {"halt_exits", "irq_injections"} <= off["vcpus"][0]["kvm"].keys()
        )
        on = curl("-X", "PATCH", "http://localhost/corral/stats", "-d", '{"enabled": true}')
        assert on["enabled"] is True
        time.sleep(1.0)  # mem-touch prints a line per round: console exits
        got = curl("http://localhost/corral/stats")
        com1 = {c["key"]: c["count"] for c in got["vcpus"][0]["by_device"]}
        assert com1["com1 (pio)"] > 0
        assert got["vcpus"][0]["kvm"]["exits"] > off["vcpus"][0]["kvm"]["exits"]  # live counters
        shown = corral("stats", "--api", str(api), "--off")
        assert shown.returncode == 0, shown.stderr
        assert "exits by reason" in shown.stdout and "0x3f8" in shown.stdout
        assert re.search(r"vcpu0: [\d,]+ exits, \d+ halts, \d+ interrupts injected", shown.stdout), (
            shown.stdout
        )
        after = curl("http://localhost/corral/stats")
        assert after["enabled"] is False
        counted = after["vcpus"][0]["by_reason"][0]["count"]
        time.sleep(0.5)
        assert curl("http://localhost/corral/stats")["vcpus"][0]["by_reason"][0]["count"] == counted
    finally:
        corral("stop", "--api", str(api))
        proc.wait(30)
