"""corral.daemon.fleet with jails: a jailing fleet needs the fork server's launcher, and a
jailed VM's snapshot files are taken from its run directory only when they are plain files of
its own uid (a hostile VM may leave a symlink or a hard link there instead); `serve` jails by
default, says so when it cannot (not root), and refuses --spawn with the jail on."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from corral.daemon.fleet import Fleet, FleetError, _claim
from corral.daemon.launcher import SpawnLauncher
from corral.daemon.server import serve
from corral.daemon.statedir import StateDir
from corral.daemon.vmapi import HttpClient
from corral.errors import ConfigError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="files of another uid need root")
UID = 931_777


def test_a_jailing_fleet_needs_the_fork_server(tmp_path):
    with pytest.raises(FleetError, match="drop --spawn, or give --no-jail"):
        Fleet(StateDir(tmp_path / "s"), SpawnLauncher(), None, jail=True)


@root_only
def test_a_vms_snapshot_file_becomes_the_daemons(tmp_path):
    run, target = tmp_path / "run", tmp_path / "snap"
    run.mkdir()
    target.mkdir()
    src = run / "x.mem"
    with open(src, "wb") as f:
        f.truncate(1 << 20)
        f.write(b"data")
    os.chown(src, UID, UID)
    _claim(src, target / "vm.mem", UID)
    st = (target / "vm.mem").stat()
    assert (st.st_uid, st.st_mode & 0o777, st.st_size) == (0, 0o644, 1 << 20)
    assert not src.exists() and (target / "vm.mem").read_bytes()[:4] == b"data"


@root_only
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "other uid", "fifo"])
def test_what_a_vm_may_leave_instead_is_refused(tmp_path, kind):
    run, target = tmp_path / "run", tmp_path / "snap"
    run.mkdir()
    target.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root's\n")
    os.chown(secret, UID, UID)  # even a file of the VM's uid elsewhere is not taken through a link
    src = run / "x.snap"
    if kind == "symlink":
        src.symlink_to(secret)
    elif kind == "hardlink":
        os.link(secret, src)
    elif kind == "other uid":
        src.write_text("x")
    else:
        os.mkfifo(src)
        os.chown(src, UID, UID)
    with pytest.raises((FleetError, OSError)):
        _claim(src, target / "vm.snap", UID)
    assert not (target / "vm.snap").exists()
    assert secret.stat().st_uid == UID and secret.read_text() == "root's\n"


def test_as_non_root_the_daemon_warns_and_runs_vms_unjailed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    ready = threading.Event()
    seen: list[dict] = []

    def ask_then_stop() -> None:
        ready.wait(30)
        try:
            seen.append(HttpClient(str(tmp_path / "s" / "corral.sock"), timeout=10).call("GET", "/"))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: it returns

    t = threading.Thread(target=ask_then_stop)
    t.start()
    with caplog.at_level(logging.WARNING):
        assert serve(tmp_path / "s", cgroup_parent=None, launcher=SpawnLauncher(), ready=ready) == 0
    t.join(30)
    assert seen and seen[0]["jail"] is False
    assert "jailing VMs needs root" in caplog.text


@root_only
def test_spawn_cannot_jail_and_says_so(tmp_path):
    with pytest.raises(ConfigError, match="--spawn cannot jail VMs.*give --no-jail"):
        serve(tmp_path / "s", spawn=True)
    assert not (tmp_path / "s").exists()  # refused before anything was made
