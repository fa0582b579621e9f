"""HostResources (corral.config): an untrusted config (a snapshot's manifest, a migration
peer's hello) on the host resources the operator granted. Every host path, tap and address
comes from the grant, what the guest saw must agree, and anything not granted is refused by
field name."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import DiskConfig, HostResources, MachineConfig, NetConfig, VsockConfig
from corral.errors import FieldError


def incoming(**fields: object) -> MachineConfig:
    return MachineConfig.build(kernel="/evil/kernel", cmdline="x", **fields)


def test_a_config_without_host_resources_needs_no_grant():
    cfg = incoming(cpus=2, memory="64M", rng=True, balloon=True)
    out = HostResources().apply(cfg)
    assert out.cpus == 2 and out.memory == 64 << 20 and out.rng and out.balloon
    assert out.no_reboot  # the kernel it names is never booted


def test_the_granted_kernel_is_what_a_reboot_boots():
    out = HostResources(kernel=Path("/k"), initrd=Path("/i")).apply(incoming(initrd="/etc/shadow"))
    assert (out.kernel, out.initrd, out.no_reboot) == (Path("/k"), Path("/i"), False)
    with pytest.raises(FieldError, match="^initrd: give the kernel"):
        HostResources(initrd=Path("/i")).apply(incoming())


def test_disks_come_from_the_grant_by_position():
    cfg = incoming(disks=[DiskConfig(path="/etc/shadow", serial="d1"), DiskConfig(path="/x", read_only=True)])
    grant = HostResources(
        disks=(
            DiskConfig(path="/srv/a.img", overlay="/srv/a.cow"),
            DiskConfig(path="/srv/b.img", read_only=True),
        )
    )
    out = grant.apply(cfg)
    assert [(d.path, d.overlay, d.serial, d.read_only) for d in out.disks] == [
        (Path("/srv/a.img"), Path("/srv/a.cow"), "d1", False),
        (Path("/srv/b.img"), None, "", True),
    ]


def test_what_does_not_fit_is_refused_by_field():
    cfg = incoming(disks=[DiskConfig(path="/a", serial="d1")])
    with pytest.raises(FieldError) as exc:
        HostResources().apply(cfg, "the source")
    assert exc.value.problems == (("disks[0]", "the source has 1 disk(s): give one for each, in order"),)
    with pytest.raises(FieldError) as exc:
        HostResources(
            disks=(DiskConfig(path="/b", read_only=True, serial="zz"), DiskConfig(path="/c"))
        ).apply(cfg)
    assert [f for f, _ in exc.value.problems] == ["disks[0].read_only", "disks[0].serial", "disks[1]"]


def test_nics_take_the_granted_tap_and_keep_the_guests_mac():
    want = NetConfig(tap="vm0", host_ip="10.0.0.1/8")
    out = HostResources(nets=(NetConfig(tap="mine0", host_ip="10.0.2.1/24"),)).apply(incoming(nets=[want]))
    assert (out.nets[0].tap, out.nets[0].host_ip) == ("mine0", "10.0.2.1/24")
    assert out.nets[0].guest_mac() == want.guest_mac()  # derived from the old tap's name, kept
    with pytest.raises(FieldError, match=r"nets\[0\]\.mac: the guest's MAC is 52:54:00"):
        HostResources(nets=(NetConfig(tap="mine0", mac="02:00:00:00:00:01"),)).apply(incoming(nets=[want]))
    with pytest.raises(FieldError, match=r"nets\[0\]: the snapshot has 1 NIC"):
        HostResources().apply(incoming(nets=[want]))
    # clones name their taps after the grant's
    assert out.for_clone(1).nets[0].tap == "mine0c1"


def test_vsock_and_console():
    cfg = incoming(vsock=VsockConfig(cid=7, uds_path="/etc/passwd"), virtio_console="file=/etc/shadow")
    with pytest.raises(FieldError) as exc:
        HostResources().apply(cfg)
    assert [f for f, _ in exc.value.problems] == ["vsock", "virtio_console"]
    out = HostResources(
        vsock=VsockConfig(cid=7, uds_path="/run/vm.vsock"), virtio_console="file=/var/log/vm.log"
    ).apply(cfg)
    assert out.vsock == VsockConfig(cid=7, uds_path="/run/vm.vsock")
    assert out.virtio_console == "file=/var/log/vm.log"
    with pytest.raises(FieldError, match="vsock.cid: the guest's CID is 7, not 8"):
        HostResources(vsock=VsockConfig(cid=8, uds_path="/v"), virtio_console="pty").apply(cfg)
    # a pty names nothing on the host: it needs no grant
    assert HostResources().apply(incoming(virtio_console="pty")).virtio_console == "pty"
    with pytest.raises(FieldError, match="virtio_console: the snapshot has no virtio-console"):
        HostResources(virtio_console="pty").apply(incoming())
    with pytest.raises(FieldError, match="vsock: the snapshot has no vsock"):
        HostResources(vsock=VsockConfig(cid=3, uds_path="/v")).apply(incoming())


def test_a_config_granted_its_own_resources_is_itself():
    cfg = incoming(
        disks=[DiskConfig(path="/a", serial="s")],
        vsock=VsockConfig(cid=3, uds_path="/v"),
        virtio_console="file=/log",
    )
    assert cfg.host_resources().apply(cfg) == cfg


def test_firmware_comes_from_the_grant_and_an_ungranted_kernel_is_dropped():
    fw_incoming = MachineConfig.build(firmware="/evil/bios.bin", disks=[DiskConfig(path="/x")])
    out = HostResources(firmware="seabios", disks=(DiskConfig(path="/srv/d.img"),)).apply(fw_incoming)
    assert (out.firmware, out.kernel, out.no_reboot) == ("seabios", None, False)  # reboots into the BIOS
    with pytest.raises(FieldError, match="^firmware: the snapshot booted through firmware: give its image"):
        HostResources(disks=(DiskConfig(path="/srv/d.img"),)).apply(fw_incoming)
    with pytest.raises(FieldError, match="^firmware: the source did not boot through firmware"):
        HostResources(firmware="seabios").apply(incoming(), origin="the source")
    # fw_cfg serves the kernel item from config.kernel: a file the manifest named is never kept
    out = HostResources().apply(incoming(initrd="/etc/shadow"))
    assert (out.kernel, out.initrd, out.no_reboot) == (None, None, True)
