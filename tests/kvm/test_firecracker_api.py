"""`corral firecracker` driven as Firecracker is: over HTTP on its Unix socket, by a raw client
and by an external Firecracker client library (hysn-firecracker-python, in its own venv). The
probe guest boots through /boot-source, is paused, snapshotted, loaded in a second process and
carries on there (its PROGRESS lines continue with the same checksums); bad input gets
Firecracker's 400 and the server serves on; a failed load ends the process."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.cli import ROOT, cli_env
from support.results import progress_rounds

from corral.images.probe import build_probe

CLIENT = "hysn-firecracker-python==1.0.7"
PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Firecracker:
    """A `corral firecracker` process, its console (stdout) collected, and one keep-alive
    connection to its API."""

    def __init__(self, sock: Path, *args: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "firecracker", "--api-sock", str(sock), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        self._out = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "the API socket never appeared"
            time.sleep(0.05)
        self.conn = UnixHTTPConnection(str(sock))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            with self._lock:
                self._out.extend(chunk)

    @property
    def output(self) -> str:
        with self._lock:
            return self._out.decode(errors="replace").replace("\r", "")

    def call(
        self, method: str, path: str, body: object = None
    ) -> tuple[int, dict | None, http.client.HTTPResponse]:
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        self.conn.request(
            method, path, body=data, headers={"Content-Type": "application/json"} if data else {}
        )
        r = self.conn.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None), r

    def ok(self, method: str, path: str, body: object = None) -> dict | None:
        status, reply, _ = self.call(method, path, body)
        assert status in (200, 204), (method, path, status, reply)
        return reply

    def fault(self, method: str, path: str, body: object = None) -> str:
        status, reply, _ = self.call(method, path, body)
        assert status == 400 and reply is not None, (status, reply)
        return reply["fault_message"]

    def wait_rounds(self, n: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while max(progress_rounds(self.output), default=0) < n:
            assert self.proc.poll() is None, (
                f"exited {self.proc.returncode}: {self.proc.stderr.read().decode()}"
            )
            assert time.monotonic() < deadline, self.output[-2000:]
            time.sleep(0.05)
        return max(progress_rounds(self.output))

    def close(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_raw_client_boots_pauses_snapshots_and_loads(tmp_path):
    probe = str(build_probe())
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    a = Firecracker(tmp_path / "a.sock", "--id", "first-vm")
    try:
        assert a.ok("GET", "/")["state"] == "Not started"
        a.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256})
        a.ok("PUT", "/boot-source", {"kernel_image_path": probe, "boot_args": "mem-touch 16M forever"})
        a.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        info = a.ok("GET", "/")
        assert info["state"] == "Running" and info["id"] == "first-vm"
        a.wait_rounds(2)
        a.ok("PATCH", "/vm", {"state": "Paused"})
        assert a.ok("GET", "/")["state"] == "Paused"
        paused_at = max(progress_rounds(a.output))
        time.sleep(0.3)
        assert max(progress_rounds(a.output)) == paused_at  # paused means no progress
        a.ok("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
        assert snap.is_file() and mem.stat().st_size == 256 << 20
        assert snap.stat().st_mode & 0o777 == 0o600 and mem.stat().st_mode & 0o777 == 0o600
        assert a.fault("PUT", "/boot-source", {"kernel_image_path": probe}) == PRE_BOOT_ONLY
        a.ok("PATCH", "/vm", {"state": "Resumed"})
        a.wait_rounds(paused_at + 3)  # the first VM runs on past the snapshot: the reference
        reference = progress_rounds(a.output)
    finally:
        a.close()

    b = Firecracker(tmp_path / "b.sock")
    try:
        load = {"snapshot_path": str(snap), "mem_backend": {"backend_type": "File", "backend_path": str(mem)}}
        b.ok("PUT", "/snapshot/load", {**load, "resume_vm": True})
        assert b.ok("GET", "/")["state"] == "Running"
        last = b.wait_rounds(paused_at + 3)
        rounds = progress_rounds(b.output)
        assert "mem-touch range" not in b.output  # carried on, not booted afresh
        assert min(rounds) > paused_at - 1 and all(ok for _, ok in rounds.values())
        common = set(rounds) & set(reference)
        assert common and all(rounds[r][0] == reference[r][0] for r in common), (rounds, reference)
        assert last > paused_at
        assert b.fault("PUT", "/snapshot/load", load) == PRE_BOOT_ONLY
        config = b.ok("GET", "/vm/config")
        assert config["machine-config"]["mem_size_mib"] == 256 and "boot-source" not in config
        # Ctrl+Alt+Del resets the guest, which ends a Firecracker microVM (and its process)
        b.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert b.proc.wait(10) == 0
    finally:
        b.close()


def test_a_loaded_vm_waits_paused_until_resumed(tmp_path):
    probe = str(build_probe())
    snap, mem = tmp_path / "s", tmp_path / "m"
    a = Firecracker(tmp_path / "a.sock")
    try:
        a.ok("PUT", "/boot-source", {"kernel_image_path": probe, "boot_args": "mem-touch 16M forever"})
        a.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        a.wait_rounds(1)
        a.ok("PATCH", "/vm", {"state": "Paused"})
        a.ok("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
        at = max(progress_rounds(a.output))
    finally:
        a.close()
    b = Firecracker(tmp_path / "b.sock")
    try:
        status, _, r = b.call(
            "PUT", "/snapshot/load", {"snapshot_path": str(snap), "mem_file_path": str(mem)}
        )
        assert status == 204 and r.getheader("Deprecation") == "true"
        assert b.ok("GET", "/")["state"] == "Paused"
        time.sleep(0.5)
        assert not progress_rounds(b.output)
        b.ok("PATCH", "/vm", {"state": "Resumed"})
        assert b.wait_rounds(at + 1) > at
    finally:
        b.close()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_a_diff_snapshot_layered_on_its_base_restores_the_guest(tmp_path):
    """Firecracker's diff snapshots: with track_dirty_pages, a Full snapshot, the guest runs on,
    a Diff holds only the pages dirtied since (a sparse file: the 16 MiB the guest rewrites, not
    its 256 MiB); the diff rebased onto the base loads in a new process and the guest carries on
    with the right checksums (a page the diff missed would read back wrong: the guest verifies
    every word it wrote, and the pause lands mid-round)."""
    from corral.firecracker.snapshot import rebase_memory

    probe = str(build_probe())
    base_snap, base_mem = tmp_path / "base.snap", tmp_path / "base.mem"
    diff_snap, diff_mem = tmp_path / "diff.snap", tmp_path / "diff.mem"
    a = Firecracker(tmp_path / "a.sock")
    try:
        a.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 256, "track_dirty_pages": True})
        a.ok("PUT", "/boot-source", {"kernel_image_path": probe, "boot_args": "mem-touch 16M forever"})
        a.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        a.wait_rounds(1)
        a.ok("PATCH", "/vm", {"state": "Paused"})
        a.ok("PUT", "/snapshot/create", {"snapshot_path": str(base_snap), "mem_file_path": str(base_mem)})
        # nothing ran since the full snapshot: a diff now holds (next to) nothing
        empty_snap, empty_mem = tmp_path / "empty.snap", tmp_path / "empty.mem"
        diff = {"snapshot_path": str(empty_snap), "mem_file_path": str(empty_mem), "snapshot_type": "Diff"}
        a.ok("PUT", "/snapshot/create", diff)
        assert empty_mem.stat().st_size == 256 << 20 and allocated(empty_mem) <= 64 << 10
        a.ok("PATCH", "/vm", {"state": "Resumed"})
        at = a.wait_rounds(max(progress_rounds(a.output)) + 3)
        diff = {"snapshot_path": str(diff_snap), "mem_file_path": str(diff_mem), "snapshot_type": "Diff"}
        a.ok("PUT", "/snapshot/create", diff)  # taken from the running guest: paused for it
        a.wait_rounds(at + 3)  # the reference runs on
        reference = progress_rounds(a.output)
    finally:
        a.close()
    assert diff_mem.stat().st_size == 256 << 20
    # the rewritten 16 MiB and a little more (stack, page tables), never the whole RAM
    assert 15 << 20 <= allocated(diff_mem) <= 24 << 20, allocated(diff_mem)
    assert rebase_memory(base_mem, diff_mem) >= 15 << 20
    b = Firecracker(tmp_path / "b.sock")
    try:
        load = {
            "snapshot_path": str(diff_snap),
            "mem_backend": {"backend_type": "File", "backend_path": str(base_mem)},
        }
        b.ok("PUT", "/snapshot/load", {**load, "resume_vm": True})
        last = b.wait_rounds(at + 3)
        rounds = progress_rounds(b.output)
        assert "mem-touch range" not in b.output  # carried on, not booted afresh
        assert all(ok for _, ok in rounds.values()), rounds  # every word read back right
        common = set(rounds) & set(reference)
        assert common and all(rounds[r][0] == reference[r][0] for r in common), (rounds, reference)
        assert last > at
    finally:
        b.close()


def test_a_diff_snapshot_needs_dirty_page_tracking(tmp_path):
    probe = str(build_probe())
    fc = Firecracker(tmp_path / "api.sock")
    try:
        fc.ok("PUT", "/boot-source", {"kernel_image_path": probe, "boot_args": "idle"})
        fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        diff = {
            "snapshot_path": str(tmp_path / "s"),
            "mem_file_path": str(tmp_path / "m"),
            "snapshot_type": "Diff",
        }
        assert "dirty page tracking disabled" in fc.fault("PUT", "/snapshot/create", diff)
        assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()
    finally:
        fc.close()


def test_bad_input_gets_400_and_the_server_serves_on(tmp_path):
    fc = Firecracker(tmp_path / "api.sock")
    try:
        assert "unknown field `cpus`" in fc.fault(
            "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpus": 2}
        )
        assert "`vcpu_count`" in fc.fault(
            "PUT", "/machine-config", {"vcpu_count": "one", "mem_size_mib": 128}
        )
        assert "alphanumeric characters and underscores" in fc.fault(
            "PUT", "/drives/root%20fs", {"drive_id": "root fs", "is_root_device": True}
        )
        assert "kernel file cannot be opened" in fc.fault(
            "PUT", "/boot-source", {"kernel_image_path": str(tmp_path / "no-such-kernel")}
        )
        assert fc.fault("GET", "/no/such/path").startswith("Invalid request method and/or path")
        status, reply, _ = fc.call("PUT", "/mmds", b"{" + b" " * (2 << 20) + b"}")
        assert status == 400 and "larger than the limit" in reply["fault_message"]
        fc.conn.close()  # the server closed that connection; a new one is served
        assert fc.ok("GET", "/")["state"] == "Not started"
        assert fc.ok("GET", "/machine-config")["mem_size_mib"] == 128  # nothing changed
        assert fc.proc.poll() is None
    finally:
        fc.close()


def test_serial_out_path_and_metrics(tmp_path):
    serial, metrics = tmp_path / "serial.log", tmp_path / "metrics.json"
    fc = Firecracker(tmp_path / "api.sock", "--metrics-path", str(metrics), "--id", "m-1")
    try:
        fc.ok("PUT", "/serial", {"serial_out_path": str(serial)})
        fc.ok(
            "PUT",
            "/boot-source",
            {"kernel_image_path": str(build_probe()), "boot_args": "mem-touch 4M forever"},
        )
        assert fc.fault("PUT", "/actions", {"action_type": "FlushMetrics"}).endswith(
            "before starting the microVM."
        )
        fc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        deadline = time.monotonic() + 60
        while not progress_rounds(serial.read_text(errors="replace")):
            assert time.monotonic() < deadline, serial.read_text(errors="replace")[-2000:]
            time.sleep(0.05)
        fc.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        line = json.loads(metrics.read_text().splitlines()[-1])
        assert line["vmm"] == {"state": "Running"} and line["utc_timestamp_ms"] > 0
    finally:
        fc.close()
    assert "PROGRESS" not in fc.output  # the console went to the file, not stdout


def test_a_failed_load_ends_the_process(tmp_path):
    fc = Firecracker(tmp_path / "api.sock")
    try:
        msg = fc.fault(
            "PUT",
            "/snapshot/load",
            {
                "snapshot_path": str(tmp_path / "none"),
                "mem_backend": {"backend_type": "File", "backend_path": "/x"},
            },
        )
        assert msg.startswith("Load snapshot error: Failed to restore from snapshot")
        assert fc.proc.wait(10) == 1
    finally:
        fc.close()


def test_config_file_boots_at_once_without_api(tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(build_probe()), "boot_args": "mem-touch 4M 2"},
                "drives": [],
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            }
        )
    )
    log = tmp_path / "fc.log"
    r = subprocess.run(
        [
            *(sys.executable, "-m", "corral", "firecracker", "--no-api", "--config-file", str(config)),
            *("--boot-timer", "--log-path", str(log), "--level", "info"),
        ],
        capture_output=True,
        timeout=120,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, r.stderr.decode()
    assert set(progress_rounds(out)) == {1, 2}
    assert "Guest-boot-time = " in log.read_text()
    r = subprocess.run(
        [sys.executable, "-m", "corral", "firecracker", "--no-api"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert r.returncode != 0 and "--no-api needs --config-file" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "corral", "firecracker", "--api-sock", str(tmp_path / "s"), "--id", "a_b"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert r.returncode != 0 and "Invalid char (_) at position 1" in r.stderr


# --- the external client ---------------------------------------------------------------------------

OFFLINE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "NewConnectionError",
    "ProxyError",
    "(from versions: none)",
)


@pytest.fixture(scope="session")
def client_python(request, tmp_path_factory) -> Path:
    """A venv with the Firecracker client from PyPI (kept between runs under .pytest_cache)."""
    cache = getattr(request.config, "cache", None)
    base = (
        Path(cache.mkdir("firecracker-client"))
        if cache is not None
        else ROOT / ".pytest_cache" / "firecracker-client"
    )
    venv = base / CLIENT.replace("==", "-")
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    base.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    r = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", CLIENT],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if r.returncode != 0:
        if any(s in r.stderr for s in OFFLINE):
            pytest.skip(f"pip cannot reach PyPI to install {CLIENT}")
        raise AssertionError(f"pip install {CLIENT} failed:\n{r.stderr[-3000:]}")
    (venv / ".installed").touch()
    return python


# Runs in the client's venv: the client's own API (firecracker.api.Api, whose resources have
# get/put/patch and raise APIError with the fault message), one phase per invocation.
DRIVER = r"""
import json, sys
from firecracker.api import Api
from firecracker.exceptions import APIError

phase, sock = sys.argv[1], sys.argv[2]
api = Api(sock, timeout=30)
out = {}
if phase == "boot":
    kernel, snap, mem = sys.argv[3:6]
    out["version"] = api.version.get().json()
    api.machine_config.put(vcpu_count=1, mem_size_mib=256)
    api.boot.put(kernel_image_path=kernel, boot_args="mem-touch 16M forever")
    api.actions.put(action_type="InstanceStart")
    out["started"] = api.describe.get().json()["state"]
elif phase == "snapshot":
    kernel, snap, mem = sys.argv[3:6]
    api.vm.patch(state="Paused")
    out["paused"] = api.describe.get().json()["state"]
    api.create_snapshot.put(snapshot_path=snap, mem_file_path=mem, snapshot_type="Full")
    try:
        api.boot.put(kernel_image_path=kernel)
        out["post_boot"] = "accepted"
    except APIError as exc:
        out["post_boot"] = str(exc)
elif phase == "load":
    snap, mem = sys.argv[3:5]
    api.load_snapshot.put(snapshot_path=snap, mem_backend={"backend_type": "File", "backend_path": mem})
    out["loaded"] = api.describe.get().json()["state"]
    api.vm.patch(state="Resumed")
    out["resumed"] = api.describe.get().json()["state"]
    out["config"] = api.vm_config.get().json()
api.close()
print(json.dumps(out))
"""


def test_external_firecracker_client(client_python, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    probe = str(build_probe())
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")

    def drive(*args: str) -> dict:
        r = subprocess.run(
            [str(client_python), str(driver), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    a = Firecracker(tmp_path / "a.sock")
    try:
        out = drive("boot", str(a.sock), probe, snap, mem)
        assert out["started"] == "Running" and out["version"] == {"firecracker_version": "1.17.0"}
        at = a.wait_rounds(2)
        out = drive("snapshot", str(a.sock), probe, snap, mem)
        assert out["paused"] == "Paused"
        assert out["post_boot"] == f"API fault: {PRE_BOOT_ONLY}"
    finally:
        a.close()
    b = Firecracker(tmp_path / "b.sock")
    try:
        out = drive("load", str(b.sock), snap, mem)
        assert (out["loaded"], out["resumed"]) == ("Paused", "Running")
        assert out["config"]["machine-config"]["mem_size_mib"] == 256
        assert b.wait_rounds(at + 2) > at
        assert "mem-touch range" not in b.output
    finally:
        b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a tap (CAP_NET_ADMIN)")
def test_a_nic_is_made_on_the_filtered_api_thread(tmp_path):
    """InstanceStart builds the machine, its tap included, on the API's seccomp-filtered thread,
    which may map no new code: what making a tap imports (pyroute2) must be there already."""
    name = f"crlfc{os.getpid() % 100000}"
    a = Firecracker(tmp_path / "a.sock")
    try:
        a.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
        a.ok(
            "PUT",
            "/boot-source",
            {"kernel_image_path": str(build_probe()), "boot_args": "mem-touch 8M forever"},
        )
        a.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": name})
        a.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        a.wait_rounds(2)
        assert a.ok("GET", "/")["state"] == "Running"
    finally:
        a.close()
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    assert "forbidden system call" not in a.proc.stderr.read().decode()
