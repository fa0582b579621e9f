"""Probe VMs launched through the fork server (corral.forkserver), as the daemon launches them:
`corral firecracker --config-file` children of a warm template. Their serial output arrives,
each is its own session, they outlive the template (and answer their API after it is killed),
exited children are reaped, and a bad launch fails alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from corral.forkserver import ForkServer, ForkServerError
from corral.images.probe import build_probe


def vm_config(tmp_path: Path, cmdline: str = "halt") -> Path:
    cfg = tmp_path / "vm.json"
    cfg.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(build_probe()), "boot_args": cmdline},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            }
        )
    )
    return cfg


def wait_for(what: str, check, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


def api_get(sock: Path, path: str = "/") -> tuple[int, dict]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def server():
    fs = ForkServer().start()
    yield fs
    fs.close()


def test_a_probe_vm_boots_through_the_fork_server_and_outlives_it(server: ForkServer, tmp_path: Path) -> None:
    log, sock = tmp_path / "vm.log", tmp_path / "vm.sock"
    cfg = vm_config(tmp_path)
    pid = server.launch(
        ["firecracker", "--api-sock", str(sock), "--id", "fs-vm-1", "--config-file", str(cfg)], log_path=log
    )
    try:
        wait_for("the probe's serial output", lambda: "probe: halt" in log.read_text())
        assert "RESULT boot=pvh" in log.read_text()
        assert os.getsid(pid) == pid  # its own session: the template's signals are not its
        assert os.getpgid(pid) == pid
        wait_for("the API socket", sock.exists)
        status, info = api_get(sock)
        assert status == 200 and info["id"] == "fs-vm-1" and info["state"] == "Running"
        # the child holds none of the template's fds: only its own (0-2 and the VM's)
        links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == str(log) == os.readlink(f"/proc/{pid}/fd/2")
        template_sockets = {
            os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server.pid}/fd")
        }
        template_sockets = {s for s in template_sockets if s.startswith("socket:")}
        assert not links & template_sockets
        # the template dies hard: the VM runs on and serves its API
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        assert server._proc is not None
        server._proc.wait(10)
        time.sleep(0.3)
        assert alive(pid)
        assert api_get(sock)[1]["state"] == "Running"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
    wait_for("the VM to stop on SIGTERM", lambda: not alive(pid), timeout=20)
    # and the next launch gets a fresh template
    pid2 = server.launch(
        ["firecracker", "--api-sock", str(tmp_path / "vm2.sock"), "--config-file", str(cfg)],
        log_path=tmp_path / "vm2.log",
    )
    try:
        wait_for("the second VM", lambda: "probe: halt" in (tmp_path / "vm2.log").read_text())
    finally:
        os.kill(pid2, signal.SIGKILL)


def test_exited_vms_are_reaped_and_bad_launches_fail_alone(server: ForkServer, tmp_path: Path) -> None:
    cfg = vm_config(tmp_path, "hello")  # exits 0 at once
    pids = [
        server.launch(
            ["firecracker", "--api-sock", str(tmp_path / f"h{i}.sock"), "--config-file", str(cfg)],
            log_path=tmp_path / f"h{i}.log",
        )
        for i in range(3)
    ]
    for i, pid in enumerate(pids):
        wait_for(f"VM {i} to exit", lambda pid=pid: server.returncode(pid) is not None)
        assert server.returncode(pid) == 0
        assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie left behind
        assert "RESULT hello=1" in (tmp_path / f"h{i}.log").read_text()
    with pytest.raises(ForkServerError, match="not a corral command"):
        server.launch(["frobnicate"], log_path=tmp_path / "x.log")
    bad = server.launch(
        [
            "firecracker",
            "--api-sock",
            str(tmp_path / "b.sock"),
            "--config-file",
            str(tmp_path / "missing.json"),
        ],
        log_path=tmp_path / "bad.log",
    )
    wait_for("the bad launch to fail", lambda: server.returncode(bad) is not None)
    assert server.returncode(bad) == 1
    assert "cannot read the config file" in (tmp_path / "bad.log").read_text()
    ok = server.launch(
        ["firecracker", "--api-sock", str(tmp_path / "ok.sock"), "--config-file", str(cfg)],
        log_path=tmp_path / "ok.log",
    )
    wait_for("a good launch after the bad ones", lambda: server.returncode(ok) == 0)


def guest_ram_flags(pid: int) -> list[str]:
    flags, in_ram = [], False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(":", 1)[0] or " " in line.split(":", 1)[0]:
                in_ram = "corral-ram" in line
            elif in_ram and line.startswith("VmFlags:"):
                flags.append(line.split(":", 1)[1])
    return flags


def test_corral_run_ksm_through_the_fork_server(server: ForkServer, tmp_path: Path) -> None:
    """`corral run --ksm` (here forked, as the density bench runs it): guest RAM is mergeable."""
    pids = {}
    for ksm in (False, True):
        pids[ksm] = server.launch(
            [
                "run",
                "--kernel",
                str(build_probe()),
                "--cmdline",
                "halt 4M",
                "--memory",
                "128M",
                "--no-reboot",
                *(["--ksm"] if ksm else []),
            ],
            log_path=tmp_path / f"ksm-{ksm}.log",
        )
    try:
        for ksm, pid in pids.items():
            log = tmp_path / f"ksm-{ksm}.log"
            wait_for(
                "the guest to fill its memory and halt", lambda log=log: "probe: halt" in log.read_text()
            )
            assert "ok=1" in log.read_text()
            flags = guest_ram_flags(pid)
            assert flags, "no guest RAM mapping found"
            assert all(("mg" in f.split()) == ksm for f in flags), flags
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)


def test_a_microvm_through_the_library_path(server: ForkServer, tmp_path: Path) -> None:
    """launch_firecracker: the same microVM without the CLI in the child."""
    log, sock = tmp_path / "lib.log", tmp_path / "lib.sock"
    pid = server.launch_firecracker(
        api_sock=sock, instance_id="lib-vm", config_file=vm_config(tmp_path), log_path=log
    )
    try:
        wait_for("the probe's serial output", lambda: "probe: halt" in log.read_text())
        assert os.getsid(pid) == pid
        wait_for("the API socket", sock.exists)
        assert api_get(sock)[1]["id"] == "lib-vm"
    finally:
        os.kill(pid, signal.SIGKILL)
    bad = server.launch_firecracker(
        api_sock=tmp_path / "bad.sock", instance_id="bad id", log_path=tmp_path / "bad.log"
    )
    wait_for("the bad microVM to fail", lambda: server.returncode(bad) is not None)
    assert server.returncode(bad) == 1
    assert "corral: error: --id 'bad id' is not an instance id" in (tmp_path / "bad.log").read_text()
