"""SeaBIOS -> SYSLINUX from an MBR disk -> Debian with systemd to its login prompt, in the lab
(real SVM KVM): the disk is built on the host by corral.images.bootdisk (no root, Debian's own
syslinux/mtools/dosfstools), partition 1 the boot FAT with the rootfs's kernel and initramfs,
partition 2 the lab's systemd root file system (tests/support/lab_rootfs.py). No --kernel: the
guest's kernel comes off its own disk through the BIOS."""

from __future__ import annotations

import os
from pathlib import Path

from support.lab_debian import LAB_CPU, need
from support.labhost import CORRAL

from corral.images.bootdisk import build_bios_disk


def test_seabios_boots_syslinux_and_debian_from_an_mbr_disk(lab, debian_rootfs):
    fs = need(debian_rootfs)
    scratch = Path.home() / ".cache" / "corral" / "lab-scratch"  # where the lab sees host files
    disk = scratch / f"bios-disk-{os.getpid()}.img"
    append = "console=ttyS0 root=/dev/vda2 rw quiet panic=-1"  # quiet: each console byte is an exit
    build_bios_disk(disk, Path(fs["kernel"]), Path(fs["initrd"]), append, root=Path(fs["image"]))
    d = "/tmp/labbios"
    script = f"""
rm -rf {d}; mkdir -p {d}
timeout 840 {CORRAL} run --firmware seabios --disk {disk},overlay={d}/disk.cow --memory 512M {LAB_CPU} \
  </dev/null > {d}/out 2>&1 &
VM=$!
for i in $(seq 1650); do grep -q 'login:' {d}/out 2>/dev/null && break; kill -0 $VM || break; sleep 0.5; done
kill $VM; wait $VM
echo ---GUEST; cat {d}/out
"""
    try:
        out = lab.run(script, timeout=900).output.replace("\r", "")
    finally:
        disk.unlink(missing_ok=True)
    guest = out.split("---GUEST", 1)[-1]
    assert "SeaBIOS" in guest and "SYSLINUX" in guest, out  # the BIOS, then the disk's loader
    assert "corral-guest login:" in guest, out  # the kernel off the disk mounted vda2, systemd ran
