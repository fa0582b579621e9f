"""The lab's fetched QEMU (tests/support/lab_qemu.py) is checked before it is cached: too old a
QEMU (one without the nested DR7 fix) or one this host cannot load is refused with a clear error,
and the lab passes its data directory to QEMU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from support.lab_qemu import _check_runs
from support.labhost import LabHost

from corral.errors import ConfigError, HostError


def _fake_qemu(tmp_path: Path, version_line: str, status: int = 0) -> Path:
    exe = tmp_path / "qemu-system-x86_64"
    exe.write_text(f"#!/bin/sh\necho '{version_line}'\nexit {status}\n")
    exe.chmod(0o755)
    return exe


def test_a_qemu_new_enough_passes(tmp_path):
    _check_runs(_fake_qemu(tmp_path, "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"))


def test_bookworms_qemu_is_too_old_for_the_dr7_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"QEMU 7\.2.*\(9, 1\) or later"):
        _check_runs(_fake_qemu(tmp_path, "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"))


def test_a_qemu_that_does_not_run_is_refused(tmp_path):
    with pytest.raises(HostError, match="--version failed"):
        _check_runs(_fake_qemu(tmp_path, "error while loading shared libraries", status=127))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_qemu_missing_a_library_here_is_refused_by_name(tmp_path):
    # a real executable linked against a library that is then removed, as a backports QEMU
    # would be on a host without one of its libraries
    lib = tmp_path / "libcorralgone.so"
    src = tmp_path / "main.c"
    (tmp_path / "lib.c").write_text("int corral_gone(void) { return 0; }\n")
    src.write_text("int corral_gone(void);\nint main(void) { return corral_gone(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "lib.c")], check=True)
    exe = tmp_path / "qemu-system-x86_64"
    subprocess.run(["gcc", "-o", str(exe), str(src), f"-L{tmp_path}", "-lcorralgone"], check=True)
    lib.unlink()
    with pytest.raises(HostError, match="lacks: libcorralgone.so"):
        _check_runs(exe)


def test_the_lab_passes_another_qemus_data_directory(tmp_path):
    host = LabHost(qemu="/x/qemu", qemu_data=tmp_path / "share", kernel=Path("k"), initrd=Path("i"))
    host._workdir = tmp_path
    args = host.qemu_args()
    assert args[0] == "/x/qemu"
    assert args[args.index("-L") + 1] == str(tmp_path / "share")
    plain = LabHost(kernel=Path("k"), initrd=Path("i"))
    plain._workdir = tmp_path
    assert "-L" not in plain.qemu_args()
