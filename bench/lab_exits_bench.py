#!/usr/bin/env python3
"""Exits per second in the lab: the probe guest under corral beside QEMU -M microvm, both on the
lab's real SVM-backed /dev/kvm.

This host's /dev/kvm is PVM (the shared notes, kvm-here.md), so the figures of
bench/probe_bench.py are PVM's. This bench boots the lab once (QEMU TCG `-cpu max` with emulated
AMD SVM and kvm-amd, tests/support/labhost.py) and measures inside it, on hardware-style
virtualization:
- the probe's `pio-bench N` (`out` to port 0x504 from ring 3) and `mmio-bench N` (32-bit stores
  to 0xD0000000 from ring 3), with 1 vCPU, and with 2 vCPUs (4 too where the lab has 4 CPUs)
  all looping at once (`pio-bench N/C all`: N/C exits on each of the C vCPUs);
- under `corral run` from this checkout's sources and under QEMU `-M microvm -accel kvm` with
  tests/support/qemu_probe.py's command line, the same probe binary;
- exits per second timed between the probe's `BENCH start` and `BENCH end` lines as they reach
  the VMM's reader in the lab (bench/probe_bench.py's exits_per_s), over the total the probe
  reports (`RESULT pio_exits=...`).
Rounds alternate corral and QEMU (bench/interleave.py): median (min-max) and the ratio. Each
side's round is one command in the lab, this script run there with `--inside corral|qemu`.
N is picked first, in the lab, from one short run of each VMM and kind, so that a run at their
median rate takes about --seconds; --exits gives it instead. With --dispatch-runs > 0 (the default)
bench/dispatch_bench.py runs in the lab afterwards, as it is: corral's own time per exit there.
Prints the tables and writes them to bench/results/lab_exits_bench.md.

    python bench/lab_exits_bench.py [--runs 5] [--seconds 3] [--exits N] [--smp 1,2]
                                    [--dispatch-runs 5] [--dispatch-exits 50000]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from support.qemu_probe import qemu_probe_cmd  # noqa: E402

from interleave import RunFailed, host_line, interleave, ratio, spread  # noqa: E402
from probe_bench import exits_per_s  # noqa: E402

SCRIPT = Path(__file__).resolve()
PY = sys.executable  # the lab sees the host's root: the same interpreter, the same path
KINDS = (("pio", "port I/O"), ("mmio", "MMIO"))
VMMS = {"corral": "corral", "qemu": "QEMU -M microvm"}
CALIBRATION_EXITS = 20_000


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- what runs inside the lab ---------------------------------------------------------------------


def vmm_cmd(vmm: str, kernel: Path, cmdline: str, cpus: int, memory: str) -> list[str]:
    """The probe under `vmm`: corral from this checkout's sources, or QEMU -M microvm on KVM."""
    if vmm == "corral":
        return [
            PY, "-m", "corral", "run", "--kernel", str(kernel), "--cmdline", cmdline,
            "--cpus", str(cpus), "--memory", memory, "--no-reboot",
        ]  # fmt: skip
    return qemu_probe_cmd(cmdline, cpus, "kvm", kernel=kernel, machine="microvm", memory=memory)


def inside(args: argparse.Namespace) -> int:
    """One side's round in the lab: every (vCPUs, kind) once; one JSON line on stdout."""
    if args.inside == "info":
        info = {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu_model()}
        info["kvm"] = os.path.exists("/dev/kvm")
        info["svm"] = " svm " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
        q = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
        info["qemu"] = q.stdout.splitlines()[0] if q.returncode == 0 and q.stdout else "none"
        try:
            from corral.vstate import vcpu

            info["exit_loop"] = "compiled" if vcpu.EXIT_LOOP else "Python"
        except Exception as exc:  # noqa: BLE001 - said in the report, not fatal here
            info["exit_loop"] = f"unknown ({type(exc).__name__}: {exc})"
        print(json.dumps(info))
        return 0
    os.environ["PYTHONPATH"] = str(ROOT / "src")  # `python -m corral` from this checkout
    out: dict[str, float] = {}
    try:
        for n in [int(c) for c in args.smp.split(",")]:
            each = max(1, args.exits // n)
            for kind, _ in KINDS:
                cmdline = f"{kind}-bench {each}" + (" all" if n > 1 else "")
                cmd = vmm_cmd(args.inside, args.kernel, cmdline, n, args.memory)
                out[f"{kind}{n}"] = exits_per_s(cmd, None, args.timeout)
    except RunFailed as exc:
        print(json.dumps({"error": str(exc), "done": out}))
        return 1
    print(json.dumps(out))
    return 0


# --- the host side --------------------------------------------------------------------------------


def in_lab(lab, argv: list[str], timeout: float) -> dict:
    """This script run in the lab with `argv`; its JSON line, or RunFailed."""
    res = lab.run(f"{shlex.quote(PY)} {shlex.quote(str(SCRIPT))} " + shlex.join(argv), timeout=timeout)
    lines = [line for line in res.output.splitlines() if line.startswith("{")]
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if res.status != 0 or not isinstance(data, dict) or "error" in data:
        why = data.get("error") if isinstance(data, dict) and "error" in data else f"status {res.status}"
        raise RunFailed(f"{why}; output tail:\n{res.output[-1500:]}")
    return data


def side_argv(vmm: str, kernel: Path, exits: int, smp: str, args: argparse.Namespace) -> list[str]:
    return [
        "--inside", vmm, "--kernel", str(kernel), "--exits", str(exits), "--smp", smp,
        "--memory", args.memory, "--timeout", str(args.timeout),
    ]  # fmt: skip


def round_down(x: float) -> int:
    """x to two significant digits, down (so 63,412 -> 63,000)."""
    digits = max(0, len(str(int(x))) - 2)
    return max(1000, int(x) // 10**digits * 10**digits)


def calibrate(lab, kernel: Path, args: argparse.Namespace) -> tuple[int, dict[str, dict[str, float]]]:
    """N such that a run takes about --seconds with 1 vCPU at the median of the rates of one run
    of CALIBRATION_EXITS of each VMM and kind."""
    rates = {}
    for vmm in VMMS:
        print(f"[calibrate] {VMMS[vmm]}, {CALIBRATION_EXITS:,} exits", file=sys.stderr, flush=True)
        argv = side_argv(vmm, kernel, CALIBRATION_EXITS, "1", args)
        rates[vmm] = in_lab(lab, argv, 2 * args.timeout + 60)
        print("  " + figures(rates[vmm]), file=sys.stderr, flush=True)
    # the median rate: one run slowed by the host's other work must not halve N for the whole bench
    typical = statistics.median(r for d in rates.values() for r in d.values())
    return round_down(typical * args.seconds), rates


def figures(r: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:,.0f}/s" for k, v in r.items())


def dispatch_in_lab(lab, args: argparse.Namespace) -> str:
    """bench/dispatch_bench.py run in the lab as it is; its table (stdout), or why not."""
    cmd = (
        f"{shlex.quote(PY)} {shlex.quote(str(ROOT / 'bench' / 'dispatch_bench.py'))} "
        f"--runs {args.dispatch_runs} --exits {args.dispatch_exits} --timeout {args.timeout:.0f} "
        "2>/tmp/dispatch.err; rc=$?; [ $rc = 0 ] || tail -20 /tmp/dispatch.err; exit $rc"
    )
    t0 = time.monotonic()
    res = lab.run(cmd, timeout=args.dispatch_cap)
    took = time.monotonic() - t0
    print(f"[dispatch] {took:.0f} s, status {res.status}", file=sys.stderr, flush=True)
    if res.status != 0:
        tail = res.output[-2000:]
        return f"bench/dispatch_bench.py did not finish in the lab (status {res.status}):\n\n```\n{tail}\n```"
    return res.output.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds (corral, then QEMU)")
    ap.add_argument(
        "--exits", type=int, default=0, help="exits per run (each of C vCPUs does 1/C); 0: calibrate"
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="with calibration: the slowest run's length")
    ap.add_argument(
        "--smp", default=None, help="vCPU counts, e.g. 1,2 (default 1,2, and 4 if the lab has 4 CPUs)"
    )
    ap.add_argument("--memory", default="256M", help="the probe guest's memory")
    ap.add_argument("--lab-cpus", type=int, default=1, help="the lab VM's vCPUs (LabHost's default: 1)")
    ap.add_argument("--lab-memory", default="4G")
    ap.add_argument("--timeout", type=float, default=120.0, help="cap per VMM run in the lab, seconds")
    ap.add_argument(
        "--dispatch-runs",
        type=int,
        default=None,
        help="rounds of dispatch_bench.py in the lab (--runs); 0: skip",
    )
    ap.add_argument("--dispatch-exits", type=int, default=50_000)
    ap.add_argument("--dispatch-cap", type=float, default=900.0, help="cap on dispatch_bench.py, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--inside", choices=["corral", "qemu", "info"], help=argparse.SUPPRESS)
    ap.add_argument("--kernel", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inside:
        return inside(args)
    if args.dispatch_runs is None:
        args.dispatch_runs = args.runs

    from support.labhost import LabHost, ensure_lab_images

    from corral.images.probe import build_probe

    t_start = time.monotonic()
    # everything the lab reads is made here first: it sees this host's files over a cached 9p
    kernel = build_probe()
    compileall.compile_dir(ROOT / "src" / "corral", quiet=1)  # else every launch there compiles
    lab_kernel, lab_initrd = ensure_lab_images(progress=True)
    host_qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    host_qemu_version = host_qemu.stdout.split("\n", 1)[0].removeprefix("QEMU emulator version ")
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 is not installed: no lab", file=sys.stderr)
        return 1
    head = host_line(
        args.runs, None, what=f"CPU {cpu_model()}; corral and QEMU interleaved round by round inside the lab"
    )
    print(f"[lab] booting ({args.lab_cpus} vCPU, {args.lab_memory})", file=sys.stderr, flush=True)
    with LabHost(cpus=args.lab_cpus, memory=args.lab_memory, kernel=lab_kernel, initrd=lab_initrd) as lab:
        print(f"[lab] up in {lab.boot_seconds:.1f} s", file=sys.stderr, flush=True)
        info = in_lab(lab, ["--inside", "info"], 120)
        print(f"[lab] {info}", file=sys.stderr, flush=True)
        if not info["kvm"]:
            print("the lab has no /dev/kvm", file=sys.stderr)
            return 1
        counts = args.smp or ("1,2,4" if info["nproc"] >= 4 else "1,2")
        if args.exits:
            exits, cal = args.exits, None
        else:
            exits, cal = calibrate(lab, kernel, args)
        print(f"[lab] {exits:,} exits per run, vCPUs {counts}", file=sys.stderr, flush=True)
        cap = 2 * len(counts.split(",")) * args.timeout + 60

        def side(vmm: str):
            def measure() -> dict[str, float]:
                r = in_lab(lab, side_argv(vmm, kernel, exits, counts, args), cap)
                print("  " + figures(r), file=sys.stderr, flush=True)
                return r

            return measure

        runs = interleave(args.runs, {VMMS[v]: side(v) for v in VMMS})
        dispatch = dispatch_in_lab(lab, args) if args.dispatch_runs > 0 else None
    took = time.monotonic() - t_start

    lab_what = (
        f"lab: QEMU {host_qemu_version} `-accel tcg -cpu max` (emulated AMD SVM) on this host, "
        f"{info['nproc']} vCPU, {args.lab_memory}, Debian kernel {info['kernel']} with kvm-amd; inside it, "
        f"on its SVM-backed /dev/kvm: corral from this checkout's sources ({info['exit_loop']} vCPU loop) "
        f"and QEMU {info['qemu'].removeprefix('QEMU emulator version ')} `-M microvm -accel kvm` "
        f"(the same binary), the probe guest with {args.memory}"
    )
    counts_list = [int(c) for c in counts.split(",")]
    shared = [n for n in counts_list if n > info["nproc"]]
    if shared:
        lab_what += (
            f" (the lab has {info['nproc']} vCPU: with {', '.join(map(str, shared))} guest vCPUs they take "
            "turns on it, so those rows measure the VMMs' vCPU threads sharing one CPU, not parallel exits)"
        )
    md = [
        f"{head} The {lab_what}.",
        "",
        f"{exits:,} exits per run (with C vCPUs, {exits:,}/C on each, all at once), timed between the "
        "probe's BENCH markers as the VMM reads them in the lab"
        + (
            f" (N from one {CALIBRATION_EXITS:,}-exit run of each VMM and kind: about {args.seconds:g} s "
            "at their median rate)"
            if cal
            else ""
        )
        + f"; ratio > 1: corral is better. The whole run (lab boot included) took {took / 60:.1f} min.",
        "",
        "| exits per second in the lab (higher is better) | vCPUs | corral | QEMU -M microvm "
        "| corral vs QEMU |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, label in KINDS:
        for n in counts_list:
            c = [r[f"{kind}{n}"] for r in runs[VMMS["corral"]]]
            q = [r[f"{kind}{n}"] for r in runs[VMMS["qemu"]]]
            md.append(f"| {label} | {n} | {spread(c)} | {spread(q)} | {ratio(c, q)} |")
    if dispatch is not None:
        md += ["", "corral's own time per exit in the lab: bench/dispatch_bench.py run there as it is.", ""]
        md.append(dispatch)
    table = "\n".join(md)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lab_exits_bench.md").write_text(table + "\n")
    print(f"[done] {took:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
