"""`corral serve` with real VMs: probe guests created through the daemon (CLI and REST), their
serial consoles streamed, paused, snapshotted and cloned; the daemon restarted (SIGTERM) and
killed (SIGKILL) while VMs run (they survive and are found again); a VM process killed (reported
dead, never forgotten); a create/delete loop that leaks nothing (daemon fds and threads, state
directories, cgroups, processes)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.cli import cli_env
from support.daemon import Daemon
from support.results import progress_rounds

from corral.daemon.cgroups import Cgroups
from corral.daemon.vmapi import ApiError
from corral.images.probe import build_probe

SLOW = bool(os.environ.get("CORRAL_SLOW_TESTS"))


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state")
    yield d
    d.close()


def _throttled(daemon: Daemon, vm: str) -> int:
    m = re.search(
        rf'corral_vm_cpu_throttled_periods_total\{{vm="{vm}"\}} (\d+)', daemon.api.call("GET", "/metrics")
    )
    assert m, "no throttling counter for the VM"
    return int(m.group(1))


def _cpu_seconds(daemon: Daemon, vm: str) -> float:
    text = daemon.api.call("GET", "/metrics")
    return sum(
        float(m)
        for m in re.findall(rf'corral_vm_cpu_seconds_total\{{vm="{vm}",mode="\w+"\}} ([0-9.]+)', text)
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_create_console_pause_snapshot_clone_metrics(daemon, tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {
                    "kernel_image_path": str(build_probe()),
                    "boot_args": "mem-touch 16M forever",
                },
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            }
        )
    )
    r = daemon.cli("vm", "create", "--id", "web-1", "--config", str(config), "--pids-limit", "64")
    assert r.returncode == 0 and r.stdout.strip() == "web-1", r.stderr
    vm_dir = daemon.state / "vms" / "web-1"
    assert vm_dir.stat().st_mode & 0o777 == 0o700
    assert (vm_dir / "api.sock").stat().st_mode & 0o777 == 0o600
    daemon.wait_rounds("web-1", 2)
    # the console as a stream: `corral console` follows it as the guest writes
    follower = subprocess.Popen(
        [sys.executable, "-m", "corral", "console", "web-1", "--daemon-sock", str(daemon.sock)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    seen = bytearray()
    try:
        assert follower.stdout is not None
        start = max(progress_rounds(daemon.console("web-1")))
        while max(progress_rounds(seen.decode(errors="replace")), default=0) < start + 2:
            chunk = follower.stdout.read1(65536)
            assert chunk, "the console stream ended while the VM runs"
            seen += chunk
    finally:
        follower.terminate()
        follower.wait(10)
    assert b"probe: mem-touch range" in seen
    shown = daemon.cli("vm", "show", "web-1")
    assert "running" in shown.stdout and "pids.max = 64" in shown.stdout, shown.stdout

    assert daemon.api.call("POST", "/vms/web-1/pause")["state"] == "paused"
    at = max(progress_rounds(daemon.console("web-1")))
    time.sleep(0.4)
    assert max(progress_rounds(daemon.console("web-1"))) == at  # paused: no progress
    snap = tmp_path / "snap"
    r = daemon.cli("vm", "snapshot", "web-1", str(snap))
    assert r.returncode == 0, r.stderr
    assert (snap / "vm.snap").is_file() and (snap / "vm.mem").stat().st_size == 128 << 20
    assert daemon.api.call("GET", "/vms/web-1")["state"] == "paused"  # a paused VM stays paused
    assert "web-1: running" in daemon.cli("vm", "resume", "web-1").stdout
    daemon.wait_rounds("web-1", at + 2)

    clone = daemon.api.call("POST", "/vms", {"id": "web-2", "snapshot": str(snap)})
    assert clone["state"] == "running" and clone["source"] == "snapshot"
    last = daemon.wait_rounds("web-2", at + 2)
    clone_out = daemon.console("web-2")
    assert "mem-touch range" not in clone_out and min(progress_rounds(clone_out)) > at - 1  # carried on
    assert last > at

    text = daemon.api.call("GET", "/metrics")
    lines = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines() if line[:1] != "#"}
    assert lines['corral_vms{state="running"}'] == "2"
    assert float(lines['corral_vm_cpu_seconds_total{vm="web-2",mode="user"}']) > 0
    assert int(lines['corral_vm_memory_bytes{vm="web-1",kind="pss"}']) > 16 << 20  # guest RAM it touched
    assert lines['corral_vm_guest_memory_bytes{vm="web-1"}'] == str(128 << 20)
    assert int(lines['corral_vm_cgroup_tasks{vm="web-1"}']) >= 3  # its threads, counted by pids

    r = daemon.cli("vm", "rm", "web-1", "web-2")
    assert r.returncode == 0, r.stderr
    assert not list((daemon.state / "vms").iterdir())
    assert not any(list(p.glob("web-*")) for p in daemon.cgroup_dirs())


def test_vms_outlive_the_daemon_and_dead_ones_are_reported(daemon):
    # each guest spins: a CPU limit keeps three of them from taking this 2-core host, and shows
    # the limit enforced (the kernel throttles them)
    slow = {"cpus": 0.3} if Cgroups().where("cpu") is not None else {}
    pids = {v: daemon.create(v, limits=slow)["pid"] for v in ("a", "b", "c")}
    daemon.wait_rounds("a", 1)
    if slow:  # the guest spins, yet its process gets no more than its share of a CPU
        t0, c0 = time.monotonic(), _cpu_seconds(daemon, "a")
        time.sleep(3)
        share = (_cpu_seconds(daemon, "a") - c0) / (time.monotonic() - t0)
        assert share < 0.3 * 1.25, share
        assert _throttled(daemon, "a") >= 0  # the counter is exported

    daemon.signal(signal.SIGTERM)  # a restart
    assert all(_alive(p) for p in pids.values())
    before = daemon.wait_rounds("a", 1)
    daemon.start()
    found = {v["id"]: v for v in daemon.api.call("GET", "/vms")}
    assert {k: (v["state"], v["pid"]) for k, v in found.items()} == {
        k: ("running", p) for k, p in pids.items()
    }
    assert daemon.wait_rounds("a", before + 1) > before  # the guest ran on through it

    daemon.signal(signal.SIGKILL)  # a crash
    assert all(_alive(p) for p in pids.values())
    daemon.start()
    assert {v["id"]: v["state"] for v in daemon.api.call("GET", "/vms")} == dict.fromkeys(pids, "running")

    # a VM whose process dies while no daemon was its parent: dead, exit unknown, still listed
    os.kill(pids["a"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (a := daemon.api.call("GET", "/vms/a"))["state"] != "dead":
        assert time.monotonic() < deadline, a
        time.sleep(0.05)
    assert a["pid"] is None and "unknown" in a["exit"]
    with pytest.raises(ApiError, match="not running: dead"):
        daemon.api.call("POST", "/vms/a/pause")

    # a VM this daemon started, killed: the daemon reaped it and says how it ended
    d = daemon.create("d")
    os.kill(d["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (dd := daemon.api.call("GET", "/vms/d"))["state"] != "dead":
        assert time.monotonic() < deadline, dd
        time.sleep(0.05)
    assert dd["exit"] == "killed by signal 9 (SIGKILL)"

    # stop is not death: the guest is stopped and the VM stays listed as stopped
    b = daemon.api.call("POST", "/vms/b/stop")
    assert b["state"] == "stopped" and not _alive(pids["b"])
    listed = {v["id"]: v["state"] for v in daemon.api.call("GET", "/vms")}
    assert listed == {"a": "dead", "b": "stopped", "c": "running", "d": "dead"}
    shown = daemon.cli("vm", "ls").stdout
    assert "dead" in shown and "stopped" in shown
    for v in listed:
        daemon.api.call("DELETE", f"/vms/{v}")
    assert not _alive(pids["c"])


def _daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _daemon_threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _vm_processes(state: Path) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (
                    str(state).encode() in (p / "cmdline").read_bytes()
                    and b"firecracker" in (p / "cmdline").read_bytes()
                ):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


def test_create_delete_loop_leaks_nothing(daemon):
    n = 200 if SLOW else 20
    batch = 5
    assert daemon.proc is not None
    dpid = daemon.proc.pid
    daemon.create("warm", "idle")  # the first create opens what the daemon keeps (logging, ...)
    daemon.api.call("DELETE", "/vms/warm")
    fds, threads = _daemon_fds(dpid), _daemon_threads(dpid)
    limits = {"pids": 64, "memory_mib": 1024}

    def one(i: int) -> None:
        vm = f"loop-{i}"
        v = daemon.create(vm, "idle", limits=limits)
        assert v["state"] == "running" and v["pid"]
        daemon.api.call("DELETE", f"/vms/{vm}")
        assert not _alive(v["pid"])

    t0 = time.monotonic()
    with ThreadPoolExecutor(batch) as pool:
        list(pool.map(one, range(n)))
    elapsed = time.monotonic() - t0
    print(f"{n} VMs created and deleted in {elapsed:.1f} s ({n / elapsed:.1f} VMs/s, {batch} at once)")
    time.sleep(0.2)
    assert _daemon_fds(dpid) <= fds, sorted(os.listdir(f"/proc/{dpid}/fd"))
    assert _daemon_threads(dpid) <= threads + 1
    assert list((daemon.state / "vms").iterdir()) == []
    assert daemon.cgroup_dirs() and not any(g.is_dir() for p in daemon.cgroup_dirs() for g in p.glob("*"))
    assert _vm_processes(daemon.state) == []
    assert daemon.api.call("GET", "/")["vms"] == 0  # and the daemon serves on


def test_bad_requests_fail_alone(daemon):
    def fault(method: str, path: str, body: object = None) -> tuple[int, str]:
        try:
            daemon.api.call(method, path, body)
        except ApiError as exc:
            return exc.status, str(exc)
        raise AssertionError(f"{method} {path} succeeded")

    assert fault("GET", "/vms/no-such-vm") == (404, "no VM with id 'no-such-vm': `corral vm ls` lists them")
    status, msg = fault("POST", "/vms", {"id": "../../etc", "config": {}})
    assert status == 400 and "`id`" in msg
    status, msg = fault("POST", "/vms", {"id": "x" * 65, "config": {}})
    assert status == 400 and "`id`" in msg
    assert fault("GET", "/vms/a_b")[0] == 400  # Firecracker's id rule: no underscore
    status, msg = fault("POST", "/vms", {"config": {"boot-source": {"kernel_image_path": "/no/such"}}})
    # unjailed, the VM's own Firecracker message; jailed (as root), the jail's mapping says it first
    assert status == 400 and (
        "The kernel file cannot be opened" in msg or "/no/such does not exist" in msg
    ), msg
    status, msg = fault("POST", "/vms", {"snapshot": "/no/such/dir"})
    assert status == 400 and "vm.snap" in msg
    status, msg = fault("POST", "/vms", {"config": {"machine-config": {"vcpu_count": "two"}}})
    assert status == 400 and "vcpu_count" in msg
    status, msg = fault("POST", "/vms", {"config": {}, "limits": {"cpus": -1}})
    assert status == 400 and "cpus" in msg
    assert list((daemon.state / "vms").iterdir()) == []  # nothing half-made is left
    daemon.create("ok")
    status, msg = fault("POST", "/vms", {"id": "ok", "config": {"boot-source": {"kernel_image_path": "/x"}}})
    assert status == 400 and "exists" in msg
    assert daemon.api.call("GET", "/vms/ok")["state"] == "running"  # the first one is untouched
    # 100 MB refused from its Content-Length, answered before it is read; the daemon serves on
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.sock))
    s.sendall(b"POST /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"{" * 65536)
    s.settimeout(10)
    reply = b""
    while chunk := s.recv(65536):  # the answer, then the server closes
        reply += chunk
    s.close()
    assert reply.startswith(b"HTTP/1.1 400") and b"larger than the limit" in reply
    assert daemon.api.call("GET", "/")["vms"] == 1
    daemon.api.call("DELETE", "/vms/ok")


def test_rm_removes_the_tap_made_for_a_vm_and_keeps_one_it_was_given(daemon):
    made, given = f"dmn{os.getpid() % 100000}a", f"dmn{os.getpid() % 100000}b"
    subprocess.run(["ip", "tuntap", "add", "dev", given, "mode", "tap"], check=True)
    try:
        for vm, tap in (("made", made), ("given", given)):
            config = {
                "boot-source": {"kernel_image_path": str(build_probe()), "boot_args": "idle"},
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap}],
            }
            v = daemon.api.call("POST", "/vms", {"id": vm, "config": config})
            assert v["state"] == "running" and Path("/sys/class/net", tap).exists()
            daemon.api.call("DELETE", f"/vms/{vm}")
        assert not Path("/sys/class/net", made).exists()  # made for the VM: gone with it
        assert Path("/sys/class/net", given).exists()  # the operator's own tap: kept
    finally:
        subprocess.run(["ip", "link", "del", given], check=False)
