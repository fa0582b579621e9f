"""corral/daemon/launcher.py: a VM process starts in a session of its own (so it outlives the
daemon and no terminal signal reaches it), as the daemon's child, with stdin on /dev/null and
stdout + stderr appended to its private log."""

from __future__ import annotations

import os
import time

import pytest

from corral.daemon.launcher import LaunchError, SpawnLauncher


def test_a_vm_process_gets_its_own_session_and_its_log(tmp_path):
    log = tmp_path / "console"
    log.write_bytes(b"earlier\n")
    os.chmod(log, 0o600)
    pid = SpawnLauncher().launch(["--help"], log_path=log)
    assert os.getsid(pid) == pid or _ended(pid)  # a session leader (if still there to ask)
    _, status = os.waitpid(pid, 0)  # and this process's child
    assert os.waitstatus_to_exitcode(status) == 0
    text = log.read_text()
    assert text.startswith("earlier\n") and "Usage:" in text  # appended
    assert log.stat().st_mode & 0o777 == 0o600


def test_session_stdin_and_stderr_as_the_launcher_sets_them(tmp_path):
    # a stand-in for the interpreter that reports what it was given
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "args $*"\n'
        'echo "sid $(cut -d" " -f6 /proc/$$/stat) pid $$"\n'
        'echo "stdin [$(cat)]"\n'
        'echo "to stderr" >&2\n'
    )
    fake.chmod(0o700)
    log = tmp_path / "log"
    pid = SpawnLauncher(python=str(fake)).launch(["firecracker", "--id", "x"], log_path=log)
    os.waitpid(pid, 0)
    lines = log.read_text().splitlines()
    assert lines[0] == "args -m corral firecracker --id x"
    sid, _, shell_pid = lines[1].split()[1:]
    assert sid == shell_pid == str(pid)  # a session of its own
    assert lines[2:] == ["stdin []", "to stderr"]


def test_a_missing_interpreter_is_one_clear_error(tmp_path):
    with pytest.raises(LaunchError, match="cannot start /no/python for a VM"):
        SpawnLauncher(python="/no/python").launch(["--help"], log_path=tmp_path / "log")


def _ended(pid: int) -> bool:
    time.sleep(0)
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True
