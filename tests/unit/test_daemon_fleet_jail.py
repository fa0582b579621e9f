"""corral.daemon.fleet with jails: a jailing fleet needs the fork server's launcher, and a
jailed VM's snapshot files are taken from its run directory only when they are plain files of
its own uid (a hostile VM may leave a symlink or a hard link there instead)."""

from __future__ import annotations

import os

import pytest

from corral.daemon.fleet import Fleet, FleetError, _claim
from corral.daemon.launcher import SpawnLauncher
from corral.daemon.statedir import StateDir

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
