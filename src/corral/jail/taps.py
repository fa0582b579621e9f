"""Taps for a jailed VM: made by the jail (root, already in the VM's network namespace) before it
drops privileges, persistent and owned by the VM's uid, up and with the host address the config
asks for. The VMM then attaches to its tap by name without CAP_NET_ADMIN (the kernel lets a
tap's owner attach), finds it configured and changes nothing. Taps the jail made are deleted
when the VM ends; a tap the operator made beforehand is only lent.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from pathlib import Path

from corral.backends.tap import IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF

TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
TUNSETGROUP = 0x400454CE


def _ip(netns: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args] if netns is None else ["nsenter", f"--net={netns}", "ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def tap_exists(name: str, netns: Path | None) -> bool:
    return _ip(netns, "link", "show", "dev", name).returncode == 0


def delete_tap(name: str, netns: Path | None) -> None:
    _ip(netns, "link", "del", "dev", name)


def make_tap(name: str, uid: int, gid: int, host_ip: str) -> None:
    """In the jail's child, as root in the VM's netns: a persistent tap the VM's uid may attach."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOWNER, uid)
        fcntl.ioctl(fd, TUNSETGROUP, gid)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
    for args in (
        ["link", "set", "dev", name, "up"],
        ["addr", "replace", host_ip, "dev", name] if host_ip else [],
    ):
        if args:
            r = _ip(None, *args)  # already in the netns
            if r.returncode != 0:
                raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")
