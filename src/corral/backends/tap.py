"""Linux tap devices: the host end of a guest's virtio-net (devices/virtio/net.py).

A tap is opened with a virtio-net header in front of every frame (IFF_VNET_HDR, 12 bytes: the
virtio 1.x layout), so checksum and segmentation offloads pass between the guest and the host
stack untouched. Opening /dev/net/tun with a name that does not exist creates the interface;
it disappears when corral closes it, unless it was made persistent beforehand (`ip tuntap add`).
The host side (link up, an address) is set up with pyroute2.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import re
import struct
from typing import Any

from corral.errors import ConfigError, HostError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFF_UP = 0x1  # <net/if.h>: the link's administrative state
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR_LEN = 12
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def check_tap_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise ConfigError(
            f"'{name}' cannot name a network interface: use 1 to 15 letters, digits, '-', '_' or '.'"
        )
    return name


def preload() -> tuple[Any, Any]:
    """pyroute2's IPRoute and NetlinkError, imported on first use: pyroute2 takes over a second
    to import and only a VM with a NIC needs it. A process whose NICs may be made later on a
    seccomp-filtered thread (`corral firecracker`: the API builds the machine) calls this before
    its filters, as a filtered thread cannot map an extension module's code. (pyroute2's tc
    module reads /proc/net/psched on import and warns where there is none, as in the jail;
    corral uses no tc.)"""
    logging.getLogger("pyroute2.netlink.rtnl.tcmsg.common").setLevel(logging.ERROR)
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    return IPRoute, NetlinkError


class Tap:
    """An open tap device: `fd` carries frames with a 12-byte virtio-net header each."""

    def __init__(self, name: str, *, host_ip: str | None = None) -> None:
        check_tap_name(name)
        self.existed = os.path.exists(f"/sys/class/net/{name}")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise HostError(
                f"cannot open /dev/net/tun ({exc.strerror}): load the tun module and "
                "run corral as root or with CAP_NET_ADMIN"
            ) from None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as exc:
            os.close(self.fd)
            if exc.errno == errno.EBUSY:
                raise HostError(
                    f"tap '{name}' is in use by another program (another VM?): give another name"
                ) from None
            if exc.errno == errno.EPERM:
                raise HostError(
                    f"no permission to create tap '{name}': run corral as root or with "
                    "CAP_NET_ADMIN, or create it first with `ip tuntap add "
                    f"{name} mode tap user $USER`"
                ) from None
            if exc.errno == errno.EINVAL:
                raise HostError(f"'{name}' exists and is not a tap device: give another name") from None
            raise HostError(f"cannot create tap '{name}': {exc.strerror}") from None
        self.name = name
        try:
            self._host_setup(host_ip)
        except BaseException:
            self.close()
            raise

    def _host_setup(self, host_ip: str | None) -> None:
        IPRoute, NetlinkError = preload()

        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.name)[0]
                # only what is missing: a tap made for an unprivileged VMM (`ip tuntap add ... user`,
                # the jail) is already up with its address, and changing either needs CAP_NET_ADMIN
                if not ipr.get_links(idx)[0]["flags"] & IFF_UP:
                    ipr.link("set", index=idx, state="up")
                if host_ip:
                    iface = ipaddress.ip_interface(host_ip)
                    have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx)}
                    if (str(iface.ip), iface.network.prefixlen) not in have:
                        ipr.addr(
                            "replace", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
                        )
        except NetlinkError as exc:
            raise HostError(f"cannot set up tap '{self.name}' on the host: {exc}") from None

    def set_offload(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool) -> None:
        """What the tap may hand the guest: partial checksums and TSO, as the guest negotiated."""
        flags = (
            (TUN_F_CSUM if csum else 0)
            | (TUN_F_TSO4 if tso4 else 0)
            | (TUN_F_TSO6 if tso6 else 0)
            | (TUN_F_TSO_ECN if ecn else 0)
        )
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(
            f"'{text}' is not a MAC address: write six hex pairs like 52:54:00:12:34:56"
        ) from None
    if mac[0] & 1:
        raise ConfigError(f"{text} is a multicast address: a NIC needs a unicast MAC (first byte even)")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
