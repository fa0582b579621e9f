#!/usr/bin/env python3
"""Side-by-side: the probe guest under corral and under QEMU (KVM, same host, same binary).

Measures, per VMM: launch -> first serial byte, launch -> exit (probe `hello`), and exits per
second for `pio-bench N` and `mmio-bench N` (timed between the probe's `BENCH start` and
`BENCH end` lines as they reach the host), the VMMs in alternation round by round (corral, QEMU
pc, QEMU microvm, corral...) with the same CPU pinning, each run capped in time. Prints median
(min-max) with ratios and writes JSON and a Markdown table under bench/results/.

    python bench/probe_bench.py [--runs 5] [--exits 200000] [--qemu-accel kvm] [--cpus 0-1]

`--launch N` measures only the launch, interleaved round by round (corral, then QEMU -M
microvm, and with `--before DIR` the corral of another checkout too), N rounds, median (min-max)
of each: background load lands on every side alike. Each corral tree's sources are compiled to
bytecode first, as an installed wheel's are: with PYTHONDONTWRITEBYTECODE set, a source tree
would otherwise compile every module on every launch.

    python bench/probe_bench.py --launch 7 [--before /tmp/main]

`--smp 1,2,4` measures only exits per second with 1, 2 and 4 vCPUs, every vCPU running the
probe's loop at once (`pio-bench N all`: N exits each), corral and QEMU -M microvm interleaved.

    python bench/probe_bench.py --smp 1,2,4 --exits 20000 --cpus 0-1
"""

from __future__ import annotations

import argparse
import compileall
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
    """`corral run` of `kernel`: the `corral` beside this interpreter."""
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


def exits_per_s(cmd: list[str], n: int | None = None, timeout: float = 300.0) -> float:
    """Exits per second between the BENCH markers as they reach the host: `n` exits, or (None)
    the total the probe reports (`RESULT pio_exits=...`, every vCPU's with `all`)."""
    r = timed_run(cmd, timeout)
    marks = {line: t for t, line in r["lines"] if line in ("BENCH start", "BENCH end")}
    if len(marks) != 2:
        raise RunFailed(f"no BENCH markers: {r['lines'][-3:]} {r['stderr'][-300:]}")
    if n is None:
        res = {
            k: v
            for _, line in r["lines"]
            if line.startswith("RESULT ")
            for k, _, v in (w.partition("=") for w in line.split()[1:])
        }
        total = res.get("pio_exits", res.get("mmio_exits"))
        if total is None:
            raise RunFailed(f"no exit count: {r['lines'][-3:]}")
        n = int(total)
    return n / (marks["BENCH end"] - marks["BENCH start"])


def smp_rounds(kernel: Path, counts: list[int], args: argparse.Namespace) -> str:
    """Exits per second with every vCPU looping at once (`pio-bench N all`), for each vCPU count,
    corral and QEMU -M microvm interleaved round by round under the same pinning and cap."""
    vmms = {
        "corral": lambda c, n: corral_cmd(kernel, c, n, args.memory),
        "QEMU -M microvm": lambda c, n: qemu_cmd(kernel, c, n, args.memory, args.qemu_accel, "microvm"),
    }

    def side(mk):
        def measure() -> dict[str, float]:
            r = {}
            for n in counts:
                for kind in ("pio", "mmio"):
                    cmd = pin(mk(f"{kind}-bench {args.exits} all", n), args.cpus)
                    r[f"{kind}{n}"] = exits_per_s(cmd, None, args.timeout)
            return r

        return measure

    runs = interleave(args.runs, {name: side(mk) for name, mk in vmms.items()})
    md = [
        host_line(args.runs, args.cpus)
        + f" {args.exits:,} exits per vCPU per run, every vCPU at once; ratio > 1: corral is better.",
        "",
        "| exits per second (higher is better) | vCPUs | corral | QEMU -M microvm | corral vs QEMU |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, label in (("pio", "port I/O"), ("mmio", "MMIO")):
        for n in counts:
            c = [r[f"{kind}{n}"] for r in runs["corral"]]
            q = [r[f"{kind}{n}"] for r in runs["QEMU -M microvm"]]
            md.append(f"| {label} | {n} | {spread(c)} | {spread(q)} | {ratio(c, q)} |")
    return "\n".join(md)


ROWS = [
    ("launch -> first serial byte (ms, lower is better)", "first_byte_ms", False),
    ("launch -> exit, `hello` (ms, lower is better)", "exit_ms", False),
    ("port-I/O exits per second (higher is better)", "pio_exits_per_s", True),
    ("MMIO exits per second (higher is better)", "mmio_exits_per_s", True),
]


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
    qemu = firsts["QEMU -M microvm"]
    load = os.getloadavg()
    md = [
        f"{rounds} rounds, interleaved; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end",
        "",
        "| VMM | launch -> first serial byte (ms) | launch -> exit, `hello` (ms) "
        "| first byte vs QEMU microvm (> 1: corral faster) |",
        "|---|---:|---:|---:|",
    ]
    for name in vmms:
        ms = "{:,.1f}"
        first, total = [v * 1e3 for v in firsts[name]], [v * 1e3 for v in totals[name]]
        vs = ratio(firsts[name], qemu, higher_is_better=False)
        md.append(f"| {name} | {spread(first, ms)} | {spread(total, ms)} | {vs} |")
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds (corral, then each QEMU machine)")
    ap.add_argument("--launch", type=int, metavar="N", help="only the launch: N interleaved rounds")
    ap.add_argument("--before", type=Path, help="with --launch: another corral checkout to launch too")
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--qemu-accel", default="kvm")
    ap.add_argument("--qemu-machine", default="pc,microvm", help="comma-separated QEMU machine types")
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--cpus", default=None, help="pin every VMM to these CPUs (taskset -c), e.g. 0-1")
    ap.add_argument("--smp", metavar="1,2,4", help="only exits per second with these vCPU counts")
    ap.add_argument("--timeout", type=float, default=300.0, help="cap per run, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    kernel = build_probe()
    if args.launch:
        table = launch_rounds(kernel, args.launch, args.memory, args.qemu_accel, args.before)
        print(table)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "launch_bench.md").write_text(table + "\n")
        return 0
    if args.smp:
        table = smp_rounds(kernel, [int(n) for n in args.smp.split(",")], args)
        print(table)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "smp_exits_bench.md").write_text(table + "\n")
        return 0
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
