"""The probe scenarios, one table for every runner: corral on this host's /dev/kvm (tests/kvm),
QEMU under TCG (tests/qemu) and corral in the nested lab (tests/lab) boot the same scenarios
under the same names and check them the same way.

A scenario says what to boot (command line, vCPU counts, memory, a disk, a NIC) and what the
guest must report: its exit status, `expect` (RESULT key -> exact value, "{cpus}" standing for
the vCPU count, or a predicate) and `checks` (functions of the whole run: console lines, PROGRESS
rounds, what reached the disk or the tap). Where a runner legitimately differs, the scenario
says so in `qemu` or `lab`: the fields that differ there, with the reason beside them. The lab
checks the exit status and `expect` only (what it sees is a shell transcript from a nested VM);
the runners on this host run the checks too.

    for sc, cpus in cases("qemu"):          # or, as pytest params: params("qemu")
        run = run_qemu_probe(sc.cmdline, cpus, ...)
        sc.verify(Outcome(run.status, run.results, run.progress, run.output, cpus))
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from support.disks import MARKER, PROBE_WRITE, sector

RUNNERS = ("corral", "qemu", "lab")
# the lab boots fewer scenarios: each boot there costs seconds of nested TCG
HOST = ("corral", "qemu")


@dataclass(frozen=True)
class Disk:
    """A patterned virtio-blk disk (support.disks.patterned_image) of `sectors` sectors."""

    sectors: int
    serial: str = ""
    read_only: bool = False


@dataclass
class Outcome:
    """What a runner saw of one boot, in the same shape for every runner."""

    status: int | None  # the guest's exit status (None: it did not exit by itself)
    results: Mapping[str, str]  # the RESULT pairs (support.results.parse_output)
    progress: list[dict[str, str]]  # the PROGRESS lines
    output: str  # the console, for checks and failure messages
    cpus: int
    disk: Path | None = None  # the image the guest's disk was backed by
    tap_frames: int | None = None  # frames the host's tap received
    note: str = ""  # the runner's own word on how the run ended

    @classmethod
    def of(cls, run, cpus: int, disk: Path | None, frames: int | None, note: str) -> Outcome:
        """From a runner's result: anything with status, results, progress and output."""
        return cls(run.status, run.results, run.progress, run.output, cpus, disk, frames, note)


class Predicate:
    """A RESULT value check with a name for failure messages."""

    def __init__(self, name: str, test: Callable[[str], bool]) -> None:
        self.name, self.test = name, test

    def __call__(self, value: str) -> bool:
        return self.test(value)

    def __repr__(self) -> str:
        return self.name


positive = Predicate("a number above 0", lambda v: int(v, 0) > 0)


def one_of(*values: str) -> Predicate:
    return Predicate(f"one of {values}", lambda v: v in values)


# -- whole-run checks ---------------------------------------------------------------------------
def timer_near_1khz(o: Outcome) -> None:
    """The probe programs its timer for about 1 kHz."""
    assert 500 <= int(o.results["timer_hz"]) <= 2000, o.output


def bench_markers(o: Outcome) -> None:
    """A benchmark brackets its loop with BENCH lines and reports the TSC cycles it took."""
    lines = o.output.splitlines()
    assert lines.index("BENCH start") < lines.index("BENCH end"), o.output
    assert re.search(r"^RESULT .*tsc=\d+", o.output, re.M), o.output


def exits_on_every_cpu(o: Outcome) -> None:
    """`pio-bench N all`: every vCPU made its N exits, and the total counts them all."""
    total = o.results.get("pio_exits", o.results.get("mmio_exits"))
    assert total == str(int(o.results["per_cpu"]) * o.cpus), o.output


def checksum_is_64_bits(o: Outcome) -> None:
    assert re.fullmatch(r"0x[0-9a-f]{16}", o.results["checksum"]), o.output


def three_rounds(o: Outcome) -> None:
    """`mem-touch SIZE 3` prints one PROGRESS line per round; the pattern changes every round."""
    assert [p["round"] for p in o.progress] == ["1", "2", "3"], o.output
    assert all(p["ok"] == "1" for p in o.progress)
    sums = [p["checksum"] for p in o.progress]
    assert len(set(sums)) == 3, "the pattern changes every round"
    assert o.results["checksum"] == sums[-1]


def range_above_4g(o: Outcome) -> None:
    """The probe had to use RAM mapped at or above 4 GiB."""
    assert "range=0x1" in o.output, o.output


def says(text: str) -> Callable[[Outcome], None]:
    def check(o: Outcome) -> None:
        assert text in o.output, o.output

    check.__name__ = f"says {text!r}"
    return check


def disk_written(o: Outcome) -> None:
    """blk-check's write reached the image's sector 3, and nothing else changed."""
    assert o.disk is not None
    assert sector(o.disk, 3).startswith(PROBE_WRITE)
    assert sector(o.disk, 4)[8 : 8 + len(MARKER)] == MARKER


def disk_untouched(o: Outcome) -> None:
    """A read-only disk refused blk-check's write."""
    assert o.disk is not None
    assert not sector(o.disk, 3).startswith(PROBE_WRITE)


def tap_got_every_frame(o: Outcome) -> None:
    """The device completed nothing it did not send: the tap received exactly the frames."""
    assert o.tap_frames == int(o.results["net_tx_frames"]), o.tap_frames


def tap_got_at_least_every_frame(o: Outcome) -> None:
    """Every frame reached the tap (plus any frame the host sent itself on the up link)."""
    assert o.tap_frames is not None and o.tap_frames >= int(o.results["net_tx_frames"]), o.tap_frames


@dataclass(frozen=True)
class Scenario:
    name: str
    cmdline: str
    cpus: tuple[int, ...] = (1, 2)
    memory: str | None = None  # None: the runner's default (corral 256M, QEMU 512M)
    disk: Disk | None = None
    net: bool = False  # a virtio-net NIC on a fresh tap (needs root)
    status: int = 0
    expect: Mapping[str, str | Predicate] = field(default_factory=dict)
    checks: tuple[Callable[[Outcome], None], ...] = ()
    every_boot: bool = False  # also through the runner's other boot entries (QEMU: PVH)
    timeout: float = 60.0
    slow: bool = False  # runs with CORRAL_SLOW_TESTS=1 only
    runners: tuple[str, ...] = RUNNERS
    qemu: Mapping[str, object] = field(default_factory=dict)  # fields that differ under QEMU
    lab: Mapping[str, object] = field(default_factory=dict)  # fields that differ in the lab

    def on(self, runner: str) -> Scenario:
        """This scenario as `runner` boots it."""
        assert runner in RUNNERS, runner
        overrides = {"qemu": self.qemu, "lab": self.lab}.get(runner, {})
        return replace(self, **overrides)

    def verify(self, o: Outcome, *, checks: bool = True) -> None:
        """The exit status, every expected RESULT value, and (with `checks`) every check."""
        assert o.status == self.status, (
            f"{self.name}: exit status {o.status}, not {self.status} {o.note}\n{o.output}"
        )
        for key, want in self.expect.items():
            got = o.results.get(key)
            if isinstance(want, Predicate):
                assert got is not None and want(got), (
                    f"{self.name}: RESULT {key}={got}, not {want}\n{o.output}"
                )
            else:
                want = want.format(cpus=o.cpus)
                assert got == want, f"{self.name}: RESULT {key}={got}, not {want}\n{o.output}"
        if checks:
            for check in self.checks:
                check(o)


def _bad_cmdline(name: str, cmdline: str) -> Scenario:
    return Scenario(name, cmdline, cpus=(1,), status=2, checks=(says("RESULT error="),), runners=HOST)


SCENARIOS: dict[str, Scenario] = {
    sc.name: sc
    for sc in [
        Scenario(
            "hello", "hello", every_boot=True, expect={"hello": "1", "boot": one_of("pvh", "multiboot")}
        ),
        Scenario(
            "smp",
            "smp",
            cpus=(1, 2, 4),
            every_boot=True,
            expect={"cpus": "{cpus}", "madt_cpus": "{cpus}"},
            lab={"cpus": (2,)},
        ),
        Scenario(
            "timer",
            "timer",
            every_boot=True,
            expect={"timer_ticks": positive},
            # TCG keeps the programmed ~1 kHz; on PVM the tick handler is emulated, ticks
            # arrive at a fraction of it (250 Hz measured with 2 vCPUs): a count, not a rate
            qemu={"checks": (timer_near_1khz,)},
        ),
        Scenario(
            "timer-pit",
            "timer pit",
            every_boot=True,
            # PIT channel 0 on IRQ 0, through the MADT's override to IOAPIC pin 2: periodic
            # ticks, then one-shots that each come once (Linux's `nolapic_timer` clock event)
            # (a count, not a rate: TCG on a loaded host coalesces ticks, as PVM does)
            expect={"timer_ticks": positive, "irq0_gsi": "2", "oneshots": "10", "late_ticks": "0"},
        ),
        Scenario(
            "pio-bench",
            "pio-bench 20000",
            every_boot=True,
            expect={"pio_exits": "20000", "tsc": positive},
            checks=(bench_markers,),
        ),
        Scenario(
            "mmio-bench",
            "mmio-bench 20000",
            every_boot=True,
            expect={"mmio_exits": "20000", "tsc": positive},
            checks=(bench_markers,),
        ),
        # the same loops on every vCPU at once (the APs released together with the BSP)
        *[
            Scenario(
                f"{kind}-bench-all",
                f"{kind}-bench 5000 all",
                cpus=(1, 2, 4),
                expect={"cpus": "{cpus}", "per_cpu": "5000"},
                checks=(bench_markers, exits_on_every_cpu),
                runners=HOST,
            )
            for kind in ("pio", "mmio")
        ],
        Scenario(
            "mem-touch",
            "mem-touch 64M",
            memory="256M",
            every_boot=True,
            expect={"ok": "1", "mem_touch_bytes": str(64 << 20)},
            checks=(checksum_is_64_bits,),
        ),
        Scenario(
            "mem-touch-rounds",
            "mem-touch 4096K 3",
            every_boot=True,
            expect={"ok": "1", "rounds": "3"},
            checks=(three_rounds,),
            runners=HOST,
        ),
        # 3100M fits no range below the 3 GiB hole, so the probe must use RAM mapped above 4 GiB
        Scenario(
            "mem-touch-above-4g",
            "mem-touch 3100M",
            cpus=(1,),
            memory="7G",
            timeout=120,
            expect={"ok": "1"},
            checks=(range_above_4g,),
            runners=HOST,
            # under TCG this takes minutes: a slow test, with the size it was measured with
            qemu={"cmdline": "mem-touch 3G", "memory": "8G", "timeout": 180, "slow": True},
        ),
        Scenario(
            "mem-touch-too-big",
            "mem-touch 1G",
            cpus=(1,),
            status=1,
            expect={"ok": "0"},
            checks=(says("do not fit"),),
            runners=HOST,
        ),
        _bad_cmdline("unknown-scenario", "no-such-scenario"),
        _bad_cmdline("bad-cmdline-bogus", "bogus"),
        _bad_cmdline("bad-cmdline-empty", ""),
        _bad_cmdline("bad-cmdline-no-count", "pio-bench"),
        _bad_cmdline("bad-cmdline-bad-count", "pio-bench x"),
        _bad_cmdline("bad-cmdline-bad-cpus", "mmio-bench 10 some"),
        _bad_cmdline("bad-cmdline-bad-size", "mem-touch 1Q"),
        _bad_cmdline("bad-cmdline-bad-rounds", "mem-touch 1M sometimes"),
        Scenario(
            "blk-check",
            "blk-check",
            cpus=(1,),
            disk=Disk(4096, serial="probe-serial-1"),
            timeout=120,
            expect={"blk_capacity": "4096", "blk_serial": "probe-serial-1", "blk_ok": "1"},
            checks=(disk_written,),
        ),
        Scenario(
            "blk-read-only",
            "blk-check",
            cpus=(1,),
            disk=Disk(1024, read_only=True),
            status=1,
            timeout=120,
            expect={"blk_ok": "0"},
            checks=(disk_untouched,),
            runners=HOST,
        ),
        Scenario(
            "blk-bench",
            "blk-bench rand4k 5000",
            cpus=(1,),
            disk=Disk(8192),
            timeout=120,
            expect={"blk_ops": "5000", "blk_errors": "0"},
            # every boot in the nested lab is slow: fewer requests there
            lab={"cmdline": "blk-bench rand4k 2000", "expect": {"blk_ops": "2000", "blk_errors": "0"}},
        ),
        Scenario("no-disk", "blk-check", cpus=(1,), status=1, checks=(says("no virtio-blk"),), runners=HOST),
        Scenario(
            "blk-bench-write",
            "blk-bench rand4k 2000 write 1",  # writes at queue depth 1 (the bench's write rows)
            cpus=(1,),
            disk=Disk(8192),
            timeout=120,
            expect={"blk_ops": "2000", "blk_errors": "0"},
            runners=HOST,
        ),
        Scenario(
            "net-bench",
            "net-bench 5000",
            cpus=(1,),
            net=True,
            timeout=120,
            expect={"net_tx_frames": "5000"},
            checks=(tap_got_every_frame,),
            # QEMU's tap must be up, and the host then sends frames of its own on it
            qemu={"checks": (tap_got_at_least_every_frame,)},
            lab={"cmdline": "net-bench 2000", "expect": {"net_tx_frames": "2000"}},
        ),
    ]
}


def cases(runner: str) -> list[tuple[Scenario, int]]:
    """(scenario as `runner` boots it, vCPU count) for every scenario `runner` runs."""
    return [
        (sc, cpus)
        for sc in (s.on(runner) for s in SCENARIOS.values() if runner in s.runners)
        for cpus in sc.cpus
    ]


def params(runner: str) -> list:
    """cases(runner) as pytest params named `scenario-Ncpu`; slow ones skip unless asked for."""
    slow = pytest.mark.skipif(not os.environ.get("CORRAL_SLOW_TESTS"), reason="set CORRAL_SLOW_TESTS=1")
    return [
        pytest.param(sc, cpus, id=f"{sc.name}-{cpus}cpu", marks=[slow] if sc.slow else [])
        for sc, cpus in cases(runner)
    ]
