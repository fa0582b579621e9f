"""virtio-pci devices under Debian's unmodified kernel, in the lab: Linux enumerates corral's PCI
bus, binds virtio_pci + virtio_blk / virtio_rng, and really moves data through the queues."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL

SECTORS = 2048  # 1 MiB


def boot_with(lab, images, command: str, devices: str, timeout: float = 240.0):
    cmdline = f'{BASE_CMDLINE} -- sh -c "{command}"'
    return lab.run(
        f"{CORRAL} run --kernel {images['bzimage']} --initrd {images['initrd']} "
        f"--memory 512M {LAB_CPU} --no-reboot {devices} --cmdline '{cmdline}' </dev/null",
        timeout=timeout,
    )


def test_virtio_blk_and_rng_under_linux(lab, debian_build):
    images = need(debian_build)
    # the image is made on the host where the lab sees it (its 9p view of the host's root is
    # read-only and its /tmp is its own), then copied into the lab's writable /tmp
    host_dir = Path.home() / ".cache" / "corral" / "lab-scratch"
    host_dir.mkdir(parents=True, exist_ok=True)
    host_img = host_dir / f"disk-{os.getpid()}.img"
    host_img.write_bytes(b"".join(struct.pack("<Q", i) + b"CORRALDISK" + bytes(494) for i in range(SECTORS)))
    try:
        lab.check(f"cp {host_img} /tmp/lab-disk.img", timeout=60)
    finally:
        host_img.unlink()
    command = (
        "cat /sys/block/vda/size; cat /sys/block/vda/serial; echo; "
        "dd if=/dev/vda bs=512 skip=7 count=1 2>/dev/null | head -c 18 | od -An -tx1; "
        "echo WRITTEN-BY-GUEST | dd of=/dev/vda bs=512 seek=100 conv=notrunc,fsync 2>/dev/null; "
        "cat /sys/class/misc/hw_random/rng_current; "
        "dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -dc 0-9a-f; echo; "
        "grep -c virtio /proc/interrupts; ls /sys/bus/pci/devices"
    )
    res = boot_with(lab, images, command, "--disk /tmp/lab-disk.img,serial=corral-lab-7 --rng")
    out = res.output
    assert BANNER in out and res.status == 0, out
    assert re.search(rf"^{SECTORS}\r?$", out, re.M), out  # capacity in sectors
    assert "corral-lab-7" in out, out  # GET_ID
    sector7 = (struct.pack("<Q", 7) + b"CORRALDISK").hex(" ")
    assert sector7 in re.sub(r"\s+", " ", out), out  # sector 7's bytes
    assert "virtio_rng" in out, out
    rand = re.search(r"^([0-9a-f]{128})\r?$", out, re.M)
    assert rand and len(set(rand.group(1))) > 8, out
    assert "0000:00:01.0" in out and "0000:00:02.0" in out, out
    # the guest's write reached the image file
    data = lab.check("dd if=/tmp/lab-disk.img bs=512 skip=100 count=1 2>/dev/null | head -c 16", timeout=30)
    assert data.startswith("WRITTEN-BY-GUEST"), data


def test_pci_enumerates_without_complaints(lab, debian_build):
    images = need(debian_build)
    res = boot_with(lab, images, "dmesg | grep -i -e pci -e virtio", "--rng")
    out = res.output
    assert res.status == 0, out
    assert "PCI: Fatal" not in out and "System does not support PCI" not in out, out
    assert re.search(r"PCI: (MMCONFIG|ECAM) .*0xe0000000", out), out  # ECAM through MCFG
    assert "conflict" not in out.lower(), out
    assert "1af4:1044" in out, out  # virtio-rng, modern id
