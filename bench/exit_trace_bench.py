#!/usr/bin/env python3
"""What observing exits costs: the probe's pio-bench and mmio-bench exits per second under corral
from another checkout (A: before the exit hooks) and from this one with observing off (B), with
`--stats` (counters) and with `--trace` (counters + a binary trace), interleaved A, B, stats,
trace, A, ... so background load lands on all; median (min-max) per variant.

    python bench/exit_trace_bench.py --before /tmp/before [--runs 5] [--exits 50000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.images.probe import build_probe  # noqa: E402
from probe_bench import timed_run  # noqa: E402
from release_ab import corral_at  # noqa: E402


def exits_per_s(cmd: list[str], exits: int) -> float:
    r = timed_run(cmd)
    marks = {line: t for t, line in r["lines"] if line in ("BENCH start", "BENCH end")}
    if len(marks) != 2:
        raise RuntimeError(f"no BENCH markers: {r['stderr'][-500:]}")
    return exits / (marks["BENCH end"] - marks["BENCH start"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="the other corral checkout (A)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--exits", type=int, default=50_000)
    args = ap.parse_args()
    kernel = Path(build_probe())
    variants = ["A (before)", "B (off)", "B --stats", "B --trace"]
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for kind in ("pio", "mmio"):
                cmdline = f"{kind}-bench {args.exits}"
                for v in variants:
                    tree = args.before.resolve() if v.startswith("A") else ROOT
                    extra = {
                        "B --stats": ["--stats"],
                        "B --trace": ["--trace", f"{tmp}/{kind}-{i}.trace"],
                    }.get(v, [])
                    print(f"[{i + 1}/{args.runs}] {kind} {v} ...", file=sys.stderr, flush=True)
                    results.setdefault((kind, v), []).append(
                        exits_per_s(corral_at(tree, kernel, cmdline, *extra), args.exits)
                    )
    print(f"{args.runs} interleaved runs of {args.exits} exits: exits/s, median (min-max), ratio to A\n")
    print("| bench | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for kind in ("pio", "mmio"):
        base = statistics.median(results[(kind, variants[0])])
        cells = []
        for v in variants:
            xs = results[(kind, v)]
            med = statistics.median(xs)
            cells.append(f"{med:,.0f} ({min(xs):,.0f}-{max(xs):,.0f}) {med / base:.2f}x")
        print(f"| {kind}-bench | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
