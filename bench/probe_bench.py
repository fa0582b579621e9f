#!/usr/bin/env python3
"""Side-by-side: the probe guest under corral and under QEMU (KVM, same host, same binary).

Measures, per VMM: launch -> first serial byte, launch -> exit (probe `hello`), and exits per
second for `pio-bench N` and `mmio-bench N` (timed between the probe's `BENCH start` and
`BENCH end` lines as they reach the host). Prints a table with ratios and writes JSON and a
Markdown table under bench/results/.

    python bench/probe_bench.py [--runs 5] [--exits 200000] [--qemu-accel kvm]

`--launch N` measures only the launch, interleaved round by round (corral, then QEMU -M
microvm, and with `--before DIR` the corral of another checkout too), N rounds, median (min-max)
of each: background load lands on every side alike. Each corral tree's sources are compiled to
bytecode first, as an installed wheel's are: with PYTHONDONTWRITEBYTECODE set, a source tree
would otherwise compile every module on every launch.

    python bench/probe_bench.py --launch 7 [--before /tmp/main]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from support.qemu_probe import qemu_probe_cmd  # noqa: E402

from corral.images.probe import build_probe  # noqa: E402


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


def corral_tree_cmd(tree: Path, kernel: Path, cmdline: str, memory: str) -> list[str]:
    """`corral run` from the checkout at `tree` (this interpreter and its dependencies)."""
    boot = f"import sys; sys.path.insert(0, {str(tree / 'src')!r}); from corral.cli import main; main()"
    return [sys.executable, "-c", boot, *corral_cmd(kernel, cmdline, 1, memory)[1:]]


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
            raise RuntimeError(f"timed out: {' '.join(cmd)}")
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


def bench_launch(cmd: list[str], runs: int) -> dict:
    firsts, totals = [], []
    for _ in range(runs):
        r = timed_run(cmd)
        if not any(line.startswith("RESULT hello=1") for _, line in r["lines"]):
            raise RuntimeError(f"hello failed: {r['lines'][-5:]} {r['stderr'][-500:]}")
        firsts.append(r["first_byte"])
        totals.append(r["total"])
    return {"first_byte_ms": statistics.median(firsts) * 1e3, "exit_ms": statistics.median(totals) * 1e3}


def bench_exits(cmd: list[str], n: int, runs: int) -> float:
    rates = []
    for _ in range(runs):
        r = timed_run(cmd)
        marks = {line: t for t, line in r["lines"] if line in ("BENCH start", "BENCH end")}
        if len(marks) != 2:
            raise RuntimeError(f"no BENCH markers: {r['lines'][-5:]} {r['stderr'][-500:]}")
        rates.append(n / (marks["BENCH end"] - marks["BENCH start"]))
    return statistics.median(rates)


def spread(values: list[float]) -> str:
    """median (min-max), in ms"""
    ms = [v * 1e3 for v in values]
    return f"{statistics.median(ms):,.1f} ({min(ms):,.1f}-{max(ms):,.1f})"


def launch_rounds(kernel: Path, rounds: int, memory: str, accel: str, before: Path | None) -> str:
    """Launch -> first serial byte and -> exit (`hello`), interleaved, as a Markdown table."""
    vmms = {"corral": corral_tree_cmd(ROOT, kernel, "hello", memory)}
    if before is not None:
        vmms[f"corral at {before.name}"] = corral_tree_cmd(before, kernel, "hello", memory)
    vmms["QEMU -M microvm"] = qemu_cmd(kernel, "hello", 1, memory, accel, "microvm")
    for tree in [ROOT] + ([before] if before is not None else []):
        compileall.compile_dir(tree / "src" / "corral", quiet=1)
    firsts: dict[str, list[float]] = {k: [] for k in vmms}
    totals: dict[str, list[float]] = {k: [] for k in vmms}
    for _ in range(1 + rounds):  # a first round that warms the page cache, not counted
        for name, cmd in vmms.items():
            r = timed_run(cmd)
            if not any(line.startswith("RESULT hello=1") for _, line in r["lines"]):
                raise RuntimeError(f"{name}: hello failed: {r['lines'][-5:]} {r['stderr'][-500:]}")
            firsts[name].append(r["first_byte"])
            totals[name].append(r["total"])
    for d in (firsts, totals):
        for k in d:
            del d[k][0]
    qemu = statistics.median(firsts["QEMU -M microvm"])
    load = os.getloadavg()
    md = [
        f"{rounds} rounds, interleaved; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end",
        "",
        "| VMM | launch -> first serial byte (ms) | launch -> exit, `hello` (ms) "
        "| first byte / QEMU microvm |",
        "|---|---:|---:|---:|",
    ]
    for name in vmms:
        ratio = statistics.median(firsts[name]) / qemu
        md.append(f"| {name} | {spread(firsts[name])} | {spread(totals[name])} | {ratio:.2f}x |")
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--launch", type=int, metavar="N", help="only the launch: N interleaved rounds")
    ap.add_argument("--before", type=Path, help="with --launch: another corral checkout to launch too")
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--qemu-accel", default="kvm")
    ap.add_argument("--qemu-machine", default="pc,microvm", help="comma-separated QEMU machine types")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    kernel = build_probe()
    if args.launch:
        table = launch_rounds(kernel, args.launch, args.memory, args.qemu_accel, args.before)
        print(table)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "launch_bench.md").write_text(table + "\n")
        return 0
    machines = [m.strip() for m in args.qemu_machine.split(",") if m.strip()]
    vmms = {"corral": lambda c: corral_cmd(kernel, c, 1, args.memory)}
    for mach in machines:
        vmms[f"QEMU -M {mach}"] = (
            lambda m: lambda c: qemu_cmd(kernel, c, 1, args.memory, args.qemu_accel, m)
        )(mach)
    results: dict[str, dict] = {}
    for name, mk in vmms.items():
        print(f"[{name}] launch x{args.runs} ...", file=sys.stderr, flush=True)
        r = bench_launch(mk("hello"), args.runs)
        print(f"[{name}] pio-bench {args.exits} ...", file=sys.stderr, flush=True)
        r["pio_exits_per_s"] = bench_exits(mk(f"pio-bench {args.exits}"), args.exits, max(1, args.runs // 2))
        print(f"[{name}] mmio-bench {args.exits} ...", file=sys.stderr, flush=True)
        r["mmio_exits_per_s"] = bench_exits(
            mk(f"mmio-bench {args.exits}"), args.exits, max(1, args.runs // 2)
        )
        results[name] = r

    corral = results["corral"]
    qemus = [k for k in results if k != "corral"]
    rows = [
        ("launch -> first serial byte (ms, lower is better)", "first_byte_ms", False),
        ("launch -> exit, `hello` (ms, lower is better)", "exit_ms", False),
        ("port-I/O exits per second (higher is better)", "pio_exits_per_s", True),
        ("MMIO exits per second (higher is better)", "mmio_exits_per_s", True),
    ]
    host = f"{platform.node()}: {os.cpu_count()} CPUs, kernel {platform.release()}"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        host += f", {model}"
    except (OSError, StopIteration):
        pass
    pvm = os.path.isdir("/sys/module/kvm_pvm")
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    kvm_kind = "PVM (no hardware virtualization)" if pvm else "hardware-backed"
    md = [
        f"Measured {date} on {host}; /dev/kvm is {kvm_kind}; "
        f"QEMU {args.qemu_accel}, same probe binary; median of {args.runs} launches, {args.exits} exits per "
        f"exit benchmark. Ratio > 1: corral is better.",
        "",
        "| metric | corral | "
        + " | ".join(qemus)
        + " | "
        + " | ".join(f"corral vs {q}" for q in qemus)
        + " |",
        "|---|" + "---:|" * (1 + 2 * len(qemus)),
    ]
    for label, key, higher in rows:
        fmt = (lambda v: f"{v:,.0f}") if higher else (lambda v: f"{v:,.1f}")
        vals = [fmt(corral[key])] + [fmt(results[q][key]) for q in qemus]
        ratios = [
            f"{(corral[key] / results[q][key]) if higher else (results[q][key] / corral[key]):.2f}x"
            for q in qemus
        ]
        md.append(f"| {label} | " + " | ".join(vals + ratios) + " |")
    table = "\n".join(md)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_bench.json").write_text(
        json.dumps(
            {
                "date": date,
                "host": host,
                "pvm": pvm,
                "runs": args.runs,
                "exits": args.exits,
                "results": results,
            },
            indent=2,
        )
    )
    (args.out / "probe_bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
