"""Every probe scenario boots under corral on the real /dev/kvm, with 1 and 2 vCPUs."""

import pytest

from probe_runner import run_probe

CPUS = [1, 2]


def _ok(run):
    assert run.result.kind == "exit", run.result.message + "\n" + run.output
    assert run.result.status == 0, run.output


@pytest.mark.parametrize("cpus", CPUS)
def test_hello(cpus):
    run = run_probe("hello", cpus)
    _ok(run)
    assert run.results["hello"] == "1"
    assert run.results["boot"] in ("pvh", "multiboot")


@pytest.mark.parametrize("cpus", CPUS + [4])
def test_smp_brings_up_every_cpu(cpus):
    run = run_probe("smp", cpus)
    _ok(run)
    assert run.results["cpus"] == str(cpus)


@pytest.mark.parametrize("cpus", CPUS)
def test_timer_interrupts_arrive(cpus):
    run = run_probe("timer", cpus)
    _ok(run)
    assert int(run.results["timer_ticks"]) > 0


@pytest.mark.parametrize("cpus", CPUS)
def test_pio_bench_counts_exits(cpus):
    run = run_probe("pio-bench 20000", cpus)
    _ok(run)
    assert run.results["pio_exits"] == "20000"


@pytest.mark.parametrize("cpus", CPUS)
def test_mmio_bench_counts_exits(cpus):
    run = run_probe("mmio-bench 20000", cpus)
    _ok(run)
    assert run.results["mmio_exits"] == "20000"


@pytest.mark.parametrize("cpus", CPUS)
def test_mem_touch_checksums(cpus):
    run = run_probe("mem-touch 64M", cpus, memory="256M")
    _ok(run)
    assert run.results["ok"] == "1"
    assert int(run.results["mem_touch_bytes"], 0) == 64 << 20 or run.results["mem_touch_bytes"] == "64M"


def test_mem_touch_above_4g():
    # 3100M fits no range below the 3 GiB hole, so the probe must use RAM mapped above 4 GiB
    run = run_probe("mem-touch 3100M", 1, memory="7G", timeout=120)
    _ok(run)
    assert run.results["ok"] == "1"
    assert "range=0x1" in run.output, run.output  # a range starting at or above 4 GiB


def test_unknown_scenario_fails():
    run = run_probe("no-such-scenario", 1)
    assert run.result.kind == "exit" and run.result.status != 0
