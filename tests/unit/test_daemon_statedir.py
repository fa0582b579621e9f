"""corral/daemon/statedir.py: private directories, ids checked before they name a path, pid
files that never mistake a reused pid for the VM, records written whole."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from corral.daemon.statedir import BadVmId, StateDir, StateError, check_vm_id, proc_start_time


@pytest.mark.parametrize("good", ["a", "vm-1", "A" * 64, "0-0"])
def test_good_ids(good):
    assert check_vm_id(good) == good


@pytest.mark.parametrize("bad", ["", "a" * 65, "a/b", "..", "a_b", "a b", "é", "a\n", "-" * 65])
def test_bad_ids_are_refused(bad):
    with pytest.raises(BadVmId, match="give 1 to 64 characters"):
        check_vm_id(bad)


def test_directories_are_private_and_ids_unique(tmp_path):
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    state = StateDir(root)
    assert root.stat().st_mode & 0o777 == 0o700  # an existing one is narrowed
    d = state.new("vm-1")
    assert d.path.stat().st_mode & 0o777 == 0o700
    with pytest.raises(StateError, match="a VM with id 'vm-1' exists"):
        state.new("vm-1")
    d.write(d.record, '{"x": 1}')
    assert d.record.stat().st_mode & 0o777 == 0o600 and d.read(d.record) == b'{"x": 1}'
    assert not list(d.path.glob(".*.tmp"))
    (state.vms / "not an id").mkdir()
    (state.vms / "stray-file").write_text("")
    assert state.ids() == ["vm-1"]
    state.delete(d)
    assert state.ids() == []


def test_a_symlinked_record_is_not_followed(tmp_path):
    state = StateDir(tmp_path / "s")
    d = state.new("a")
    (tmp_path / "secret").write_text("secret")
    d.record.symlink_to(tmp_path / "secret")
    with pytest.raises(StateError, match="cannot read"):
        d.read(d.record)


def test_pid_identity_survives_pid_reuse(tmp_path):
    state = StateDir(tmp_path / "s")
    d = state.new("a")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        d.write_pid(proc.pid)
        assert d.live_pid() == proc.pid
        start = proc_start_time(proc.pid)
        assert start is not None
        d.write(d.pid_file, f"{proc.pid} {start + 1}\n")  # another process now has this pid
        assert d.live_pid() is None
        d.write(d.pid_file, f"{proc.pid} {start}\n")
        proc.kill()
        proc.wait()
        assert d.live_pid() is None  # ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for junk in ("", "1 0", "x y", "-5 3", f"{os.getpid()}"):
        d.write(d.pid_file, junk)
        assert d.live_pid() is None, junk


def test_a_zombie_is_not_alive(tmp_path):
    proc = subprocess.Popen(["true"])
    for _ in range(200):
        if proc_start_time(proc.pid) is None:
            break
        time.sleep(0.01)
    assert proc_start_time(proc.pid) is None  # exited, not yet reaped: a zombie
    proc.wait()
