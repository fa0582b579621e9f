"""What `corral run` imports: only what the launch uses (issue 16). Start-up speed is never
asserted by timing; the modules a launch loads are, since each costs start-up on every run."""

from __future__ import annotations

import subprocess
import sys

from corral.images.probe import build_probe

# Run the real command line, then report which of the heavy optional modules were loaded.
LAUNCH = """
import atexit, sys
WATCH = ("importlib.metadata", "rich", "pyroute2", "corral.api", "corral.migration", "corral.firecracker",
         "pydantic", "calendar")
atexit.register(lambda: print("LOADED", *[m for m in WATCH if m in sys.modules], file=sys.stderr))
from corral.cli import main
main()
"""


def test_a_probe_launch_loads_no_plugin_scan_table_renderer_netlink_api_or_validation() -> None:
    kernel = build_probe()
    cmd = [sys.executable, "-c", LAUNCH, "run", "--kernel", str(kernel), "--cmdline", "hello", "--no-reboot"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT hello=1" in proc.stdout
    loaded = [line for line in proc.stderr.splitlines() if line.startswith("LOADED")]
    assert loaded == ["LOADED"], proc.stderr
