#!/usr/bin/env python3
"""Migration downtime of two corral checkouts, interleaved, with the laps it breaks into.

A change to the stop-and-copy moves a figure of a few milliseconds that background load moves
as much, so this runs the same migration (the probe guest, `idle` or `mem-touch SIZE forever`,
from `corral run --api` to `corral receive` on 127.0.0.1, two processes as in production) from
the checkout given with --before (A) and from this one (B) in turn, A, B, A, B..., and prints
median (min-max) of the downtime and of each lap of MigrationStats.downtime_ms (pause, final
pages, state, destination, go). Both use this interpreter and its dependencies; only the
corral sources differ. Without --before it measures this checkout alone.

    python bench/migrate_ab.py [--before /tmp/before] [--runs 5] [--guest idle] [--cpus 0-1]
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from corral.api import ControlClient  # noqa: E402
from corral.images.probe import build_probe  # noqa: E402
from interleave import RunFailed, pin  # noqa: E402
from state_bench import free_port, guest_started, spawn, stop, wait_for  # noqa: E402


def corral_at(tree: Path, *args: str) -> list[str]:
    boot = f"import sys; sys.path.insert(0, {str(tree / 'src')!r}); from corral.cli import main; main()"
    return [sys.executable, "-c", boot, *args]


def migrate_once(tree: Path, kernel: Path, guest: str, memory: str, cpus: str | None, tmp: Path) -> dict:
    api, dapi = tmp / f"src-{os.getpid()}.sock", tmp / f"dst-{os.getpid()}.sock"
    for p in (api, dapi):
        p.unlink(missing_ok=True)
    port = free_port()
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    run = ["run", "--kernel", str(kernel), "--cmdline", guest, "--memory", memory, "--no-reboot"]
    src = spawn(pin(corral_at(tree, *run, "--api", str(api)), cpus), tmp / "src.log")
    receive = ["receive", "--listen", f"127.0.0.1:{port}", "--token-file", str(token)]
    dst = spawn(pin(corral_at(tree, *receive, "--api", str(dapi), "--timeout", "60"), cpus))
    try:
        wait_for(api, src)
        guest_started(src)
        r = ControlClient(api).migrate(f"127.0.0.1:{port}", token=token.read_text())
        wait_for(dapi, dst)
        return {"downtime": r.downtime_seconds * 1000, **r.downtime_ms}
    finally:
        stop(src, dst)


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="the other corral checkout (A)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--guest", default="idle", help="the probe's command line (idle, mem-touch 128M forever)")
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--cpus", help="pin every process to these CPUs (taskset -c)")
    args = ap.parse_args()
    kernel = Path(build_probe())
    trees = (
        {"B (this)": ROOT} if args.before is None else {"A (before)": args.before.resolve(), "B (this)": ROOT}
    )
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for name, tree in trees.items():
                try:
                    r = migrate_once(tree, kernel, args.guest, args.memory, args.cpus, Path(tmp))
                except RunFailed as exc:
                    print(f"[{i + 1}/{args.runs}] {name}: skipped: {exc}", file=sys.stderr, flush=True)
                    continue
                laps = " ".join(f"{k}={v:.2f}" for k, v in r.items())
                print(f"[{i + 1}/{args.runs}] {name}: {laps}", file=sys.stderr, flush=True)
                runs[name].append(r)
    print(
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"kernel {platform.release()}), load average {load:.1f} -> {os.getloadavg()[0]:.1f}; "
        f"guest `{args.guest}` ({args.memory}); {args.runs} rounds interleaved: median (min-max), ms.\n"
    )
    names = [n for n in trees if runs[n]]
    print("| lap | " + " | ".join(names) + (" | B / A |" if len(names) == 2 else " |"))
    print("|---|" + "---:|" * (len(names) + (len(names) == 2)))
    for key in runs[names[0]][0]:
        cols = [[r[key] for r in runs[n] if key in r] for n in names]
        ratio = ""
        if len(names) == 2 and statistics.median(cols[0]):
            ratio = f" {statistics.median(cols[1]) / statistics.median(cols[0]):.2f}x |"
        print(f"| {key} | " + " | ".join(cell(c) for c in cols) + " |" + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
