#!/usr/bin/env python3
"""Boot time of Debian's cloud kernel in the lab: corral beside QEMU, same kernel and initramfs.

Boots the lab (QEMU TCG with emulated SVM, see tests/lab), then inside it, on its real
SVM-backed /dev/kvm, boots the guest with `cat /proc/uptime` as its first command:
- corral, bzImage and PVH vmlinux;
- QEMU `-M pc` with the bzImage (SeaBIOS) and QEMU `-M microvm` with the PVH vmlinux.
Reports the guest's uptime when its first command starts and the wall time from launch to it.

    python bench/lab_boot_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from support.labhost import LabHost  # noqa: E402

from corral.images.debian_image import resolve_bzimage, resolve_pvh  # noqa: E402

CMDLINE = "console=ttyS0 panic=-1 reboot=acpi quiet -- cat /proc/uptime"
import os  # noqa: E402

PY = os.environ.get("CORRAL_PY", f"{ROOT}/.venv/bin/python")
# corral from this checkout's sources, whichever interpreter runs it
CORRAL = ["env", f"PYTHONPATH={ROOT}/src", PY, "-m", "corral"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    bz, initrd = resolve_bzimage()
    vmlinux, _ = resolve_pvh()
    qemu = [
        "qemu-system-x86_64",
        "-accel",
        "kvm",
        "-m",
        "512M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    vmms = {
        "corral (bzImage)": CORRAL
        + [
            "run",
            "--kernel",
            str(bz),
            "--initrd",
            str(initrd),
            "--memory",
            "512M",
            "--cpu-hide",
            "xsave",
            "--no-reboot",
            "--cmdline",
            CMDLINE,
        ],
        "corral (PVH vmlinux)": CORRAL
        + [
            "run",
            "--kernel",
            str(vmlinux),
            "--initrd",
            str(initrd),
            "--memory",
            "512M",
            "--cpu-hide",
            "xsave",
            "--no-reboot",
            "--cmdline",
            CMDLINE,
        ],
        "QEMU -M pc (bzImage, SeaBIOS)": qemu
        + ["-M", "pc", "-kernel", str(bz), "-initrd", str(initrd), "-append", CMDLINE],
        "QEMU -M microvm (PVH vmlinux)": qemu
        + ["-M", "microvm", "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", CMDLINE],
    }
    results: dict[str, dict] = {}
    with LabHost() as lab:
        for name, cmd in vmms.items():
            samples = []
            for i in range(args.runs):
                print(f"[lab] {name} run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
                quoted = " ".join("'" + c.replace("'", "'\\''") + "'" for c in cmd)
                res = lab.run(f"{PY} {ROOT}/bench/lab_boot_timer.py 420 {quoted}", timeout=480)
                line = res.output.strip().splitlines()[-1] if res.output.strip() else "{}"
                try:
                    data = json.loads(line)
                except ValueError:
                    data = {"tail": res.output[-2000:]}
                if data.get("to_command_s") is None:
                    # one VMM failing to boot must not hide the others' figures
                    print(
                        f"[lab] {name}: no uptime line; tail:\n{data.get('tail', res.output)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                samples.append(data)
            if not samples:
                results[name] = {"guest_uptime_s": None, "to_command_s": None}
                continue
            results[name] = {
                "guest_uptime_s": statistics.median(s["guest_uptime_s"] for s in samples),
                "to_command_s": statistics.median(s["to_command_s"] for s in samples),
            }
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        f"Measured {date} in the lab (QEMU TCG `-cpu max` with emulated SVM on the CI machine kind, "
        f"2 cores); Debian cloud kernel + corral's busybox initramfs, 512 MiB, 1 vCPU, "
        f"median of {args.runs}.",
        "",
        "| VMM (inside the lab, on its SVM /dev/kvm) | guest uptime at first command (s) "
        "| launch -> first command, wall (s) |",
        "|---|---:|---:|",
    ]
    for name, r in results.items():
        if r["to_command_s"] is None:
            lines.append(f"| {name} | did not boot | did not boot |")
        else:
            lines.append(f"| {name} | {r['guest_uptime_s']:.2f} | {r['to_command_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lab_boot.json").write_text(
        json.dumps({"date": date, "runs": args.runs, "results": results}, indent=2)
    )
    (args.out / "lab_boot.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
