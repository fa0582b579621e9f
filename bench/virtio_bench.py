#!/usr/bin/env python3
"""Side-by-side virtio-blk: the probe's ring-3 polling driver under corral and under QEMU's
virtio-blk-pci (KVM, same host, same probe binary, same raw image, in one run).

Reports 4 KiB random reads and writes at queue depth 1 and 32 (IOPS) and 1 MiB sequential
reads and writes at depth 8 (MB/s), timed by the guest's TSC between its BENCH markers, corral
and QEMU interleaved with the same CPU pinning (--runs pairs: median with min and max, and the
ratio), plus the guest-reported request errors (any error makes the figure suspect and is shown,
not hidden). Every run is capped in time; the image is a fixed 256 MiB.

    python bench/virtio_bench.py [--runs 5] [--rand 20000] [--seq 300] [--cpus 0-1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.images.probe import build_probe  # noqa: E402
from interleave import RunFailed, capped, host_line, interleave, pin, ratio, spread  # noqa: E402
from probe_bench import corral_cmd, qemu_cmd  # noqa: E402

RESULT = re.compile(r"RESULT blk_ops=(\d+) blk_bytes=(\d+) blk_errors=(\d+) tsc=(\d+) tsc_hz=(\d+)")


def corral_blk(kernel: Path, cmdline: str, img: Path) -> list[str]:
    return corral_cmd(kernel, cmdline, 1, "512M") + ["--disk", str(img)]


def qemu_blk(kernel: Path, cmdline: str, img: Path) -> list[str]:
    return qemu_cmd(kernel, cmdline, 1, "512M", "kvm", "pc") + [
        "-drive",
        f"if=none,id=d0,file={img},format=raw,cache=writeback,aio=threads",
        "-device",
        "virtio-blk-pci,drive=d0,disable-legacy=on",
    ]


def one(cmd: list[str], timeout: float = 300) -> dict:
    out = capped(cmd, timeout)
    m = RESULT.search(out)
    if not m:
        raise RunFailed(f"no blk RESULT from {' '.join(cmd[:3])}...: {out[-300:]!r}")
    ops, nbytes, errors, tsc, hz = map(int, m.groups())
    secs = tsc / hz
    return {"iops": ops / secs, "mbps": nbytes / secs / 1e6, "errors": errors}


# (label, probe arguments after COUNT, which count, unit)
ROWS = [
    ("4 KiB random read, QD1 (IOPS)", "rand4k", "read 1", "iops"),
    ("4 KiB random read, QD32 (IOPS)", "rand4k", "read 32", "iops"),
    ("4 KiB random write, QD1 (IOPS)", "rand4k", "write 1", "iops"),
    ("4 KiB random write, QD32 (IOPS)", "rand4k", "write 32", "iops"),
    ("1 MiB sequential read, QD8 (MB/s)", "seq1m", "read 8", "mbps"),
    ("1 MiB sequential write, QD8 (MB/s)", "seq1m", "write 8", "mbps"),
]
QEMU = "QEMU -M pc virtio-blk-pci"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="pairs (corral, QEMU)")
    ap.add_argument(
        "--rand", type=int, default=20000, help="random 4 KiB requests per QD32 run (QD1: a fifth)"
    )
    ap.add_argument("--seq", type=int, default=300, help="sequential 1 MiB requests per run")
    ap.add_argument("--cpus", default=None, help="pin every VMM to these CPUs (taskset -c), e.g. 0-1")
    ap.add_argument("--timeout", type=float, default=120, help="cap on each run, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    kernel = build_probe()
    builders = {"corral": corral_blk, QEMU: qemu_blk}
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "bench.img"
        with open(img, "wb") as f:  # real data, in the page cache: the device path is measured
            for _ in range(256):
                f.write(os.urandom(1 << 20))

        def side(name: str):
            def measure() -> dict[str, float]:
                got: dict[str, float] = {"errors": 0}
                for label, kind, rest, unit in ROWS:
                    n = args.seq if kind == "seq1m" else args.rand // (5 if rest.endswith(" 1") else 1)
                    r = one(
                        pin(builders[name](kernel, f"blk-bench {kind} {n} {rest}", img), args.cpus),
                        args.timeout,
                    )
                    got[label] = r[unit]
                    got["errors"] += r["errors"]
                return got

            return measure

        runs = interleave(args.runs, {name: side(name) for name in builders})
    lines = [
        host_line(args.runs, args.cpus),
        f"Probe ring-3 polling driver, 256 MiB raw image in the page cache; {args.rand:,} random "
        f"requests per QD32 run, {args.rand // 5:,} per QD1 run, {args.seq} sequential.",
        "",
        f"| measure | corral | {QEMU} | corral / QEMU |",
        "|---|---:|---:|---:|",
    ]
    c, q = runs["corral"], runs[QEMU]
    for label, *_ in ROWS:
        a, b = [r[label] for r in c], [r[label] for r in q]
        lines.append(f"| {label} | {spread(a)} | {spread(b)} | {ratio(a, b)} |")
    lines.append(
        f"| request errors | {sum(r['errors'] for r in c):.0f} | {sum(r['errors'] for r in q):.0f} | |"
    )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "virtio_blk.json").write_text(json.dumps(runs, indent=2))
    (args.out / "virtio_blk.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
