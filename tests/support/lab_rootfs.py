"""A small Debian root filesystem for the lab: debootstrap (minbase + systemd, the cloud kernel
and its initramfs-tools initrd), a static address on the first Ethernet interface through
systemd-networkd, root without a password on the serial console, packed into a sparse ext4 image
with `mkfs.ext4 -d` (no loop mount).

Built on the host before the lab boots (the lab sees the host's files read-only; corral there
boots the image through a copy-on-write overlay in the lab's tmpfs). Cached under
<corral cache>/lab/rootfs-<hash>/ (vmlinuz, initrd.img, rootfs.ext4), keyed by the recipe; the
entry appears whole or not at all. Needs root, debootstrap and the Debian archive.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from corral.errors import ConfigError, HostError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = [
    "systemd-sysv",
    "udev",
    "iproute2",
    "iputils-ping",
    "curl",  # the MMDS lab test (test_lab_mmds.py) fetches metadata with it
    "kmod",
    "initramfs-tools",
    "linux-image-cloud-amd64",
]
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
IMAGE_SIZE = "1G"
FILES = {
    "etc/hostname": "corral-guest\n",
    "etc/fstab": "/dev/vda / ext4 defaults 0 1\n",
    "etc/systemd/network/10-wired.network": f"[Match]\nName=e*\n\n[Network]\nAddress={GUEST_IP}/24\n",
}
NETWORKD = "etc/systemd/system/multi-user.target.wants/systemd-networkd.service"


def _recipe() -> str:
    text = repr((SUITE, MIRROR, PACKAGES, IMAGE_SIZE, sorted(FILES.items()), NETWORKD))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_rootfs(cache: Path) -> dict[str, Path]:
    """{"kernel", "initrd", "image"} of the lab's Debian root filesystem, built once."""
    final = cache / f"rootfs-{_recipe()}"
    if (final / "rootfs.ext4").exists():
        return _entry(final)
    if os.geteuid() != 0:
        raise HostError("building the Debian root filesystem needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        raise HostError("debootstrap not found: `apt-get install debootstrap` (make test does)")
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f".rootfs-tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    try:
        tree.mkdir(parents=True)
        print(
            f"[lab] debootstrap {SUITE} (minbase + systemd + cloud kernel) ...", file=sys.stderr, flush=True
        )
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tree), MIRROR],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            last = (res.stdout + res.stderr).strip().splitlines()[-1:] or ["?"]
            raise ConfigError(f"debootstrap failed (is {MIRROR} reachable?): {last[0]}")
        for rel, text in FILES.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_text(text)
        link = tree / NETWORKD
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to("/lib/systemd/system/systemd-networkd.service")
        subprocess.run(["chroot", str(tree), "passwd", "-d", "root"], check=True, capture_output=True)
        boot = tree / "boot"
        shutil.copy(next(boot.glob("vmlinuz-*")), work / "vmlinuz")
        shutil.copy(next(boot.glob("initrd.img-*")), work / "initrd.img")
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tree), str(work / "rootfs.ext4"), IMAGE_SIZE],
            check=True,
            capture_output=True,
        )
        shutil.rmtree(tree)
        os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _entry(final)


def _entry(d: Path) -> dict[str, Path]:
    return {"kernel": d / "vmlinuz", "initrd": d / "initrd.img", "image": d / "rootfs.ext4"}
