"""A `corral serve` process for the kvm tests: a state directory and a cgroup parent of the
test's own (other test runs share the host), probe VMs created through its REST API, and a
close() that leaves no VM process or cgroup behind whatever the test did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from corral.daemon.cgroups import Cgroups
from corral.daemon.vmapi import HttpClient
from corral.images.probe import build_probe
from support.cli import cli_env, corral
from support.results import progress_rounds


class Daemon:
    def __init__(
        self, state: Path, *args: str, cgroup_parent: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.state = state
        self.sock = state / "corral.sock"
        self.cgroup_parent = cgroup_parent or f"corral-test-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.args, self.env = args, env
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()  # a killed daemon leaves it; the new one would replace it anyway
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--state-dir", str(self.state)]
            + ["--cgroup-parent", self.cgroup_parent, *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=cli_env(self.env),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the daemon socket never appeared"
            time.sleep(0.05)
        self.api = HttpClient(str(self.sock), timeout=120)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        assert self.proc.wait(15) in (0, -sig)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return corral(*args, env={"CORRAL_DAEMON_SOCK": str(self.sock)})

    def create(self, vm_id: str, cmdline: str = "mem-touch 16M forever", **extra: object) -> dict:
        config = {
            "boot-source": {"kernel_image_path": str(build_probe()), "boot_args": cmdline},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        }
        return self.api.call("POST", "/vms", {"id": vm_id, "config": config, **extra})

    def console(self, vm_id: str) -> str:
        return (self.state / "vms" / vm_id / "console").read_bytes().decode(errors="replace")

    def wait_rounds(self, vm_id: str, n: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while max(progress_rounds(self.console(vm_id)), default=0) < n:
            assert time.monotonic() < deadline, self.console(vm_id)[-2000:]
            time.sleep(0.05)
        return max(progress_rounds(self.console(vm_id)))

    def cgroup_dirs(self) -> list[Path]:
        """The daemon's cgroup parent in each hierarchy (VMs' groups go inside)."""
        return [d.parent for _, d in Cgroups(parent=self.cgroup_parent).group("x").dirs]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                for v in self.api.call("GET", "/vms"):
                    self.api.call("DELETE", f"/vms/{v['id']}")
            finally:
                self.proc.terminate()
                self.proc.wait(15)
                # the daemon's log, shown by pytest when the test failed (an internal error's
                # traceback is there)
                print((self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")[-8000:])
        # whatever a failed test left: no VM process outlives the test
        for d in (self.state / "vms").glob("*"):
            pid = (d / "pid").read_text().split()[0] if (d / "pid").exists() else None
            if pid:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for parent in self.cgroup_dirs():
            for g in parent.glob("*"):
                if g.is_dir():
                    g.rmdir()
            if parent.is_dir():
                parent.rmdir()
