#!/usr/bin/env python3
"""Firmware boot time in the lab: SeaBIOS -> SYSLINUX -> Debian from an MBR disk, corral beside
QEMU `-M pc`, same BIOS image, same disk.

The disk is the `debian-disk` recipe (corral.images.bootdisk: SYSLINUX's MBR, a FAT16 boot
partition with Debian's cloud kernel and corral's busybox initramfs) with `cat /proc/uptime` as
the guest's first command, built on the host before the lab boots. Inside the lab (QEMU TCG with
emulated SVM, see tests/lab), on its SVM-backed /dev/kvm, corral (`--firmware seabios --disk`)
and QEMU (`-M pc -bios bios-256k.bin`, the disk on virtio-blk) boot it in alternation (corral,
QEMU, corral, QEMU...) so the lab's slow and fast moments land on both. Each run reports the wall
time from launch to the guest's first command (bench/lab_boot_timer.py) and the guest's uptime
then; the table gives median (min-max).

OVMF is not measured: the lab's QEMU does not boot OVMF yet (see tests/lab/test_lab_ovmf.py).

    python bench/lab_firmware_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from support.labhost import LabHost  # noqa: E402

from corral.boot import firmware  # noqa: E402
from corral.images.bootdisk import build_bios_disk  # noqa: E402
from corral.images.debian_image import resolve_bzimage  # noqa: E402
from interleave import RunFailed, interleave, spread  # noqa: E402

APPEND = "console=ttyS0 panic=-1 reboot=acpi quiet -- cat /proc/uptime"
MEMORY = "512M"
PY = os.environ.get("CORRAL_PY", f"{ROOT}/.venv/bin/python")
CORRAL = ["env", f"PYTHONPATH={ROOT}/src", PY, "-m", "corral"]  # this checkout's sources
CAP_S = 600  # one boot, launch to exit, inside the lab


def commands(disk: Path, bios: Path) -> dict[str, list[str]]:
    corral = CORRAL + ["run", "--firmware", str(bios), "--disk", f"{disk},ro", "--memory", MEMORY]
    corral += ["--cpu-hide", "xsave", "--no-reboot"]
    qemu = ["qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-bios", str(bios), "-m", MEMORY]
    qemu += ["-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]
    qemu += ["-no-reboot", "-drive", f"file={disk},if=virtio,format=raw,readonly=on"]
    return {"corral --firmware seabios --disk": corral, "QEMU -M pc -bios (virtio-blk)": qemu}


def measure(lab: LabHost, cmd: list[str]) -> dict[str, float]:
    res = lab.run(f"{PY} {ROOT}/bench/lab_boot_timer.py {CAP_S} {shlex.join(cmd)}", timeout=CAP_S + 60)
    lines = res.output.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else {}
    except ValueError:
        data = {}
    if data.get("to_command_s") is None:
        tail = data.get("tail") or res.output[-1500:]
        raise RunFailed(f"no first command (status {res.status}); tail:\n{tail}")
    return {"wall": data["to_command_s"], "uptime": data["guest_uptime_s"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    bios = firmware.resolve("seabios")  # the one image both VMMs are given
    kernel, initrd = resolve_bzimage()
    scratch = Path.home() / ".cache" / "corral" / "lab-scratch"  # where the lab sees host files
    disk = scratch / f"firmware-bench-{os.getpid()}.img"
    build_bios_disk(disk, kernel, initrd, APPEND)
    try:
        with LabHost() as lab:
            sides = {name: (lambda c=cmd: measure(lab, c)) for name, cmd in commands(disk, bios).items()}
            runs = interleave(args.runs, sides)
    finally:
        disk.unlink(missing_ok=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    lines = [
        f"Measured {date} in the lab (QEMU TCG `-cpu max` with emulated SVM, one lab CPU); "
        f"SeaBIOS ({bios}) -> SYSLINUX -> Debian cloud kernel + corral's busybox initramfs from "
        f"an MBR disk on virtio-blk, {MEMORY}, 1 vCPU; corral and QEMU interleaved, "
        f"{args.runs} rounds: median (min-max), n = runs that reached the first command.",
        "",
        "| VMM (inside the lab, on its SVM /dev/kvm) | n | launch -> first command, wall (s) "
        "| guest uptime at first command (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, samples in runs.items():
        wall = spread([s["wall"] for s in samples], "{:.1f}")
        up = spread([s["uptime"] for s in samples], "{:.2f}")
        lines.append(f"| {name} | {len(samples)} | {wall} | {up} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lab_firmware.json").write_text(json.dumps({"date": date, "runs": runs}, indent=2))
    (args.out / "lab_firmware.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
