#!/usr/bin/env python3
"""Side-by-side: the probe guest under corral and under QEMU (KVM, same host, same binary).

Measures, per VMM: launch -> first serial byte, launch -> exit (probe `hello`), and exits per
second for `pio-bench N` and `mmio-bench N` (timed between the probe's `BENCH start` and
`BENCH end` lines as they reach the host), the VMMs in alternation round by round (corral, QEMU
pc, QEMU microvm, corral...) with the same CPU pinning, each run capped in time. Prints median
(min-max) with ratios and writes JSON and a Markdown table under bench/results/.

    python bench/probe_bench.py [--runs 5] [--exits 200000] [--qemu-accel kvm] [--cpus 0-1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from support.qemu_probe import qemu_probe_cmd  # noqa: E402

from corral.images.probe import build_probe  # noqa: E402
from interleave import RunFailed, host_line, interleave, pin, ratio, spread  # noqa: E402


def corral_cmd(kernel: Path, cmdline: str, cpus: int, memory: str) -> list[str]:
    exe = shutil.which("corral") or str(Path(sys.executable).with_name("corral"))
    return [
        exe,
        "run",
        "--kernel",
        str(kernel),
        "--cmdline",
        cmdline,
        "--cpus",
        str(cpus),
        "--memory",
        memory,
        "--no-reboot",
    ]


def qemu_cmd(kernel: Path, cmdline: str, cpus: int, memory: str, accel: str, machine: str) -> list[str]:
    """The same QEMU command line the tests boot the probe with (tests/support/qemu_probe.py)."""
    return qemu_probe_cmd(cmdline, cpus, accel, kernel=kernel, machine=machine, memory=memory)


def timed_run(cmd: list[str], timeout: float = 300.0) -> dict:
    """Run `cmd`, timestamping the first output byte, each output line, and the exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )
    first = None
    lines: list[tuple[float, str]] = []
    buf = b""
    fd = p.stdout.fileno()
    deadline = t0 + timeout
    while True:
        if time.perf_counter() > deadline:
            p.kill()
            p.wait()
            raise RunFailed(f"{os.path.basename(cmd[0])} ran past its {timeout:.0f} s cap and was stopped")
        chunk = os.read(fd, 65536)
        now = time.perf_counter()
        if not chunk:
            break
        if first is None:
            first = now - t0
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            lines.append((now - t0, line.decode(errors="replace").strip()))
    rc = p.wait()
    total = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    return {"first_byte": first, "total": total, "rc": rc, "lines": lines, "stderr": err}


def launch(cmd: list[str]) -> dict[str, float]:
    r = timed_run(cmd)
    if not any(line.startswith("RESULT hello=1") for _, line in r["lines"]):
        raise RunFailed(f"hello failed: {r['lines'][-3:]} {r['stderr'][-300:]}")
    return {"first_byte_ms": r["first_byte"] * 1e3, "exit_ms": r["total"] * 1e3}


def exits_per_s(cmd: list[str], n: int) -> float:
    r = timed_run(cmd)
    marks = {line: t for t, line in r["lines"] if line in ("BENCH start", "BENCH end")}
    if len(marks) != 2:
        raise RunFailed(f"no BENCH markers: {r['lines'][-3:]} {r['stderr'][-300:]}")
    return n / (marks["BENCH end"] - marks["BENCH start"])


ROWS = [
    ("launch -> first serial byte (ms, lower is better)", "first_byte_ms", False),
    ("launch -> exit, `hello` (ms, lower is better)", "exit_ms", False),
    ("port-I/O exits per second (higher is better)", "pio_exits_per_s", True),
    ("MMIO exits per second (higher is better)", "mmio_exits_per_s", True),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds (corral, then each QEMU machine)")
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--qemu-accel", default="kvm")
    ap.add_argument("--qemu-machine", default="pc,microvm", help="comma-separated QEMU machine types")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--cpus", default=None, help="pin every VMM to these CPUs (taskset -c), e.g. 0-1")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    kernel = build_probe()
    machines = [m.strip() for m in args.qemu_machine.split(",") if m.strip()]
    vmms = {"corral": lambda c: pin(corral_cmd(kernel, c, 1, args.memory), args.cpus)}
    for mach in machines:
        vmms[f"QEMU -M {mach}"] = (
            lambda m: lambda c: pin(qemu_cmd(kernel, c, 1, args.memory, args.qemu_accel, m), args.cpus)
        )(mach)

    def side(mk):
        def measure() -> dict[str, float]:
            r = launch(mk("hello"))
            r["pio_exits_per_s"] = exits_per_s(mk(f"pio-bench {args.exits}"), args.exits)
            r["mmio_exits_per_s"] = exits_per_s(mk(f"mmio-bench {args.exits}"), args.exits)
            return r

        return measure

    runs = interleave(args.runs, {name: side(mk) for name, mk in vmms.items()})
    qemus = [k for k in runs if k != "corral"]
    md = [
        host_line(args.runs, args.cpus) + f" {args.exits:,} exits per exit run; ratio > 1: corral is better.",
        "",
        "| metric | corral | "
        + " | ".join(qemus)
        + " | "
        + " | ".join(f"corral vs {q}" for q in qemus)
        + " |",
        "|---|" + "---:|" * (1 + 2 * len(qemus)),
    ]
    for label, key, higher in ROWS:
        fmt = "{:,.0f}" if higher else "{:,.1f}"
        col = {name: [r[key] for r in rs] for name, rs in runs.items()}
        cells = [spread(col[n], fmt) for n in ["corral", *qemus]]
        cells += [ratio(col["corral"], col[q], higher) for q in qemus]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(md)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_bench.json").write_text(json.dumps({"runs": runs, "exits": args.exits}, indent=2))
    (args.out / "probe_bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
