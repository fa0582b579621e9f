#!/usr/bin/env python3
"""Two corral checkouts side by side, interleaved: did a change make any figure worse?

Runs the probe under corral from this checkout and from another one (e.g. the release before a
refactor: `git worktree add /tmp/before <commit>`), alternating A, B, A, B... so background load
lands on both, and prints median (min-max) per measure with the ratio B/A:
launch -> first serial byte, launch -> exit (`hello`), port-I/O and MMIO exits per second, and
with --devices the virtio-blk (4 KiB random, 1 MiB sequential) and virtio-net transmit figures of
bench/virtio_bench.py and bench/net_bench.py.

    python bench/release_ab.py --before /tmp/before [--runs 7] [--exits 200000] [--devices]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import net_bench  # noqa: E402
import virtio_bench  # noqa: E402
from corral.images.probe import build_probe  # noqa: E402
from probe_bench import timed_run  # noqa: E402


def corral_at(tree: Path, kernel: Path, cmdline: str, *extra: str) -> list[str]:
    # the same interpreter and dependencies for both; only the corral sources differ
    return [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(tree / 'src')!r}); from corral.cli import main; main()",
        "run",
        "--kernel",
        str(kernel),
        "--cmdline",
        cmdline,
        "--memory",
        "512M",
        "--no-reboot",
        *extra,
    ]


def measure_devices(tree: Path, kernel: Path, img: Path) -> dict[str, float]:
    rand = virtio_bench.one(corral_at(tree, kernel, "blk-bench rand4k 20000", "--disk", str(img)))
    seq = virtio_bench.one(corral_at(tree, kernel, "blk-bench seq1m 300", "--disk", str(img)))
    net = net_bench.one(corral_at(tree, kernel, "net-bench 200000", "--net", f"tap={net_bench.TAP}"))
    if rand["errors"] or seq["errors"] or net["guest_sent"] != net["host_seen"]:
        raise RuntimeError(f"{tree}: device errors: {rand} {seq} {net}")
    return {
        "blk 4K random IOPS": rand["iops"],
        "blk 1M sequential MB/s": seq["mbps"],
        "net tx frames/s": net["fps"],
    }


def measure(tree: Path, kernel: Path, exits: int) -> dict[str, float]:
    hello = timed_run(corral_at(tree, kernel, "hello"))
    if not any(line.startswith("RESULT hello=1") for _, line in hello["lines"]):
        raise RuntimeError(f"{tree}: hello failed: {hello['stderr'][-500:]}")
    out = {"first byte (ms)": hello["first_byte"] * 1e3, "exit, hello (ms)": hello["total"] * 1e3}
    for kind in ("pio", "mmio"):
        r = timed_run(corral_at(tree, kernel, f"{kind}-bench {exits}"))
        marks = {line: t for t, line in r["lines"] if line in ("BENCH start", "BENCH end")}
        if len(marks) != 2:
            raise RuntimeError(f"{tree}: no BENCH markers: {r['stderr'][-500:]}")
        out[f"{kind} exits/s"] = exits / (marks["BENCH end"] - marks["BENCH start"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the other corral checkout (A)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--devices", action="store_true", help="also virtio-blk and virtio-net (root: a tap)")
    args = ap.parse_args()
    kernel = Path(build_probe())
    trees = {"A (before)": args.before.resolve(), "B (this)": ROOT}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "bench.img"
        if args.devices:
            with open(img, "wb") as f:  # real data, in the page cache, as virtio_bench uses
                for _ in range(256):
                    f.write(os.urandom(1 << 20))
            subprocess.run(["ip", "tuntap", "add", net_bench.TAP, "mode", "tap"], capture_output=True)
            subprocess.run(["ip", "link", "set", net_bench.TAP, "up"], check=True)
        try:
            for i in range(args.runs):
                for name, tree in trees.items():
                    print(f"[{i + 1}/{args.runs}] {name} ...", file=sys.stderr, flush=True)
                    r = measure(tree, kernel, args.exits)
                    if args.devices:
                        r.update(measure_devices(tree, kernel, img))
                    runs[name].append(r)
        finally:
            if args.devices:
                subprocess.run(["ip", "tuntap", "del", net_bench.TAP, "mode", "tap"], capture_output=True)
    print(
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"kernel {platform.release()}); A, B interleaved, {args.runs} pairs: median (min-max).\n"
    )
    print("| measure | A (before) | B (this) | B / A |")
    print("|---|---:|---:|---:|")
    for key in runs["A (before)"][0]:
        cells = []
        for name in trees:
            v = [r[key] for r in runs[name]]
            cells.append((statistics.median(v), min(v), max(v)))
        (a, *_), (b, *_) = cells
        fmt = "{:,.1f}" if "(ms)" in key else "{:,.0f}"
        show = [f"{fmt.format(m)} ({fmt.format(lo)}-{fmt.format(hi)})" for m, lo, hi in cells]
        print(f"| {key} | {show[0]} | {show[1]} | {b / a:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
