"""corral/daemon/cgroups.py: the layout read from mountinfo (v2, v1, hybrid, a container's
partial view), and limits written for real into this host's cgroups: v1 where it mounts the
controllers, and v2 on a cgroup2 mounted for the test; a process moved in and the groups
removed after it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from corral.daemon.cgroups import CgroupError, Cgroups, Hierarchy, IoLimit, Limits, discover

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / {v2} rw,relatime - cgroup2 cgroup2 rw
"""
SELF = "8:pids:/\n7:blkio:/\n4:memory:/jobs/j1\n1:cpu:/\n9:name=systemd:/\n0::/\n"


def test_discover_reads_a_hybrid_layout(tmp_path):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("hugetlb\n")
    (tmp_path / "mountinfo").write_text(HYBRID.format(v2=v2))
    (tmp_path / "cgroup").write_text(SELF)
    found = discover(tmp_path / "mountinfo", tmp_path / "cgroup")
    by_mount = {str(h.mount): h for h in found}
    assert by_mount["/sys/fs/cgroup/memory"] == Hierarchy(
        1, Path("/sys/fs/cgroup/memory"), frozenset({"memory"}), "/jobs/j1"
    )
    assert by_mount[str(v2)].version == 2 and by_mount[str(v2)].controllers == {"hugetlb"}
    assert "/sys/fs/cgroup/systemd" not in by_mount and "/sys/fs/cgroup/cpuacct" not in by_mount
    cg = Cgroups(found, parent="corral")
    # the v2 hierarchy lacks cpu, memory, pids, io here: each limit goes to its v1 hierarchy
    assert cg.where("cpu").mount == Path("/sys/fs/cgroup/cpu")  # type: ignore[union-attr]
    assert cg.where("io").mount == Path("/sys/fs/cgroup/blkio")  # type: ignore[union-attr]
    group = cg.group("vm-1")
    assert Path("/sys/fs/cgroup/memory/jobs/j1/corral/vm-1") in [d for _, d in group.dirs]
    assert v2 / "corral" / "vm-1" in [d for _, d in group.dirs]  # v2 tracks the process anyway


def test_discover_prefers_v2_where_it_holds_the_controller(tmp_path):
    v2 = tmp_path / "cg"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    mountinfo = f"29 23 0:26 / {v2} rw - cgroup2 cgroup2 rw\n"
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text("0::/system.slice/corral.service\n")
    cg = Cgroups(discover(tmp_path / "mountinfo", tmp_path / "cgroup"))
    for c in ("cpu", "memory", "pids", "io"):
        assert cg.where(c).version == 2  # type: ignore[union-attr]
    [(_, d)] = cg.group("a").dirs
    assert d == v2 / "system.slice/corral.service/corral/a"


def test_a_container_sees_its_cgroup_as_the_root(tmp_path):
    mountinfo = "40 31 0:38 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    (tmp_path / "mountinfo").write_text(mountinfo)
    (tmp_path / "cgroup").write_text("4:memory:/docker/abc/inner\n")
    [h] = discover(tmp_path / "mountinfo", tmp_path / "cgroup")
    assert h.own == "/inner" and h.base() == Path("/sys/fs/cgroup/memory/inner")


def test_names_are_checked():
    with pytest.raises(CgroupError, match="not a plain name"):
        Cgroups([], parent="../etc")
    with pytest.raises(CgroupError, match="cannot name a cgroup"):
        Cgroups([]).group("a/b")
    with pytest.raises(ValueError):
        IoLimit(device="8:0; rm")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def _limits_roundtrip(cg: Cgroups, limits: Limits) -> tuple[list[str], list[str]]:
    """Create, join a process, check it is there, end it, remove; returns (applied, not applied)."""
    vm = f"t{os.getpid()}-{time.monotonic_ns() % 10**6}"
    group = cg.create(vm, limits)
    proc = _sleeper()
    try:
        cg.join(group, proc.pid)
        assert cg.pids(group) == {proc.pid}
        for h, d in group.dirs:
            assert d.is_dir()
            if h.version == 2:
                text = Path(f"/proc/{proc.pid}/cgroup").read_text()
                assert f"0::{h.own.rstrip('/')}/{cg.parent}/{vm}".replace("//", "/") in text
        for a in group.report.applied:
            assert Path(a.file).read_text().split() == a.value.split(), a
    finally:
        proc.kill()
        proc.wait()
    assert cg.remove(group) == []
    assert not any(d.exists() for _, d in group.dirs)
    parent_dirs = {d.parent for _, d in group.dirs}
    for p in parent_dirs:
        p.rmdir()
    return [f"{a.limit}={a.value}" for a in group.report.applied], group.report.not_applied


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("writing cgroups needs root")


def test_limits_on_this_hosts_v1_hierarchies():
    _need_root()
    cg = Cgroups(parent=f"corral-unit-{os.getpid()}")
    v1 = [h for h in cg.hierarchies if h.version == 1]
    if not any("cpu" in h.controllers for h in v1):
        pytest.skip("this host mounts no v1 cpu hierarchy")
    if cg.where("cpu").version != 1:  # type: ignore[union-attr]
        pytest.skip("cpu is served by cgroup v2 here")
    applied, not_applied = _limits_roundtrip(cg, Limits(cpus=0.25, memory_mib=64, pids=32))
    assert "cpu.max=25000" in applied and "cpu.max=100000" in applied  # quota and period
    assert f"memory.max={64 << 20}" in applied and "pids.max=32" in applied
    assert not_applied == []


def test_a_memory_limit_is_enforced_on_v1():
    _need_root()
    cg = Cgroups(parent=f"corral-unit-{os.getpid()}")
    h = cg.where("memory")
    if h is None or h.version != 1:
        pytest.skip("no v1 memory hierarchy")
    group = cg.create("hog", Limits(memory_mib=16))
    hog = subprocess.Popen(
        [
            "python3",
            "-c",
            "import sys; sys.stdin.read(1); b = bytearray(64 << 20); b[::4096] = b'x' * (16384)",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        cg.join(group, hog.pid)
        assert hog.stdin is not None
        hog.stdin.write(b"g")
        hog.stdin.close()
        assert hog.wait(30) != 0  # killed by the OOM killer of its group
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()
    assert cg.remove(group) == []
    for _, d in group.dirs:
        d.parent.rmdir()


def test_limits_on_a_cgroup2_mounted_here(tmp_path):
    _need_root()
    mnt = tmp_path / "cg2"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "cgroup2", "none", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount cgroup2 here: {r.stderr.strip()}")
    try:
        ctrls = frozenset((mnt / "cgroup.controllers").read_text().split())
        own = next(
            (
                line[3:]
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.startswith("0::")
            ),
            "/",
        )
        cg = Cgroups([Hierarchy(2, mnt, ctrls, own)], parent=f"corral-unit-{os.getpid()}")
        applied, not_applied = _limits_roundtrip(cg, Limits(cpus=0.5, memory_mib=64, pids=32))
        # each limit is applied where this kernel lets v2 have the controller, and said otherwise
        for name, ctrl, value in (
            ("cpu.max", "cpu", "50000 100000"),
            ("memory.max", "memory", str(64 << 20)),
            ("pids.max", "pids", "32"),
        ):
            if ctrl in ctrls:
                assert f"{name}={value}" in applied
            else:
                assert any(n.startswith(f"{name}: this host has no {ctrl}") for n in not_applied), not_applied
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_bad_value_fails_the_create_and_leaves_nothing():
    _need_root()
    cg = Cgroups(parent=f"corral-unit-{os.getpid()}")
    if cg.where("io") is None:
        pytest.skip("no io/blkio controller")
    # a device that does not exist: the kernel refuses the io limit
    with pytest.raises(CgroupError, match="cannot set io.max"):
        cg.create("bad-io", Limits(io=[IoLimit(device="250:250", rbps=1000)]))
    group = cg.group("bad-io")
    assert not any(d.exists() for _, d in group.dirs)
    for _, d in group.dirs:
        if d.parent.exists():
            d.parent.rmdir()
