#!/usr/bin/env python3
"""corral's own time per exit: from KVM_RUN returning to the vCPU loop entering it again, for
the probe's port-I/O (`pio-bench`, port 0x504) and MMIO (`mmio-bench`, 0xD0000000) exits,
median and p99, against issue 16's goal of <= 2 us.

How: the probe runs in-process (`Machine`, one vCPU) with its vCPU's `fd.run` wrapped: the
wrapper stamps perf_counter_ns() just before the real KVM_RUN ioctl and just after it returns,
with the exit's reason and port. Exit i's dispatch time is the next entry's stamp minus exit i's
return stamp: the fast path (`Vcpu._loop`, exit statistics off) exactly as it runs, plus the
wrapper's own epilogue and prologue. That overhead is measured on its own (the same wrapper
driven by a bare `for` loop around a no-op) and its median subtracted from every figure.

Beside it, to tell the code's cost from the host's: the same loop alone (no guest: a stand-in
for KVM_RUN leaves the same exit in the run page every time, so the loop runs with hot caches),
the same with one plain system call in the stand-in (a kernel round trip, but no guest), the
time inside KVM_RUN itself, and the exit statistics' own figure (`observe_exits`, what
`--stats` does: the mean time of the handler alone, the loop around it not counted).

Both vCPU loops are measured: the compiled one (`_exitloop.c`, the default where it is built),
which stamps CLOCK_MONOTONIC (perf_counter_ns's clock) around each KVM_RUN itself into a buffer
the bench hands it (`Vcpu.exit_stamps`: every exit's window, of which the bench's own are over
99%; alone, `_exitloop.run` over a stand-in ioctl that leaves the run page as it is), and the
Python reference (`vcpu.EXIT_LOOP = False`), timed by the wrapper as above.

Each kind runs `--runs` times, the measures alternating round by round (interleave.py), each
guest run capped in time; median of the runs' medians (min-max).

    python bench/dispatch_bench.py [--runs 5] [--exits 100000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.config import MachineConfig  # noqa: E402
from corral.debug import exit_stats  # noqa: E402
from corral.images.probe import build_probe  # noqa: E402
from corral.kvm import constants as K  # noqa: E402
from corral.machine import Machine  # noqa: E402
from corral.vstate import vcpu as vcpu_mod  # noqa: E402
from interleave import RunFailed, host_line, interleave, spread  # noqa: E402

GOAL_NS = 2000
KINDS = {"pio": ("pio-bench", K.EXIT_IO << 16 | 0x504), "mmio": ("mmio-bench", K.EXIT_MMIO << 16)}


class Stamps:
    """Entry and return stamps of up to `cap` KVM_RUNs, in arrays allocated up front (the vCPU
    thread runs under seccomp: nothing may grow there)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.n = cap, 0
        self.enter = array("q", bytes(8 * cap))
        self.ret = array("q", bytes(8 * cap))
        self.key = array("q", bytes(8 * cap))

    def wrap(self, run: Callable[[], None], buf: memoryview) -> Callable[[], None]:
        """`run` timed; the key is reason << 16 | port (port I/O) or reason << 16 (others)."""
        enter, ret, key, cap, clock, io = (
            self.enter,
            self.ret,
            self.key,
            self.cap,
            time.perf_counter_ns,
            K.EXIT_IO,
        )

        def timed() -> None:
            i = self.n
            if i >= cap:
                run()
                return
            enter[i] = clock()
            run()  # an interrupted KVM_RUN (EINTR) raises before n moves: the slot is reused
            ret[i] = clock()
            reason = buf[8]
            key[i] = reason << 16 | (buf[34] | buf[35] << 8 if reason == io else 0)
            self.n = i + 1

        return timed

    def in_kvm(self, want: int) -> list[int]:
        """ns each KVM_RUN that ended in an exit keyed `want` took (entry to return)."""
        return [self.ret[i] - self.enter[i] for i in range(self.n) if self.key[i] == want]

    def windows(self, want: int) -> list[int]:
        """ns from each exit keyed `want` returning to the next entry."""
        e, r, k = self.enter, self.ret, self.key
        return [e[i + 1] - r[i] for i in range(self.n - 1) if k[i] == want]


def wrapper_overhead(n: int = 200_000) -> int:
    """Median ns the wrapper alone puts between a return and the next entry (a bare loop)."""
    fake = memoryview(bytearray(64))
    fake[8] = K.EXIT_IO
    s = Stamps(n + 1)
    timed = s.wrap(lambda: None, fake)
    for _ in range(n):
        timed()
    return int(statistics.median(s.windows(K.EXIT_IO << 16)))


FIOCLEX = 0x5451  # an ioctl that succeeds on any fd and touches no memory: KVM_RUN's stand-in


def _run_page(buf: memoryview, kind: str) -> None:
    """The exit the probe's bench makes, written into a run page."""
    buf[8:12] = (KINDS[kind][1] >> 16).to_bytes(4, "little")  # the exit reason
    if kind == "pio":  # out, 1 byte, port 0x504, once, data at 48
        buf[32:48] = struct.pack("<BBHIQ", 1, 1, 0x504, 1, 48)
    else:  # a 4-byte store to 0xD0000000
        buf[32:53] = struct.pack("<Q8sIB", 0xD0000000, b"\1\0\0\0\0\0\0\0", 4, 1)


def _c_windows(stamps: array, n: int) -> list[int]:
    """ns from each KVM_RUN's return to the next entry, from the compiled loop's stamps."""
    return [stamps[2 * i + 2] - stamps[2 * i + 1] for i in range(n - 1)]


def alone_compiled(kind: str, exits: int) -> dict[str, float]:
    """The compiled loop with no guest: `_exitloop.run` itself over a stand-in ioctl (FIOCLEX on
    /dev/null) with the bench's exit in the run page, calling the machine's real buses."""
    from corral.vstate import _exitloop

    m = Machine(
        MachineConfig.build(kernel=build_probe(), cmdline="hello", cpus=1, memory="64M", no_reboot=True)
    )
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        m.build()
        v = m.vcpus[0]
        page = memoryview(bytearray(4096))
        _run_page(page, kind)
        stamps = array("q", bytes(16 * exits))
        n, reason, err = _exitloop.run(
            null, page, v.pio.ports, v.mmio,
            exits, FIOCLEX, K.EXIT_IO, K.EXIT_MMIO, memoryview(stamps),
        )  # fmt: skip
        if n != exits or reason != -1:
            raise RunFailed(f"{kind}: the compiled loop served {n} exits (reason {reason}, errno {err})")
    finally:
        os.close(null)
        m.close()
    w = sorted(_c_windows(stamps, exits))
    return {"p50": w[len(w) // 2], "p99": w[len(w) * 99 // 100]}


def alone(kind: str, exits: int, overhead: int, syscall: bool = False) -> dict[str, float]:
    """The same fast path with no guest at all: the real vCPU loop (`Vcpu._loop`, run on this
    thread) over a KVM_RUN stand-in that leaves the same exit in the run page every time, so
    the loop and the bus run with hot caches and no world switch in between. With `syscall`
    the stand-in makes one plain system call (getppid), a kernel round trip without a guest."""
    want = KINDS[kind][1]
    m = Machine(
        MachineConfig.build(kernel=build_probe(), cmdline="hello", cpus=1, memory="64M", no_reboot=True)
    )
    try:
        m.build()
        v = m.vcpus[0]
        buf = v.fd.run_buf
        _run_page(buf, kind)
        stamps = Stamps(exits)

        def stand_in() -> None:
            if syscall:
                os.getppid()
            if stamps.n >= exits - 1:
                v.stopping = True

        v.fd.run = stamps.wrap(stand_in, buf)  # type: ignore[method-assign]
        with python_loop():
            v._loop()
    finally:
        m.close()
    w = sorted(stamps.windows(want))
    return {"p50": w[len(w) // 2] - overhead, "p99": w[len(w) * 99 // 100] - overhead}


class python_loop:
    """The Python reference vCPU loop for what runs inside (vcpu.EXIT_LOOP off)."""

    def __enter__(self) -> None:
        self.saved, vcpu_mod.EXIT_LOOP = vcpu_mod.EXIT_LOOP, False

    def __exit__(self, *exc: object) -> None:
        vcpu_mod.EXIT_LOOP = self.saved


def boot(cmdline: str, timeout: float, setup: Callable[[Machine], None]) -> Machine:
    """The probe in-process with one vCPU, `setup` applied before it starts; run to its end."""
    config = MachineConfig.build(kernel=build_probe(), cmdline=cmdline, cpus=1, memory="64M", no_reboot=True)
    m = Machine(config, console=lambda b: None)
    try:
        m.build()
        setup(m)
        m.start()
        res = m.wait(timeout)
        if res is None:
            m.stop("bench cap")
            raise RunFailed(f"'{cmdline}' ran past its {timeout:.0f} s cap and was stopped")
        if res.kind != "exit" or res.status != 0:
            raise RunFailed(f"'{cmdline}' ended with {res.kind} {res.status}: {res.message}")
    except BaseException:
        m.close()
        raise
    return m


def fast_path(kind: str, exits: int, timeout: float, overhead: int) -> dict[str, float]:
    scenario, want = KINDS[kind]
    stamps = Stamps(exits + 10_000)

    def wrap(m: Machine) -> None:
        fd = m.vcpus[0].fd
        fd.run = stamps.wrap(fd.run, fd.run_buf)  # type: ignore[method-assign]

    with python_loop():
        boot(f"{scenario} {exits}", timeout, wrap).close()
    w = sorted(stamps.windows(want))
    if len(w) < exits:
        raise RunFailed(f"{kind}: {len(w)} exits timed, not {exits}")
    p50, p99 = w[len(w) // 2], w[len(w) * 99 // 100]
    kvm = statistics.median(stamps.in_kvm(want))
    return {"p50": p50 - overhead, "p99": p99 - overhead, "raw_p50": p50, "kvm_run": kvm}


def fast_path_compiled(kind: str, exits: int, timeout: float) -> dict[str, float]:
    scenario, _ = KINDS[kind]
    stamps = array("q", bytes(16 * (exits + 10_000)))

    def give(m: Machine) -> None:
        m.vcpus[0].exit_stamps = memoryview(stamps)

    boot(f"{scenario} {exits}", timeout, give).close()
    n = next((i for i in range(0, len(stamps), 2) if stamps[i] == 0), len(stamps)) // 2
    if n < exits:
        raise RunFailed(f"{kind}: {n} exits stamped, not {exits} (is the compiled loop built?)")
    w = sorted(_c_windows(stamps, n))
    kvm = statistics.median(stamps[2 * i + 1] - stamps[2 * i] for i in range(n))
    return {"p50": w[len(w) // 2], "p99": w[len(w) * 99 // 100], "kvm_run": kvm}


def with_stats(kind: str, exits: int, timeout: float) -> dict[str, float]:
    scenario, _ = KINDS[kind]
    m = boot(f"{scenario} {exits}", timeout, lambda m: m.observe_exits(True))
    try:
        v = exit_stats(m).vcpus[0]
    finally:
        m.close()
    table = v.pio_by_port if kind == "pio" else v.mmio_by_address
    key = "0x504" if kind == "pio" else "0xd0000000"
    c = next((c for c in table if c.key == key), None)
    if c is None or c.count < exits:
        raise RunFailed(f"{kind}: the exit statistics counted {c.count if c else 0} exits at {key}")
    return {"mean": c.ns / c.count}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exits", type=int, default=100_000)
    ap.add_argument("--timeout", type=float, default=120.0, help="cap per run, seconds")
    args = ap.parse_args()
    overhead = wrapper_overhead()
    rows = []
    compiled = vcpu_mod.EXIT_LOOP
    for kind in KINDS:
        sides: dict[str, Callable[[], dict[str, float]]] = {}
        if compiled:
            sides["compiled, between real exits"] = lambda k=kind: fast_path_compiled(
                k, args.exits, args.timeout
            )
            sides["compiled, alone"] = lambda k=kind: alone_compiled(k, args.exits)
        sides |= {
            "between real exits": lambda k=kind: fast_path(k, args.exits, args.timeout, overhead),
            "alone": lambda k=kind: alone(k, args.exits, overhead),
            "alone, a syscall between": lambda k=kind: alone(k, args.exits, overhead, syscall=True),
            "with --stats": lambda k=kind: with_stats(k, args.exits, args.timeout),
        }
        runs = interleave(args.runs, sides)
        col = lambda rs, key: spread([r[key] for r in rs], "{:,.0f}")  # noqa: E731
        stats, sys_hot = runs["with --stats"], runs["alone, a syscall between"]
        for loop, prefix in (("compiled", "compiled, "), ("Python", "")):
            if loop == "compiled" and not compiled:
                continue
            real, hot = runs[prefix + "between real exits"], runs[prefix + "alone"]
            goal = "met" if real and statistics.median(r["p50"] for r in real) <= GOAL_NS else "not met"
            rows.append(
                f"| {kind} | {loop} | {col(real, 'p50')} | {col(real, 'p99')} | {col(hot, 'p50')} "
                f"| {col(hot, 'p99')} | {col(sys_hot, 'p50') if loop == 'Python' else ''} "
                f"| {col(stats, 'mean') if loop == 'Python' else ''} | {col(real, 'kvm_run')} | {goal} |"
            )
    print(
        host_line(args.runs, None).replace("corral and QEMU interleaved", "the three measures interleaved")
        + f" {args.exits:,} exits per run; the Python loop's timing wrapper's own {overhead:,} ns (median)"
        " subtracted (the compiled loop stamps itself)."
    )
    print()
    print(
        "| exit | vCPU loop | between real exits: median (ns) | p99 (ns) "
        "| the loop alone: median (ns) | p99 (ns) "
        "| alone, a syscall between: median (ns) "
        "| `--stats` handler time, mean (ns) | KVM_RUN itself, median (ns) | median <= 2 us |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
