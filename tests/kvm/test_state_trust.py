"""A snapshot directory is not trusted with the host (issue 13, finding 2): the disks, NICs,
vsock socket, console file and kernel that its manifest names are taken from the operator's
grant (HostResources) on restore, and one not granted is refused by field name before anything
is opened. Real snapshots of the probe on the real /dev/kvm, with their manifests edited."""

from __future__ import annotations

import json
import os

import pytest
from support.cli import corral, one_clear_line
from support.live_probe import LiveProbe, assert_continues, reference_rounds

from corral.config import DiskConfig, HostResources
from corral.errors import FieldError
from corral.machine import Machine
from corral.state.snapshot import MANIFEST

CMD = "mem-touch 16M forever"


def snapshot_of(tmp_path, **cfg: object):
    p = LiveProbe.boot(CMD, **cfg)
    try:
        p.wait_rounds(1)
        p.machine.snapshot(tmp_path / "snap")
        return tmp_path / "snap", p.last_round()
    finally:
        p.close()


def edit_manifest(snap, **config: object) -> None:
    m = json.loads((snap / MANIFEST).read_text())
    m["config"].update(config)
    (snap / MANIFEST).write_text(json.dumps(m))


@pytest.fixture
def secret(tmp_path):
    f = tmp_path / "root-only"
    f.write_bytes(b"do not touch\n".ljust(512) * 8)
    f.chmod(0o600)
    return f


def test_a_manifest_that_adds_host_resources_is_refused(tmp_path, secret):
    snap, _ = snapshot_of(tmp_path)
    before = secret.read_bytes()
    hostile = [
        ({"disks": [{"path": str(secret)}]}, r"disks\[0\]: the snapshot has 1 disk"),
        ({"virtio_console": f"file={secret}"}, "virtio_console: the snapshot has a virtio-console"),
        ({"vsock": {"cid": 3, "uds_path": str(secret)}}, "vsock: the snapshot has a vsock device"),
        ({"nets": [{"tap": "evil0", "host_ip": "10.0.0.1/8"}]}, r"nets\[0\]: the snapshot has 1 NIC"),
    ]
    original = (snap / MANIFEST).read_text()
    for config, error in hostile:
        (snap / MANIFEST).write_text(original)
        edit_manifest(snap, **config)
        with pytest.raises(FieldError, match=error):
            Machine.from_snapshot(snap)
    assert secret.read_bytes() == before
    assert not os.path.exists("/sys/class/net/evil0")


def test_a_manifest_edited_to_name_another_disk_gets_the_granted_one(tmp_path, secret):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    snap, at = snapshot_of(tmp_path, disks=[DiskConfig(path=img)])
    # restored without a grant: refused, naming the field
    with pytest.raises(FieldError, match=r"disks\[0\]: the snapshot has 1 disk\(s\): give one for each"):
        Machine.from_snapshot(snap)
    # the manifest now names a root-only file: the operator's grant is what opens
    edit_manifest(snap, disks=[{"path": str(secret)}])
    before = secret.read_bytes()
    p = LiveProbe(Machine.from_snapshot(snap, host=HostResources(disks=(DiskConfig(path=img),))))
    try:
        assert [d.path for d in p.machine.config.disks] == [img]
        p.machine.start()
        p.wait_rounds(at + 2)
        assert_continues(reference_rounds(CMD, p.last_round()), p)
    finally:
        p.close()
    assert secret.read_bytes() == before
    # what the guest saw must agree: a read-only grant for a writable disk is refused
    with pytest.raises(FieldError, match=r"disks\[0\]\.read_only: the guest's disk is writable"):
        Machine.from_snapshot(snap, host=HostResources(disks=(DiskConfig(path=img, read_only=True),)))


def test_the_kernel_of_a_manifest_is_never_booted(tmp_path, secret):
    """A reboot would load the kernel and initrd the manifest names into guest memory (where
    the guest can read them): without a granted kernel the restored guest stops on reset."""
    snap, _ = snapshot_of(tmp_path)
    edit_manifest(snap, initrd=str(secret), no_reboot=False)
    m = Machine.from_snapshot(snap)
    assert m.config.no_reboot
    # nor read for the guest through fw_cfg's kernel items: the restored config names none
    assert (m.config.kernel, m.config.initrd) == (None, None)
    kernel = json.loads((snap / MANIFEST).read_text())["config"]["kernel"]
    granted = Machine.from_snapshot(snap, host=HostResources(kernel=kernel))
    assert not granted.config.no_reboot and granted.config.initrd is None


def test_restore_and_clone_take_grants_on_the_command_line(tmp_path, secret):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    p = LiveProbe.boot("mem-touch 16M 200", disks=[DiskConfig(path=img, read_only=True)])
    try:
        p.wait_rounds(1)
        p.machine.snapshot(tmp_path / "snap")
    finally:
        p.close()
    snap = str(tmp_path / "snap")
    line = one_clear_line(corral("restore", snap))
    assert line.startswith("corral: error: --disk: the snapshot has 1 disk(s)"), line
    line = one_clear_line(corral("restore", snap, "--disk", str(img)))
    assert "--disk" in line and "read_only" in line and "with ro" in line, line
    r = corral("restore", snap, "--disk", f"{img},ro")
    assert r.returncode == 0 and "RESULT" in r.stdout, r.stderr
    r = corral("clone", snap, "-n", "2", "--disk", f"{img},ro")
    assert r.returncode == 0 and "[clone 1] RESULT" in r.stdout, r.stderr
    line = one_clear_line(corral("clone", snap, "--disk", f"{img},ro", "--disk", str(secret)))
    assert "--disk: the snapshot has only 1 disk(s)" in line, line
