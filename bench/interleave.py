"""What every side-by-side bench shares: corral and QEMU measured in alternation (corral, QEMU,
corral, QEMU...) so background load lands on both, under the same CPU pinning, each run capped
in time (killed with its process group and reported in one line, never a traceback), and the
figures given as median (min-max) with the ratio.

    runs = interleave(5, {"corral": lambda: {...}, "QEMU": lambda: {...}})
    spread([r["iops"] for r in runs["corral"]])        # "28,089 (26,602-45,694)"
"""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime


class RunFailed(Exception):
    """One run did not give its figure (timed out, crashed, no RESULT): skipped and reported."""


def pin(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` under `taskset -c CPUS` (the same for every VMM), or as it is."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def capped(cmd: list[str], timeout: float) -> str:
    """Run `cmd` for at most `timeout` seconds and return its stdout. On the cap the whole
    process group is killed and RunFailed says so."""
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise RunFailed(
            f"{os.path.basename(cmd[0])} ran past its {timeout:.0f} s cap and was stopped"
        ) from None
    return out.decode(errors="replace")


def interleave(
    rounds: int, sides: dict[str, Callable[[], dict[str, float]]]
) -> dict[str, list[dict[str, float]]]:
    """`rounds` rounds of every side in turn; a failed run is left out (and said on stderr)."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for i in range(rounds):
        for name, measure in sides.items():
            print(f"[{i + 1}/{rounds}] {name} ...", file=sys.stderr, flush=True)
            try:
                runs[name].append(measure())
            except RunFailed as exc:
                print(f"  skipped: {exc}", file=sys.stderr, flush=True)
    return runs


def stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "-"
    m, lo, hi = stats(values)
    return f"{fmt.format(m)} ({fmt.format(lo)}-{fmt.format(hi)})"


def ratio(a: list[float], b: list[float], higher_is_better: bool = True) -> str:
    """a's median against b's: > 1 when a is better."""
    if not a or not b:
        return "-"
    ma, mb = statistics.median(a), statistics.median(b)
    return f"{(ma / mb if higher_is_better else mb / ma):.2f}x"


def host_line(rounds: int, cpus: str | None, what: str = "corral and QEMU interleaved round by round") -> str:
    pvm = os.path.isdir("/sys/module/kvm_pvm")
    try:
        load = f", load average {os.getloadavg()[0]:.1f} at the start"
    except OSError:
        load = ""
    return (
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.node() or 'this host'} ({os.cpu_count()} CPUs, "
        f"kernel {platform.release()}, /dev/kvm {'PVM' if pvm else 'hardware'}{load}); {what}, "
        f"{rounds} rounds, "
        f"{'every VMM pinned to CPUs ' + cpus if cpus else 'no pinning'}: "
        "median (min-max)."
    )
