"""corral.seccomp.cache: a launch loads the BPF compiled by an earlier one (no libseccomp), the
cached program is libseccomp's, and a cache file that is damaged, foreign or in a directory
others may write is never loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.cli import cli_env

from corral import seccomp
from corral.seccomp import cache

# enable + prepare as the CLI does, then a vCPU thread makes a forbidden call
LAUNCH = """
import sys, threading, socket
from corral import seccomp
seccomp.enable()
seccomp.prepare()
print("LIBSECCOMP" if "pyseccomp" in sys.modules else "NO-LIBSECCOMP", flush=True)
def body():
    seccomp.enter("vcpu")
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    print("SURVIVED", flush=True)
t = threading.Thread(target=body)
t.start()
t.join()
"""


def _launch(root) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LAUNCH],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env({"CORRAL_CACHE": str(root)}),
    )


def test_a_second_launch_loads_the_cached_filters_without_libseccomp(tmp_path):
    first = _launch(tmp_path)
    files = sorted(p.name for p in (tmp_path / "seccomp").iterdir())
    second = _launch(tmp_path)
    for r, lib in ((first, "LIBSECCOMP"), (second, "NO-LIBSECCOMP")):
        assert r.returncode == seccomp.EXIT_CODE, (r.stdout, r.stderr)
        assert r.stdout.split() == [lib], r.stdout
        assert "forbidden system call: socket (#41)" in r.stderr.strip().splitlines()[-1]
    assert [n.split("-")[0] for n in files] == sorted([*seccomp.KINDS, "names"])
    assert all(oct((tmp_path / "seccomp" / n).stat().st_mode & 0o777) == "0o600" for n in files)


KEY = cache.key("vcpu", 1, ["read", "write"], b"the rules' source")


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path))
    return tmp_path


def test_the_cached_program_is_libseccomps(root):
    fresh = seccomp.compile_bpf("vcpu", seccomp.TRAP)
    assert len(fresh) % cache.INSN == 0 and 0 < len(fresh) // cache.INSN <= cache.MAX_INSNS
    assert cache.program("vcpu", KEY, lambda: fresh) == fresh
    assert cache.program("vcpu", KEY, lambda: b"never called") == fresh  # read back, not compiled
    # the key follows the list: another action is another program
    assert seccomp.compile_bpf("vcpu", seccomp.LOG) != fresh


def test_a_damaged_file_is_compiled_again(root):
    good = seccomp.compile_bpf("loop", seccomp.TRAP)
    cache.program("loop", KEY, lambda: good)
    path = root / "seccomp" / cache.file_name("loop", KEY)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one bit of a jump offset: a weaker filter if it were loaded
    path.write_bytes(bytes(data))
    assert cache.read(path, KEY) is None
    assert cache.program("loop", KEY, lambda: good) == good
    assert cache.read(path, KEY) == good  # written anew
    path.write_bytes(path.read_bytes()[:20])  # truncated
    assert cache.read(path, KEY) is None


def test_another_keys_program_is_not_loaded(root):
    """The whole key is stored and compared: a program made for another list, action or
    version is compiled again, even where the file names' CRC-32 tags collide."""
    good = seccomp.compile_bpf("vcpu", seccomp.TRAP)
    other = cache.key("vcpu", 1, ["read"], b"the rules' source")
    assert other != KEY
    cache.program("vcpu", KEY, lambda: good)
    path = root / "seccomp" / cache.file_name("vcpu", KEY)
    assert cache.read(path, KEY) == good
    assert cache.read(path, other) is None
    # a collision of the name: another key's file where this key looks
    path.rename(root / "seccomp" / cache.file_name("vcpu", other))
    fresh = seccomp.compile_bpf("vcpu", seccomp.LOG)
    assert cache.program("vcpu", other, lambda: fresh) == fresh
    assert cache.read(root / "seccomp" / cache.file_name("vcpu", other), other) == fresh


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_file_another_user_owns_is_not_loaded(root):
    good = seccomp.compile_bpf("vcpu", seccomp.TRAP)
    cache.program("vcpu", KEY, lambda: good)
    path = root / "seccomp" / cache.file_name("vcpu", KEY)
    assert cache.read(path, KEY) == good
    os.chown(path, 65534, 65534)
    assert cache.read(path, KEY) is None
    os.chown(path, 0, 0)
    path.chmod(0o620)  # group-writable
    assert cache.read(path, KEY) is None


def test_a_directory_others_may_write_is_not_used(root):
    (root / "seccomp").mkdir(mode=0o700)
    assert cache.directory() == root / "seccomp"
    (root / "seccomp").chmod(0o777)
    assert cache.directory() is None
    calls = []
    assert cache.program("vcpu", KEY, lambda: calls.append(1) or b"\0" * 8) == b"\0" * 8
    assert calls == [1] and not (root / "seccomp" / cache.file_name("vcpu", KEY)).exists()


def test_load_refuses_what_is_no_program():
    for bad in (b"", b"\0" * 7, b"\0" * 8 * (cache.MAX_INSNS + 1)):
        with pytest.raises(OSError, match="not a seccomp program"):
            cache.load(bad)
