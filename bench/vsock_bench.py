#!/usr/bin/env python3
"""virtio-vsock stream throughput, both ways: the probe's ring-3 polling vsock driver under
`corral run --vsock`, its host end a real Unix socket (tests/support/vsock_peer.py).

Transmit (`vsock-tx-bench`): the guest connects to the host (CID 2) and streams SIZE bytes in
64 KiB packets (Linux's largest) within the host's credit; timed by the guest from the connection
to the host's acknowledging the last byte. Receive (`vsock-rx-bench`): the host connects through
the uds (`CONNECT <port>`) and streams SIZE bytes into the guest's listener; timed by the guest from
the first byte to the last, once with 64 KiB receive buffers and once with 4 KiB ones (what Linux
posts, so what a Linux guest would see). A run counts only if both ends saw every byte and their
CRC-32s agree; every run has a time cap.

Two clocks: the host's (transmit: the host end's first byte to its last; receive: the host's
`OK` line to the EOF that the guest's SHUTDOWN brings, so one round trip more) and the guest's
TSC between its BENCH markers over its own calibration (against the PIT in ~10 ms, which a busy
host can throw off by 2x or more: the host clock is the figure to quote).

No peer column unless the host has one: QEMU's vsock is vhost-vsock-pci only (needs
/dev/vhost-vsock), and Firecracker is not packaged; the script says which of them is missing.

    python bench/vsock_bench.py [--runs 5] [--size 64M] [--cpus 0-1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from support.vsock_peer import MiB, Sink, Source  # noqa: E402

from corral.images.probe import build_probe  # noqa: E402
from interleave import RunFailed, capped, host_line, interleave, pin, spread  # noqa: E402
from probe_bench import corral_cmd  # noqa: E402

RESULT = re.compile(
    r"RESULT vsock_(tx|rx)_bytes=(\d+) vsock_\1_crc=0x([0-9a-f]{8}) vsock_\1_packets=(\d+) .*"
    r"vsock_complete=(\d) tsc=(\d+) tsc_hz=(\d+)"
)
MODES = {  # key: (label, command line after PORT SIZE, direction)
    "tx": ("guest -> host, 64 KiB packets", "", "tx"),
    "rx64k": ("host -> guest, 64 KiB receive buffers", "64K", "rx"),
    "rx4k": ("host -> guest, 4 KiB receive buffers (Linux's)", "4K", "rx"),
}


def peer_note() -> str:
    """Why there is (or is not) a VMM to compare with on this host."""
    vhost = os.path.exists("/dev/vhost-vsock")
    fc = shutil.which("firecracker")
    if vhost or fc:
        have = ", ".join(
            x for x in ("/dev/vhost-vsock" if vhost else "", f"firecracker at {fc}" if fc else "") if x
        )
        return f"this host has {have}: a peer column is possible but this script does not drive one yet"
    return (
        "no peer here: no /dev/vhost-vsock (QEMU's only vsock device, vhost-vsock-pci, needs it) and no "
        "firecracker binary (not a Debian package); a host with vhost-vsock gives the QEMU column"
    )


def one(kernel: Path, mode: str, size: int, cpus: str | None, timeout: float) -> dict[str, float]:
    _, extra, direction = MODES[mode]
    port = 5000
    with tempfile.TemporaryDirectory(prefix="vsockbench") as d:
        uds = Path(d) / "v.sock"
        cmdline = f"vsock-{direction}-bench {port} {size // MiB}M {extra}".strip()
        cmd = pin(corral_cmd(kernel, cmdline, 1, "256M") + ["--vsock", f"cid=3,uds={uds}"], cpus)
        peer = Sink(uds, port, timeout) if direction == "tx" else Source(uds, port, size, timeout)
        with peer:
            out = capped(cmd, timeout)
    m = RESULT.search(out)
    if not m:
        raise RunFailed(f"no vsock RESULT from the guest: {out[-300:]!r}")
    _, nbytes, crc, packets, complete, tsc, hz = m.groups()
    if complete != "1" or int(nbytes) != size or peer.result["bytes"] != size:
        raise RunFailed(
            f"{mode}: guest {nbytes} bytes, host {peer.result['bytes']} of {size} ({peer.result['error']})"
        )
    if int(crc, 16) != peer.result["crc"]:
        raise RunFailed(f"{mode}: the guest's CRC 0x{crc} is not the host's 0x{peer.result['crc']:08x}")
    r = peer.result
    host_s = r["last_at"] - r["first_at"] if direction == "tx" else r["eof_at"] - r["ok_at"]
    return {
        "mbs": size / host_s / 1e6,
        "guest_mbs": size / (int(tsc) / int(hz)) / 1e6,
        "packets": float(packets),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="rounds (each runs every mode once)")
    ap.add_argument("--size", default="64M", help="bytes per stream, whole MiB (e.g. 64M)")
    ap.add_argument("--cpus", default=None, help="pin corral to these CPUs (taskset -c), e.g. 0-1")
    ap.add_argument("--timeout", type=float, default=60, help="cap on each run, seconds")
    args = ap.parse_args()
    size = int(args.size.rstrip("Mm")) * MiB
    kernel = build_probe()

    def measure() -> dict[str, float]:
        row: dict[str, float] = {}
        for mode in MODES:
            for k, v in one(kernel, mode, size, args.cpus, args.timeout).items():
                row[f"{mode}_{k}"] = v
        return row

    runs = interleave(args.runs, {"corral": measure})["corral"]
    if not runs:
        print("no valid run", file=sys.stderr)
        return 1
    print(host_line(args.runs, args.cpus, "corral alone (no peer VMM with vsock here)"))
    print(f"Probe ring-3 polling vsock driver, one stream of {size // MiB} MiB per run and direction.\n")
    print("| stream | corral MB/s (host clock) | corral MB/s (guest TSC) | packets per run | peer |")
    print("|---|---:|---:|---:|---|")
    for mode, (label, _, _) in MODES.items():
        mbs, guest = [r[f"{mode}_mbs"] for r in runs], [r[f"{mode}_guest_mbs"] for r in runs]
        packets = statistics.median(r[f"{mode}_packets"] for r in runs)
        print(f"| {label} | {spread(mbs)} | {spread(guest)} | {packets:,.0f} | - |")
    print(
        f"\n{len(runs)}/{args.runs} rounds valid (every byte on both ends, CRC-32s equal). "
        f"Peer: {peer_note()}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
