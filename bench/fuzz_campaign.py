"""The fuzz campaign: every device and parser target of tests/support/fuzz_targets.py, run for a
time budget each under hypothesis (random and mutated bytes, shrinking on a failure) and, for
the parsers, under atheris (libFuzzer, coverage-guided; `pip install atheris`), then a table of
the inputs run per target. A failure prints the input and exits 1.

    .venv/bin/python bench/fuzz_campaign.py                  # ~10 minutes in all
    .venv/bin/python bench/fuzz_campaign.py --seconds 5 --only virtio-blk,options
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

MAX_INPUT = 2048
ARTIFACTS = Path(os.environ.get("CORRAL_FUZZ_ARTIFACTS", "/tmp/corral-fuzz"))  # a failing input, kept
# the modules atheris instruments for each parser (coverage from corral's own code only;
# instrumenting everything loaded takes minutes)
COVERED = {
    "options": ["corral.options", "corral.config"],
    "config": ["corral.config"],
    "snapshot-manifest": ["corral.state.snapshot", "corral.state.model", "corral.config"],
    "migration-handshake": ["corral.migration"],
    "migration-stream": ["corral.migration"],
    "firecracker-api": ["corral.firecracker.routes", "corral.firecracker.vmm", "corral.firecracker.models"],
    "control-api": ["corral.firecracker.routes", "corral.firecracker.models"],
    "kernel-loaders": ["corral.boot"],
    "overlay-file": ["corral.backends.disk"],
    "device-state": ["corral.devices.virtio", "corral.devices.base"],
}


def hypothesis_run(name: str, seconds: float) -> tuple[int, str]:
    """Run `name` under hypothesis for about `seconds`: examples counted by the target itself
    (calibrated on a first batch, then one run sized to the budget). Returns (inputs, error)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from support.fuzz_targets import TARGETS

    target, count = TARGETS[name], [0]

    def one(data: bytes) -> None:
        count[0] += 1
        target(data)

    def batch(n: int) -> None:
        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.binary(max_size=MAX_INPUT))
        def run(data: bytes) -> None:
            one(data)

        run()

    start = time.monotonic()
    try:
        batch(100)
        rate = count[0] / max(time.monotonic() - start, 1e-3)
        left = seconds - (time.monotonic() - start)
        if left > 0:
            batch(max(int(rate * left), 1))
    except Exception as exc:  # noqa: BLE001 (any failure of the target is the finding: hypothesis shrank and printed it)
        return count[0], f"{type(exc).__name__}: {str(exc)[:300]}"
    return count[0], ""


def atheris_child(name: str, seconds: float) -> None:
    """In a child process (libFuzzer exits the process when done): fuzz `name` with coverage
    from corral's own code."""
    import importlib

    import atheris

    with atheris.instrument_imports(include=COVERED.get(name, [])):
        for module in COVERED.get(name, []):
            importlib.import_module(module)
    from support.fuzz_targets import TARGETS, warm

    warm()
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            f"-max_len={MAX_INPUT}",
            "-print_final_stats=1",
            f"-artifact_prefix={ARTIFACTS}/{name}-",
        ],
        TARGETS[name],
    )
    atheris.Fuzz()


def atheris_run(name: str, seconds: float) -> tuple[int, str]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, __file__, "--atheris-child", name, "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds * 2 + 120,
    )
    out = proc.stdout + proc.stderr
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out) or re.search(r"Done (\d+) runs", out)
    count = int(runs.group(1)) if runs else 0
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        return count, f"atheris exit {proc.returncode}:\n{tail}"
    return count, ""


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=0, help="per target and engine (default: 10 min in all)")
    ap.add_argument("--only", default="", help="comma-separated target names")
    ap.add_argument("--no-atheris", action="store_true")
    ap.add_argument("--atheris-child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.atheris_child:
        atheris_child(args.atheris_child, args.seconds)
        return 0
    from support.fuzz_targets import DEVICES, PARSERS, TARGETS, can_tap, warm

    names = [n for n in TARGETS if not args.only or n in args.only.split(",")]
    if "virtio-net" in names and not can_tap():
        names.remove("virtio-net")
        print("virtio-net: skipped (needs root for a tap)")
    atheris = have_atheris() and not args.no_atheris
    if not atheris and not args.no_atheris:
        print("atheris is not installed (pip install atheris): hypothesis only")
    runs = len(names) + (sum(n in PARSERS for n in names) if atheris else 0)
    seconds = args.seconds or 600 / max(runs, 1)
    warm()
    rows, failed = [], False
    for name in names:
        n, err = hypothesis_run(name, seconds)
        a, aerr = atheris_run(name, seconds) if atheris and name in PARSERS else (None, "")
        rows.append((name, "device" if name in DEVICES else "parser", n, a, err or aerr))
        status = "FAIL" if err or aerr else "ok"
        print(
            f"{name:22} hypothesis {n:>9,}  atheris {'-' if a is None else f'{a:,}':>9}  {status}", flush=True
        )
        if err or aerr:
            failed = True
            print(err or aerr)
    print()
    print(
        f"Fuzz campaign, {datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPUs, "
        f"~{seconds:.0f} s per target and engine:"
    )
    print()
    print("| target | kind | hypothesis inputs | atheris inputs | result |")
    print("|---|---|---:|---:|---|")
    for name, kind, n, a, err in rows:
        print(f"| {name} | {kind} | {n:,} | {'-' if a is None else f'{a:,}'} | {'FAIL' if err else 'ok'} |")
    total = sum(r[2] for r in rows) + sum(r[3] or 0 for r in rows)
    print(f"\n{total:,} inputs in all.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
