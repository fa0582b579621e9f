"""The probe guest in a jail (`corral run --jail`, `corral jail -- run`): it runs as it does
outside (SMP, its disk written through virtio-blk, an overlay and a console file made for it),
the cgroup limits asked for are on the VMM while it runs, and nothing of the jail is left on
the host when it ends."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import corral, corral_popen
from support.disks import PROBE_WRITE, patterned_image, sector
from support.results import parse_results

from corral.api import ControlClient
from corral.images.probe import build_probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")

UID = 931_003
JAIL_LINE = re.compile(
    r"corral: jail (\S+): pid (\d+), uid (\d+) gid (\d+), run dir (\S+); (.*); set up in ([\d.]+) ms"
)


def test_run_jail_boots_the_probe_with_two_cpus(tmp_path):
    r = corral(
        "run", "--jail", "--kernel", str(build_probe()), "--cmdline", "smp", "--cpus", "2", "--memory", "64M"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert parse_results(r.stdout)["cpus"] == "2"
    m = JAIL_LINE.search(r.stderr)
    assert m, r.stderr
    assert int(m[3]) >= 900_000 and m[6] == "no cgroup limits"
    assert float(m[7]) < 2000  # what a VM pays for its jail (README: ~40 ms here)
    assert not Path(m[5]).parent.exists()  # the jail's directory went with it


def test_a_jailed_guest_writes_its_disk_overlay_and_console(tmp_path):
    disk = patterned_image(tmp_path / "d.img", 4096)
    base = patterned_image(tmp_path / "base.img", 4096)
    os.chown(disk, UID, UID)
    os.chmod(tmp_path, 0o755)
    r = corral(
        "jail", "--chroot-base", str(tmp_path / "jails"), "--uid", str(UID), "--",
        "run", "--kernel", str(build_probe()), "--cmdline", "blk-check", "--memory", "64M",
        "--disk", f"{disk},serial=probe-serial-1", "--disk", f"{base},overlay={tmp_path / 'd.cow'}",
        "--virtio-console", f"file={tmp_path / 'hvc0.log'}",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    res = parse_results(r.stdout)
    assert res["blk_ok"] == "1" and res["blk_serial"] == "probe-serial-1", r.stdout
    assert sector(disk, 3).startswith(PROBE_WRITE)  # the write crossed the jail to the host file
    for made in (tmp_path / "d.cow", tmp_path / "hvc0.log"):  # created for the VM, 0600, its own
        st = made.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (UID, 0o600)
    assert list((tmp_path / "jails" / "corral").iterdir()) == []


def test_cgroup_limits_hold_the_running_vmm_and_go_with_it(tmp_path):
    api = tmp_path / "vm.sock"
    proc = corral_popen(
        "jail", "--chroot-base", str(tmp_path / "jails"), "--id", f"cg-{os.getpid()}",
        "--cgroup", "pids.max=64", "--cgroup", "memory.limit_in_bytes=512M", "--",
        "run", "--kernel", str(build_probe()), "--memory", "64M", "--cmdline", "mem-touch 16M forever",
        "--api", str(api),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not api.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        assert api.is_symlink()  # the operator's path leads into the jail's run directory
        assert ControlClient(api).status().state == "running"
        pids = Path(f"/sys/fs/cgroup/pids/corral/cg-{os.getpid()}")
        memory = Path(f"/sys/fs/cgroup/memory/corral/cg-{os.getpid()}")
        if not pids.exists():  # a cgroup2 host: both live in one directory
            pids = memory = Path(f"/sys/fs/cgroup/corral/cg-{os.getpid()}")
        assert (pids / "pids.max").read_text().strip() == "64"
        assert int((memory / "memory.limit_in_bytes").read_text()) == 512 << 20
        members = (pids / "cgroup.procs").read_text().split()
        # one process, and its threads (vCPU, device loop, ...) counted too
        assert len(members) == 1 and int((pids / "pids.current").read_text()) >= 2
        ControlClient(api).stop()
        _, err = proc.communicate(timeout=30)
        assert b"cgroup v1 pids.max=64; cgroup v1 memory.limit_in_bytes=512M" in err or b"cgroup v2" in err
        assert not pids.exists() and not memory.exists() and not api.exists()
    finally:
        if proc.poll() is None:
            proc.terminate()  # the jailer kills the VMM and cleans up
            proc.wait(30)


def test_firecracker_api_in_a_jail_with_curl(tmp_path):
    """Firecracker's jailer contract: the API socket is reached from the host, and the paths
    an API client names are inside the jail, where the operator put the files (its run dir)."""
    sock = tmp_path / "fc.sock"
    jail_id = f"fc-{os.getpid()}"
    base = tmp_path / "jails"
    proc = corral_popen(
        "jail", "--chroot-base", str(base), "--id", jail_id, "--", "firecracker", "--api-sock", str(sock)
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        run_dir = base / "corral" / jail_id / "run"
        shutil.copy(build_probe(), run_dir / "probe.elf")  # what Firecracker's docs say: hard-link or copy in

        def put(path: str, body: str) -> str:
            r = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(sock),
                 "-X", "PUT", f"http://localhost{path}", "-H", "Content-Type: application/json", "-d", body],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            return r.stdout

        outside = put("/boot-source", f'{{"kernel_image_path": "{build_probe()}", "boot_args": "hello"}}')
        assert outside == "400"  # the host's path is not in the jail
        assert (
            put("/boot-source", '{"kernel_image_path": "/run/corral/probe.elf", "boot_args": "hello"}')
            == "204"
        )
        assert put("/machine-config", '{"vcpu_count": 1, "mem_size_mib": 64}') == "204"
        assert put("/actions", '{"action_type": "InstanceStart"}') == "204"
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert parse_results(out.decode())["hello"] == "1"
        assert not sock.exists() and not (base / "corral" / jail_id).exists()
    finally:
        if proc.poll() is None:
            proc.terminate()  # the jailer kills the VMM and cleans up
            proc.wait(30)


def test_sigterm_to_the_jailer_ends_the_vm_and_leaves_nothing(tmp_path):
    api = tmp_path / "vm.sock"
    jail_id = f"term-{os.getpid()}"
    proc = corral_popen(
        "jail", "--chroot-base", str(tmp_path / "jails"), "--id", jail_id, "--cgroup", "pids.max=64", "--",
        "run", "--kernel", str(build_probe()), "--memory", "64M", "--cmdline", "mem-touch 16M forever",
        "--api", str(api),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not api.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    vmm = int(JAIL_LINE.search(proc.stderr.readline().decode())[2])
    proc.terminate()
    assert proc.wait(30) == 128 + 9  # the VMM, pid 1 of its namespace, is killed
    assert not os.path.exists(f"/proc/{vmm}")
    assert not api.is_symlink() and not (tmp_path / "jails" / "corral" / jail_id).exists()
    assert not any(Path("/sys/fs/cgroup").glob(f"*/corral/{jail_id}"))


@pytest.fixture
def netns():
    name = f"jailtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def _ip(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", netns, *args], capture_output=True, text=True, timeout=10).stdout


def test_a_jailed_guest_sends_on_a_tap_in_its_network_namespace(netns):
    """The jail makes the tap (in the VM's netns, owned by its uid, up, with its address), the
    unprivileged VMM attaches to it, and every frame reaches the host side; a tap the jail made
    goes with the VM, one the operator made stays (and shows what crossed it)."""

    def run(cmdline: str) -> subprocess.CompletedProcess:
        return corral(
            "jail", "--netns", f"/run/netns/{netns}", "--uid", str(UID), "--",
            "run", "--kernel", str(build_probe()), "--memory", "64M", "--cmdline", cmdline,
            "--net", "tap=jt0,host-ip=10.77.0.1/24",
        )  # fmt: skip

    r = run("net-bench 1000")
    assert r.returncode == 0, r.stdout + r.stderr
    assert parse_results(r.stdout)["net_tx_frames"] == "1000"
    assert "jt0" not in _ip(netns, "link")  # made for the VM, gone with it
    subprocess.run(["ip", "-n", netns, "tuntap", "add", "jt0", "mode", "tap", "vnet_hdr"], check=True)
    r = run("net-bench 1500")
    assert r.returncode == 0, r.stdout + r.stderr
    stats = _ip(netns, "-s", "-j", "link", "show", "jt0")
    rx = json.loads(stats)[0]["stats64"]["rx"]["packets"]
    assert rx >= 1500, stats  # the guest's frames reached the host side of its tap
    assert "10.77.0.1/24" in _ip(netns, "addr", "show", "jt0")
    assert not os.path.exists("/sys/class/net/jt0")  # never on the host's own network
