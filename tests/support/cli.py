"""`corral ...` as a user runs it: a subprocess of this interpreter, with the checkout's src/ on
PYTHONPATH, its exit status and its output. One place, so every CLI test runs it the same way.

    r = corral("run", "--image", "probe", "--cmdline", "smp")
    line = one_clear_line(corral("run", "--kernel", "nope"))    # the one-line error
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the checkout's src/ first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(extra or {})}


def corral(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run `corral ARGS...` to the end (stdin closed); text output."""
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=cli_env(env),
    )


def corral_popen(*args: str) -> subprocess.Popen:
    """Start `corral ARGS...` in the background (stdin closed); byte pipes for its output."""
    return subprocess.Popen(
        [sys.executable, "-m", "corral", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )


def start_vm(api: Path, cmdline: str = "mem-touch 16M forever", *extra: str) -> subprocess.Popen:
    """`corral run` of the probe with a control socket at `api`; returns once the socket exists."""
    proc = corral_popen(
        "run", "--image", "probe", "--memory", "256M", "--cmdline", cmdline, "--api", str(api), *extra
    )
    deadline = time.monotonic() + 30
    while not api.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    return proc


def one_clear_line(r: subprocess.CompletedProcess) -> str:
    """A failed command's stderr is one `corral: error: ...` line and no traceback; returns it."""
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("corral: error: ")
    assert "Traceback" not in r.stderr
    return lines[0]
