"""An idle VM costs its host no wake-ups: a `corral firecracker` process whose probe guest has
halted sleeps in every thread (main thread, API server, device loop, vCPU) until something
happens. A thousand idle VMs on one host (issue 12) are only possible if this holds: a VMM that
polled ten times a second would make them a busy host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_forkserver import api_get, vm_config, wait_for


def context_switches(pid: int) -> int:
    """All threads' voluntary + involuntary context switches so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


def test_an_idle_vm_sleeps_in_every_thread(tmp_path: Path) -> None:
    log, sock = tmp_path / "vm.log", tmp_path / "vm.sock"
    cfg = vm_config(tmp_path)
    cmd = [sys.executable, "-m", "corral", "firecracker", "--api-sock", str(sock), "--config-file", str(cfg)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("the probe to halt", lambda: "probe: halt" in log.read_text())
        wait_for("the API socket", sock.exists)
        assert api_get(sock)[0] == 200
        time.sleep(0.5)  # let the last request's thread finish
        before = context_switches(proc.pid)
        time.sleep(3.0)
        woke = context_switches(proc.pid) - before
        # A 0.1 s poll in the main thread alone would be ~30 here, a 0.5 s one in the API server ~6.
        assert woke <= 3, f"an idle VM's threads woke {woke} times in 3 s"
        assert api_get(sock)[0] == 200  # and it still answers at once
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, log.read_text()
    assert not sock.exists()
