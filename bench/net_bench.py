#!/usr/bin/env python3
"""Side-by-side virtio-net, transmit and receive: the probe's ring-3 polling drivers under corral
and under QEMU's virtio-net-pci on the same persistent tap (same host, same probe binary),
interleaved (corral, QEMU, corral, QEMU...) with the same CPU pinning for both.

Transmit: `net-bench N` sends 60-byte frames; frames/s = frames the host's tap really received /
guest time (TSC between the guest's BENCH markers). Receive: the host floods the tap with
60-byte sequence-numbered frames (tests/support/netflood.c, paced so it leaves CPU to the VMM)
while `net-rx-bench N` counts them; frames/s = N / guest time from the first frame to the last.
A run is valid only if every frame the guest counted is accounted for (transmit: the host saw
each; receive: none out of order or short); the table shows failures, never hides them. Every
run has a time cap, the flood a time and frame cap.

    python bench/net_bench.py [--runs 5] [--frames 100000] [--rx-frames 50000] [--cpus 0-1]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from support.netflood import Flood  # noqa: E402

from corral.images.probe import build_probe  # noqa: E402
from interleave import RunFailed, capped, host_line, interleave, pin, ratio, spread  # noqa: E402
from probe_bench import corral_cmd, qemu_cmd  # noqa: E402

TAP = "crlbench0"
RESULT = re.compile(r"RESULT net_tx_frames=(\d+) tsc=(\d+) tsc_hz=(\d+)")
RX_RESULT = re.compile(
    r"RESULT net_rx_frames=(\d+) net_rx_bytes=\d+ net_rx_errors=(\d+) net_rx_other=\d+ "
    r"net_rx_kicks=\d+ net_rx_timeout=(\d) tsc=(\d+) tsc_hz=(\d+)"
)
QEMU = "QEMU -M pc virtio-net-pci"


def host_rx_packets() -> int:
    return int(Path(f"/sys/class/net/{TAP}/statistics/rx_packets").read_text())


def one(cmd: list[str], timeout: float = 300) -> dict:
    """One transmit run: frames/s the host received, and what each side counted."""
    before = host_rx_packets()
    out = capped(cmd, timeout)
    seen = host_rx_packets() - before
    m = RESULT.search(out)
    if not m:
        raise RunFailed(f"no net RESULT from {' '.join(cmd[:3])}...: {out[-300:]!r}")
    sent, tsc, hz = map(int, m.groups())
    return {"guest_sent": sent, "host_seen": seen, "fps": seen / (tsc / hz)}


def one_rx(cmd: list[str], timeout: float = 300) -> dict:
    """One receive run under a flood capped at `timeout` seconds."""
    with Flood(TAP, seconds=timeout) as flood:
        out = capped(cmd, timeout)
    m = RX_RESULT.search(out)
    if not m:
        raise RunFailed(f"no net-rx RESULT from {' '.join(cmd[:3])}...: {out[-300:]!r}")
    got, errors, timed_out, tsc, hz = map(int, m.groups())
    if timed_out or not tsc:
        raise RunFailed(f"the guest received {got} frames before its time limit")
    return {
        "rx_frames": got,
        "rx_errors": errors,
        "rx_fps": got / (tsc / hz),
        "offered": flood.result["sent"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="pairs (corral, QEMU)")
    ap.add_argument("--frames", type=int, default=100_000, help="frames sent per transmit run")
    ap.add_argument("--rx-frames", type=int, default=50_000, help="frames counted per receive run")
    ap.add_argument("--cpus", default=None, help="pin every VMM to these CPUs (taskset -c), e.g. 0-1")
    ap.add_argument("--timeout", type=float, default=120, help="cap on each run, seconds")
    args = ap.parse_args()
    kernel = build_probe()
    subprocess.run(["ip", "tuntap", "add", TAP, "mode", "tap"], capture_output=True)
    subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
    Path(f"/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6").write_text("1")  # only the bench's frames

    def cmd(vmm: str, cmdline: str) -> list[str]:
        if vmm == "corral":
            return pin(corral_cmd(kernel, cmdline, 1, "256M") + ["--net", f"tap={TAP}"], args.cpus)
        nic = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no"]
        nic += ["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]
        return pin(qemu_cmd(kernel, cmdline, 1, "256M", "kvm", "pc") + nic, args.cpus)

    def side(vmm: str):
        def measure() -> dict[str, float]:
            tx = one(cmd(vmm, f"net-bench {args.frames}"), args.timeout)
            rx = one_rx(cmd(vmm, f"net-rx-bench {args.rx_frames} {int(args.timeout) - 10}"), args.timeout)
            return tx | rx

        return measure

    try:
        runs = interleave(args.runs, {"corral": side("corral"), QEMU: side(QEMU)})
    finally:
        subprocess.run(["ip", "tuntap", "del", TAP, "mode", "tap"], capture_output=True)
    print(host_line(args.runs, args.cpus))
    print(
        f"Probe ring-3 polling drivers, 60-byte frames; transmit {args.frames:,} frames per run, "
        f"receive {args.rx_frames:,} per run under a paced flood.\n"
    )
    print(f"| measure | corral | {QEMU} | corral / QEMU |")
    print("|---|---:|---:|---:|")
    c, q = runs["corral"], runs[QEMU]
    for label, key in (("transmit frames/s", "fps"), ("receive frames/s", "rx_fps")):
        a, b = [r[key] for r in c], [r[key] for r in q]
        print(f"| {label} | {spread(a)} | {spread(b)} | {ratio(a, b)} |")
    for name, rs in runs.items():
        lost = sum(r["guest_sent"] - r["host_seen"] for r in rs)
        bad = sum(r["rx_errors"] for r in rs)
        offered = spread([r["offered"] / 1e3 for r in rs], "{:,.0f}")
        print(
            f"\n{name}: {len(rs)}/{args.runs} runs valid; transmit frames completed but not seen by "
            f"the host: {lost}; receive frames out of order or short: {bad}; flood accepted by the "
            f"tap per run (thousands): {offered}",
            end="",
        )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
