#!/usr/bin/env python3
"""Side-by-side virtio-net transmit: the probe's ring-3 polling driver sends minimum-size frames
on its transmit queue under corral and under QEMU's virtio-net-pci, both on the same persistent
tap (same host, same probe binary, in one run).

Frames per second = frames the host's tap actually received / guest time (TSC between the
guest's BENCH markers). The table also shows frames the guest believes it sent and frames the
host saw: when they differ the figure is not valid, and the table says so.

    python bench/net_bench.py [--runs 3] [--frames 200000]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.images.probe import build_probe  # noqa: E402
from probe_bench import corral_cmd, qemu_cmd  # noqa: E402

TAP = "crlbench0"
RESULT = re.compile(r"RESULT net_tx_frames=(\d+) tsc=(\d+) tsc_hz=(\d+)")


def host_rx_packets() -> int:
    return int(Path(f"/sys/class/net/{TAP}/statistics/rx_packets").read_text())


def one(cmd: list[str]) -> dict:
    before = host_rx_packets()
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=300).stdout.decode()
    seen = host_rx_packets() - before
    m = RESULT.search(out)
    if not m:
        raise RuntimeError(f"no net RESULT from {' '.join(cmd[:3])}...:\n{out[-800:]}")
    sent, tsc, hz = map(int, m.groups())
    secs = tsc / hz
    return {"guest_sent": sent, "host_seen": seen, "fps": seen / secs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--frames", type=int, default=200000)
    args = ap.parse_args()
    kernel = build_probe()
    subprocess.run(["ip", "tuntap", "add", TAP, "mode", "tap"], capture_output=True)
    subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
    cmdline = f"net-bench {args.frames}"
    vmms = {
        "corral": corral_cmd(kernel, cmdline, 1, "256M") + ["--net", f"tap={TAP}"],
        "QEMU -M pc virtio-net-pci": qemu_cmd(kernel, cmdline, 1, "256M", "kvm", "pc")
        + [
            "-netdev",
            f"tap,id=n0,ifname={TAP},script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,disable-legacy=on",
        ],
    }
    rows = {}
    try:
        for name, cmd in vmms.items():
            runs = [one(cmd) for _ in range(args.runs)]
            rows[name] = {
                "fps": statistics.median(r["fps"] for r in runs),
                "sent": sum(r["guest_sent"] for r in runs),
                "seen": sum(r["host_seen"] for r in runs),
            }
            print(f"{name}: {rows[name]}", file=sys.stderr)
    finally:
        subprocess.run(["ip", "tuntap", "del", TAP, "mode", "tap"], capture_output=True)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    pvm = os.path.isdir("/sys/module/kvm_pvm")
    print(
        f"Measured {date} on {platform.node() or 'this host'} ({os.cpu_count()} cores; /dev/kvm "
        f"{'PVM' if pvm else 'hardware'}); probe ring-3 polling driver, 60-byte frames, "
        f"{args.frames} per run, median of {args.runs}.\n"
    )
    print("| VMM | frames/s the host received | frames the guest sent | frames the host saw | valid |")
    print("|---|---:|---:|---:|---|")
    for name, r in rows.items():
        valid = "yes" if r["sent"] == r["seen"] else "**no**: completions without frames"
        print(f"| {name} | {r['fps']:,.0f} | {r['sent']:,} | {r['seen']:,} | {valid} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
