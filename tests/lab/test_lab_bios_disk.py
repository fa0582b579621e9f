"""SeaBIOS -> SYSLINUX from an MBR disk -> Debian with systemd to its login prompt, in the lab
(real SVM KVM): the disk is built on the host by corral.images.bootdisk (no root, Debian's own
syslinux/mtools/dosfstools), partition 1 the boot FAT with the rootfs's kernel and initramfs,
partition 2 the lab's systemd root file system (tests/support/lab_rootfs.py). No --kernel: the
guest's kernel comes off its own disk through the BIOS."""

from __future__ import annotations

import os
from pathlib import Path

from support.lab_debian import boot_disk_to_login, need

from corral.images.bootdisk import build_bios_disk


def test_seabios_boots_syslinux_and_debian_from_an_mbr_disk(lab, debian_rootfs):
    fs = need(debian_rootfs)
    scratch = Path.home() / ".cache" / "corral" / "lab-scratch"  # where the lab sees host files
    disk = scratch / f"bios-disk-{os.getpid()}.img"
    append = "console=ttyS0 root=/dev/vda2 rw quiet panic=-1"  # quiet: each console byte is an exit
    build_bios_disk(disk, Path(fs["kernel"]), Path(fs["initrd"]), append, root=Path(fs["image"]))
    out, guest = boot_disk_to_login(lab, disk, "seabios", "/tmp/labbios")
    assert "SeaBIOS" in guest and "SYSLINUX" in guest, out  # the BIOS, then the disk's loader
    assert "corral-guest login:" in guest, out  # the kernel off the disk mounted vda2, systemd ran
