"""The probe guest under QEMU (TCG): every scenario with 1 and 2 CPUs, through Multiboot (QEMU's
choice for this ELF) and through PVH (a copy with the Multiboot magic zeroed)."""

from __future__ import annotations

import os
import re

import pytest

from corral.images.probe import build_probe
from qemu_probe import pvh_only_copy, run_qemu_probe

CPUS = [1, 2]


@pytest.fixture(scope="module", params=["multiboot", "pvh"])
def boot(request, tmp_path_factory):
    kernel = build_probe()
    if request.param == "pvh":
        kernel = pvh_only_copy(kernel, tmp_path_factory.mktemp("pvh") / "probe-pvh.elf")
    return request.param, kernel


def _ok(run, boot):
    assert run.status == 0, run.output
    assert run.results.get("boot") == boot[0], run.output
    assert f"probe: boot={boot[0]}" in run.output


@pytest.mark.parametrize("cpus", CPUS)
def test_hello(boot, cpus):
    run = run_qemu_probe("hello", cpus, kernel=boot[1])
    _ok(run, boot)
    assert run.results["hello"] == "1"


@pytest.mark.parametrize("cpus", CPUS)
def test_smp_starts_every_cpu(boot, cpus):
    run = run_qemu_probe("smp", cpus, kernel=boot[1])
    _ok(run, boot)
    assert run.results["cpus"] == str(cpus)
    assert run.results["madt_cpus"] == str(cpus)


def test_smp_four_cpus():
    run = run_qemu_probe("smp", 4)
    assert run.status == 0, run.output
    assert run.results["cpus"] == "4"


@pytest.mark.parametrize("cpus", CPUS)
def test_timer_ticks(boot, cpus):
    run = run_qemu_probe("timer", cpus, kernel=boot[1])
    _ok(run, boot)
    ticks, hz = int(run.results["timer_ticks"]), int(run.results["timer_hz"])
    assert ticks > 0
    assert 500 <= hz <= 2000, run.output         # programmed for ~1 kHz


@pytest.mark.parametrize("cpus", CPUS)
@pytest.mark.parametrize("kind", ["pio", "mmio"])
def test_bench(boot, cpus, kind):
    run = run_qemu_probe(f"{kind}-bench 1000", cpus, kernel=boot[1])
    _ok(run, boot)
    assert run.results[f"{kind}_exits"] == "1000"
    assert int(run.results["tsc"]) > 0
    lines = run.output.splitlines()
    assert lines.index("BENCH start") < lines.index("BENCH end")
    assert re.search(r"^RESULT .*tsc=\d+", run.output, re.M)


@pytest.mark.parametrize("cpus", CPUS)
def test_mem_touch(boot, cpus):
    run = run_qemu_probe("mem-touch 16M", cpus, kernel=boot[1])
    _ok(run, boot)
    assert run.results["mem_touch_bytes"] == str(16 << 20)
    assert run.results["ok"] == "1"
    assert re.fullmatch(r"0x[0-9a-f]{16}", run.results["checksum"])


@pytest.mark.parametrize("cpus", CPUS)
def test_mem_touch_rounds_report_progress(boot, cpus):
    run = run_qemu_probe("mem-touch 4096K 3", cpus, kernel=boot[1])
    _ok(run, boot)
    assert [p["round"] for p in run.progress] == ["1", "2", "3"]
    assert all(p["ok"] == "1" for p in run.progress)
    sums = [p["checksum"] for p in run.progress]
    assert len(set(sums)) == 3, "the pattern changes every round"
    assert run.results["checksum"] == sums[-1] and run.results["rounds"] == "3"


def test_mem_touch_same_pattern_same_checksum():
    a = run_qemu_probe("mem-touch 1M", 1)
    b = run_qemu_probe("mem-touch 1048576", 2)
    assert a.status == b.status == 0
    assert a.results["checksum"] == b.results["checksum"]


def test_mem_touch_too_big_fails_clearly():
    run = run_qemu_probe("mem-touch 1G", 1)
    assert run.status == 1, run.output
    assert run.results["ok"] == "0"
    assert "do not fit" in run.output


@pytest.mark.skipif(not os.environ.get("CORRAL_SLOW_TESTS"), reason="set CORRAL_SLOW_TESTS=1")
def test_mem_touch_above_4g():
    run = run_qemu_probe("mem-touch 3G", 1, memory="8G", timeout=180)
    assert run.status == 0, run.output
    assert "range=0x1" in run.output            # placed above 4 GiB


@pytest.mark.kvm
@pytest.mark.parametrize("scenario", ["hello", "smp", "timer", "pio-bench 1000"])
def test_qemu_kvm_smoke(scenario):
    """QEMU on this host's /dev/kvm (PVM: SeaBIOS and the probe's ring-0 code are emulated,
    so a boot takes seconds rather than milliseconds)."""
    run = run_qemu_probe(scenario, 2, accel="kvm", timeout=120)
    assert run.status == 0, run.output
    assert run.results["boot"] == "multiboot"


@pytest.mark.parametrize("cmdline", ["bogus", "", "pio-bench", "pio-bench x", "mem-touch 1Q",
                                     "mem-touch 1M sometimes"])
def test_bad_command_line_exits_2(cmdline):
    run = run_qemu_probe(cmdline, 1)
    assert run.status == 2, run.output
    assert "RESULT error=" in run.output
