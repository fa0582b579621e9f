"""corral.jail without a VM: option syntax, a config mapped into a jail, the interpreter's
binds, the uid choice, cgroups on this host's real hierarchies, the debug-hook switch, and the
CLI's one clear line for a jail that cannot be made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from support.cli import ROOT, corral, one_clear_line

from corral.config import DiskConfig, MachineConfig, NetConfig, VsockConfig
from corral.errors import ConfigError, FieldError
from corral.jail import JailOptions, map_firecracker, map_run
from corral.jail.cgroups import CgroupSet
from corral.jail.debug import hooks_built_in
from corral.jail.launch import _take_uid
from corral.jail.options import DEFAULT_RLIMITS, UID_RANGE, parse_cgroup, parse_rlimit
from corral.jail.rootfs import interpreter_binds, readable_by

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.mark.parametrize(
    "text,expected",
    [("nofile=1024", ("nofile", 1024)), ("fsize=1G", ("fsize", 1 << 30)), ("nproc=64", ("nproc", 64))],
)
def test_rlimits_parse(text, expected):
    assert parse_rlimit(text) == expected


@pytest.mark.parametrize("text", ["nofile", "files=3", "nofile=lots", "nproc=-1", "nofile=1e3"])
def test_bad_rlimits_name_the_option(text):
    with pytest.raises(ConfigError, match=r"--rlimit"):
        parse_rlimit(text)


def test_cgroup_settings_parse_and_refuse_paths_and_newlines():
    assert parse_cgroup("memory.max=512M") == ("memory.max", "512M")
    for bad in ("memory", "../etc/x=1", "memory.max=", "pids.max=1\n2", "Memory.max=1", "a/b.c=1"):
        with pytest.raises(ConfigError, match=r"--cgroup"):
            parse_cgroup(bad)


def test_options_default_and_override_rlimits():
    o = JailOptions.parse(rlimits=("nofile=100",))
    assert o.limits() == {**DEFAULT_RLIMITS, "nofile": 100}
    with pytest.raises(ConfigError, match="--id"):
        JailOptions.parse(id="a/b")
    with pytest.raises(ConfigError, match="--uid 0"):
        JailOptions.parse(uid=0)
    with pytest.raises(ConfigError, match="--netns"):
        JailOptions.parse(netns=Path("/no/such/netns"))


def test_a_config_maps_to_in_jail_paths(tmp_path):
    kernel, disk, base, cow = (tmp_path / n for n in ("k.elf", "d.img", "base.img", "d.cow"))
    for f in (kernel, disk, base):
        f.write_bytes(b"\0" * 4096)
    config = MachineConfig.build(
        kernel=kernel,
        cmdline="hello world",
        memory="64M",
        cpus=2,
        disks=[DiskConfig(path=disk, read_only=True, serial="s1"), DiskConfig(path=base, overlay=cow)],
        vsock=VsockConfig(cid=3, uds_path=tmp_path / "v.sock"),
        rng=True,
    )
    inner = map_run(config, tmp_path / "api.sock", "/dev/kvm")
    assert inner.argv == [
        "run", "--kernel", "/vm/kernel", "--cmdline", "hello world", "--cpus", "2", "--memory", "64M",
        "--disk", "/vm/disk0,ro,serial=s1", "--disk", "/vm/disk1,overlay=/vm/overlay1", "--rng",
        "--vsock", "cid=3,uds=/run/corral/vsock.sock", "--api", "/run/corral/api.sock", "--kvm", "/dev/kvm",
    ]  # fmt: skip
    binds = {b.inside: b for b in inner.binds}
    assert not binds["/vm/disk0"].writable and not binds["/vm/disk1"].writable  # ro, and an overlay's base
    assert binds["/vm/overlay1"].writable and inner.create == [cow]
    assert not any(b.exec_ok for b in inner.binds)  # the VM's files are never executable in the jail
    assert inner.sockets == {tmp_path / "v.sock": "vsock.sock", tmp_path / "api.sock": "api.sock"}
    assert {n.inside for n in inner.nodes} == {"/dev/kvm", "/dev/null", "/dev/urandom"}


def test_a_vms_taps_are_made_by_the_jail(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0")
    nets = [NetConfig(tap="t0", host_ip="10.0.2.1/24"), NetConfig(tap="t1", mac="52:54:00:00:00:01")]
    inner = map_run(MachineConfig.build(kernel=kernel, nets=nets), None, "/dev/kvm")
    assert inner.taps == [("t0", "10.0.2.1/24"), ("t1", "")]
    assert "tap=t0,host-ip=10.0.2.1/24" in inner.argv and "tap=t1,mac=52:54:00:00:00:01" in inner.argv
    assert "/dev/net/tun" in {n.inside for n in inner.nodes}
    plain = map_run(MachineConfig.build(kernel=kernel), None, "/dev/kvm")
    assert "/dev/net/tun" not in {n.inside for n in plain.nodes}  # only a VM with a NIC gets tun


def test_what_a_jail_cannot_give_is_one_clear_error(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0")
    with pytest.raises(FieldError, match="disks\\[0\\].path: .* does not exist"):
        map_run(
            MachineConfig.build(kernel=kernel, disks=[DiskConfig(path=tmp_path / "no")]), None, "/dev/kvm"
        )
    with pytest.raises(FieldError, match="kernel: .* is not a regular file"):
        map_run(MachineConfig.build(kernel=tmp_path), None, "/dev/kvm")
    with pytest.raises(ConfigError, match="no pseudo-terminals"):
        map_run(MachineConfig.build(kernel=kernel, virtio_console="pty"), None, "/dev/kvm")


def test_the_interpreter_binds_hold_this_python_and_corral():
    binds = interpreter_binds()
    exposed = [b.host for b in binds]
    assert all(not b.writable for b in binds)
    import corral

    def covered(path: str) -> bool:
        return any(path == e or path.startswith(e + "/") for e in exposed)

    assert covered(os.path.realpath(sys.executable))
    assert covered(os.path.dirname(os.__file__))  # the stdlib
    assert covered(str(Path(corral.__file__).resolve()))
    assert not covered("/etc/passwd") and not covered("/bin/sh") and not covered("/usr/bin/python3")


def test_readable_by_follows_owner_group_other(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o640)
    st = f.stat()
    assert readable_by(str(f), st.st_uid, 12345, write=True)
    assert readable_by(str(f), 54321, st.st_gid, write=False)
    assert not readable_by(str(f), 54321, st.st_gid, write=True)
    assert not readable_by(str(f), 54321, 54321, write=False)


@root_only
def test_a_chosen_uid_is_free_and_held_until_released():
    uid, lock = _take_uid(None)
    assert lock is not None and uid in UID_RANGE
    try:
        other, lock2 = _take_uid(None)  # a second VM meanwhile gets another uid
        assert other != uid
        assert lock2 is not None
        os.close(lock2)
    finally:
        os.close(lock)
    assert _take_uid(4242) == (4242, None)  # the operator's uid is taken as given


@root_only
def test_cgroup_limits_land_on_this_hosts_hierarchy_and_go_away():
    cg = CgroupSet(f"unit-{os.getpid()}")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        cg.apply((("pids.max", "7"),))
        assert len(cg.dirs) == 1 and cg.applied[0].endswith("pids.max=7")
        assert (cg.dirs[0] / "pids.max").read_text().strip() == "7"
        cg.join(sleeper.pid)
        assert str(sleeper.pid) in (cg.dirs[0] / "cgroup.procs").read_text().split()
        d = cg.dirs[0]
    finally:
        sleeper.kill()
        sleeper.wait()
        time.sleep(0.05)
        cg.remove()
    assert not d.exists()
    with pytest.raises(ConfigError, match="no 'nosuch' controller"):
        CgroupSet("unit-x").apply((("nosuch.max", "1"),))
    bad = CgroupSet(f"unit-y-{os.getpid()}")
    try:
        with pytest.raises(ConfigError, match="has no file pids.nosuch"):
            bad.apply((("pids.nosuch", "1"),))
    finally:
        bad.remove()


def test_debug_hooks_are_a_source_tree_feature_the_wheel_leaves_out():
    assert hooks_built_in()  # the tests run from the source tree
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "corral.jail.debugbuild" in find["exclude"]


def test_a_hook_needs_the_build_flag(tmp_path):
    """Without corral.jail.debugbuild (as in the wheel) the variable alone runs nothing."""
    marker = tmp_path / "ran"
    hook = tmp_path / "hook.py"
    hook.write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = (
        "import sys, corral.jail.debug as d\n"
        "if sys.argv[1] == 'off':\n    d.hooks_built_in = lambda: False\n"
        "t = d.start_debug_hook(None)\nt and t.join(10)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CORRAL_DEBUG_HOOK": str(hook)}
    subprocess.run([sys.executable, "-c", code, "off"], env=env, check=True, timeout=60)
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", code, "on"], env=env, check=True, timeout=60)
    assert marker.exists()


@root_only
@pytest.mark.parametrize(
    "jail_args,run_args,needle",
    [
        (["--cgroup", "pids"], [], "--cgroup 'pids': use FILE=VALUE"),
        (["--rlimit", "nofile=x"], [], "--rlimit 'nofile=x'"),
        (["--id", "../x"], [], "--id '../x'"),
        (["--uid", "0"], [], "--uid 0"),
        ([], ["--virtio-console", "pty"], "--virtio-console: a jail has no pseudo-terminals"),
        (
            [],
            ["--disk", "/nonexistent.img"],
            "--disk /nonexistent.img: path: /nonexistent.img does not exist",
        ),
        (["--cgroup", "nosuch.max=1"], [], "no 'nosuch' controller"),
    ],
)
def test_jail_cli_errors_are_one_line(tmp_path, jail_args, run_args, needle):
    r = corral("jail", "--chroot-base", str(tmp_path), *jail_args, "--", "run", "--image", "probe", *run_args)
    assert needle in one_clear_line(r)
    assert list((tmp_path / "corral").iterdir() if (tmp_path / "corral").exists() else []) == []


@root_only
def test_a_file_the_vm_uid_cannot_write_is_named(tmp_path):
    disk = tmp_path / "root.img"
    disk.write_bytes(b"\0" * 4096)
    disk.chmod(0o600)
    line = one_clear_line(
        corral("jail", "--chroot-base", str(tmp_path), "--uid", "931999", "--", "run", "--image", "probe",
               "--disk", str(disk))
    )  # fmt: skip
    assert f"--disk {disk}: path: the jail's uid 931999 cannot write {disk}: chown 931999 it" in line
    assert list((tmp_path / "corral").iterdir()) == []  # nothing left behind


def test_jail_runs_only_run():
    assert "runs `corral run` or `corral firecracker`" in one_clear_line(corral("jail", "--", "doctor"))


def test_a_firecracker_config_file_maps_into_the_jail(tmp_path):
    kernel, rootfs, data = (tmp_path / n for n in ("vmlinux", "rootfs.ext4", "data.img"))
    for f in (kernel, rootfs, data):
        f.write_bytes(b"\0" * 4096)
    cfg = tmp_path / "vm.json"
    cfg.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"},
                "drives": [
                    {"drive_id": "root", "is_root_device": True, "path_on_host": str(rootfs)},
                    {
                        "drive_id": "data",
                        "is_root_device": False,
                        "path_on_host": str(data),
                        "is_read_only": True,
                    },
                ],
                "vsock": {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")},
                "logger": {"log_path": str(tmp_path / "fc.log")},
            }
        )
    )
    inner = map_firecracker(
        api_sock=tmp_path / "fc.sock", instance_id="vm1", config_file=cfg, no_api=False, log_path=None,
        level=None, metrics_path=None, boot_timer=False, kvm_path="/dev/kvm",
    )  # fmt: skip
    assert inner.argv == [
        "firecracker", "--id", "vm1", "--api-sock", "/run/corral/api.sock",
        "--config-file", "/run/corral/config.json", "--kvm", "/dev/kvm",
    ]  # fmt: skip
    mapped = json.loads(inner.run_files["config.json"])
    assert mapped["boot-source"]["kernel_image_path"] == "/vm/kernel"
    assert [d["path_on_host"] for d in mapped["drives"]] == ["/vm/drive0", "/vm/drive1"]
    assert mapped["vsock"]["uds_path"] == "/run/corral/vsock.sock"
    assert mapped["logger"]["log_path"] == "/vm/logger" and inner.create == [tmp_path / "fc.log"]
    writable = {b.inside for b in inner.binds if b.writable}
    assert writable == {"/vm/drive0", "/vm/logger"}
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": str(kernel)}, "network-interfaces": [
        {"iface_id": "eth0", "host_dev_name": "tap0"}]}))  # fmt: skip
    inner = map_firecracker(
        api_sock=tmp_path / "fc.sock", instance_id="vm1", config_file=cfg, no_api=True, log_path=None,
        level=None, metrics_path=None, boot_timer=False, kvm_path="/dev/kvm",
    )  # fmt: skip
    assert inner.taps == [("tap0", "")] and "/dev/net/tun" in {n.inside for n in inner.nodes}


@root_only
def test_a_jail_id_in_use_is_refused_and_its_jail_left_alone(tmp_path):
    live = tmp_path / "corral" / "busy" / "run"
    live.mkdir(parents=True)
    (live / "api.sock").write_text("another VM's")
    line = one_clear_line(
        corral("jail", "--chroot-base", str(tmp_path), "--id", "busy", "--", "run", "--image", "probe")
    )
    assert "--id busy: a jail with this id exists" in line
    assert (live / "api.sock").read_text() == "another VM's"


@root_only
def test_a_chroot_base_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "corral").symlink_to(tmp_path / "elsewhere")
    line = one_clear_line(
        corral("jail", "--chroot-base", str(tmp_path / "base"), "--", "run", "--image", "probe")
    )
    assert "leads through a symbolic link" in line
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_the_jail_needs_root(monkeypatch, tmp_path):
    from corral.errors import HostError
    from corral.jail import Inner, Jail

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HostError, match="the jail needs root"):
        Jail(JailOptions(chroot_base=tmp_path), Inner(argv=["run"]))
    assert list(tmp_path.iterdir()) == []
