"""MMDS against a real TCP/IP stack and a real client: Linux in a network namespace plays the
guest and `curl` asks the metadata service, V1 and V2 (token PUT, then GET).

The namespace's interface is a tap; a bridge thread in the test reads the frames Linux sends
on it and hands them to a virtio-net device's transmit queue through the Python driver (what a
guest's virtio-net driver would do), and writes the frames the device puts in its receive queue
back into the tap. The device's own backend is a second tap on the host, which must see none of
the MMDS traffic. The data store and the MMDS configuration go through FirecrackerVmm, as
`PUT /mmds`, `PATCH /mmds` and `PUT /mmds/config` set them.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.fakes import FakeLoop
from support.virtio_driver import Driver

from corral.backends.tap import Tap
from corral.devices.mmds import MMDS_MAC
from corral.devices.virtio.net import RXQ, TXQ, VNET_HDR_LEN, VirtioNet
from corral.firecracker.models import MmdsConfig, NetworkInterface
from corral.firecracker.vmm import FirecrackerVmm

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("curl"),
    reason="needs root, /dev/net/tun and curl",
)

GUEST_MAC = bytes.fromhex("525400c0ff01")
GUEST_ADDR = "169.254.0.2/16"
METADATA = {"latest": {"meta-data": {"instance-id": "i-corral", "local-ipv4": "169.254.0.2"}}}
RX_BUFS = 32
BUF = 2048
MMDS_IP = bytes([169, 254, 169, 254])
ETH_P_ALL = 0x0003


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Bridge:
    ns: str
    host_tap: str
    dev: VirtioNet
    drv: Driver
    sniffer: socket.socket  # every frame the device's tap carries

    def tap_frames(self) -> list[bytes]:
        """The frames that reached the device's tap since the last call."""
        out = []
        while True:
            try:
                out.append(self.sniffer.recv(65536))
            except BlockingIOError:
                return out


def is_mmds(frame: bytes) -> bool:
    return MMDS_IP in frame or MMDS_MAC in frame


def _pump(guest_tap: Tap, drv: Driver, stop: threading.Event) -> None:
    """Frames Linux sends -> the transmit queue; what the receive queue gets -> back to Linux."""
    tx_addr, _ = drv.alloc(VNET_HDR_LEN + 65550)
    rx = [drv.alloc(BUF) for _ in range(RX_BUFS)]
    for b in rx:
        drv.submit(RXQ, [(b, True)], kick=False)
    drv.kick(RXQ)
    while not stop.is_set():
        r, _, _ = select.select([guest_tap.fd], [], [], 0.1)
        if not r:
            continue
        try:
            frame = os.read(guest_tap.fd, VNET_HDR_LEN + 65550)
        except BlockingIOError:
            continue
        drv.mem.write(tx_addr, frame)
        drv.submit(TXQ, [((tx_addr, len(frame)), False)])
        drv.used(TXQ)
        for head, n in drv.used(RXQ):
            os.write(guest_tap.fd, drv.mem.read(rx[head][0], n))
            drv.submit(RXQ, [(rx[head], True)], head=head)  # the buffer goes back


@pytest.fixture(scope="module")
def bridge() -> Iterator[Bridge]:
    suffix = uuid.uuid4().hex[:6]
    ns, guest_name, host_name = f"crmm{suffix}", f"crmg{suffix}", f"crmh{suffix}"
    sh("ip", "netns", "add", ns)
    guest_tap = host_tap = None
    stop = threading.Event()
    thread = None
    drv = None
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        guest_tap = Tap(guest_name)
        # the guest's interface goes into the namespace; the open fd stays attached to it
        sh("ip", "link", "set", guest_name, "netns", ns)
        for cmd in (
            ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"],
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", GUEST_ADDR, "dev", guest_name],
            ["ip", "link", "set", guest_name, "up"],
        ):
            sh("ip", "netns", "exec", ns, *cmd)
        host_tap = Tap(host_name)
        Path(f"/proc/sys/net/ipv6/conf/{host_name}/disable_ipv6").write_text("1")
        sniffer.bind((host_name, 0))
        sniffer.setblocking(False)
        dev = VirtioNet(host_tap, GUEST_MAC, FakeLoop())
        drv = Driver(dev)
        drv.setup()
        thread = threading.Thread(target=_pump, args=(guest_tap, drv, stop), daemon=True)
        thread.start()
        yield Bridge(ns, host_name, dev, drv, sniffer)
    finally:
        stop.set()
        sniffer.close()
        if thread is not None:
            thread.join(5)
        if drv is not None:
            drv.close()  # closes the host tap through the device
        elif host_tap is not None:
            host_tap.close()
        if guest_tap is not None:
            guest_tap.close()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def mmds_vmm(version: str) -> FirecrackerVmm:
    vmm = FirecrackerVmm("mmds-curl")
    vmm.put_net(NetworkInterface(iface_id="eth0", host_dev_name="unused0"))
    vmm.put_mmds_config(MmdsConfig(version=version, network_interfaces=["eth0"]))  # type: ignore[arg-type]
    vmm.put_mmds(METADATA)
    return vmm


def curl(b: Bridge, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", b.ns, "curl", "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def use(b: Bridge, vmm: FirecrackerVmm) -> None:
    (stack,) = vmm._mmds_stacks(["eth0"], vmm.mmds_config).values()
    b.dev.filter = stack


def test_curl_v1_reads_the_metadata_as_json_and_imds(bridge):
    vmm = mmds_vmm("V1")
    use(bridge, vmm)
    bridge.tap_frames()
    out = curl(bridge, "-H", "Accept: application/json", "http://169.254.169.254/latest/meta-data")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == METADATA["latest"]["meta-data"]
    out = curl(bridge, "http://169.254.169.254/latest/meta-data/")
    assert out.stdout.split("\n") == ["instance-id", "local-ipv4"]
    # PATCH /mmds is seen by the next request
    vmm.patch_mmds({"latest": {"meta-data": {"instance-id": "i-patched"}}})
    out = curl(bridge, "http://169.254.169.254/latest/meta-data/instance-id")
    assert out.stdout == "i-patched"
    out = curl(bridge, "-o", "/dev/null", "-w", "%{http_code}", "http://169.254.169.254/nothing")
    assert out.stdout == "404"
    assert bridge.dev.filter.stats["requests"] == 4  # type: ignore[union-attr]
    assert not [f for f in bridge.tap_frames() if is_mmds(f)], "MMDS traffic reached the tap"


def test_curl_v2_token_then_get(bridge):
    use(bridge, mmds_vmm("V2"))
    bridge.tap_frames()
    out = curl(bridge, "-o", "/dev/null", "-w", "%{http_code}", "http://169.254.169.254/latest/meta-data")
    assert out.stdout == "401"  # V2 refuses a GET without a token
    token = curl(
        bridge,
        "-X",
        "PUT",
        "-H",
        "X-metadata-token-ttl-seconds: 21600",
        "http://169.254.169.254/latest/api/token",
    )
    assert token.returncode == 0 and token.stdout, token.stderr
    out = curl(
        bridge,
        "-H",
        f"X-metadata-token: {token.stdout}",
        "-H",
        "Accept: application/json",
        "http://169.254.169.254/latest/meta-data",
    )
    assert json.loads(out.stdout) == METADATA["latest"]["meta-data"]
    out = curl(bridge, "-o", "/dev/null", "-w", "%{http_code}", "-H", "X-metadata-token: forged",
               "http://169.254.169.254/latest/meta-data")  # fmt: skip
    assert out.stdout == "401"
    assert not [f for f in bridge.tap_frames() if is_mmds(f)], "MMDS traffic reached the tap"


def test_other_traffic_still_reaches_the_tap(bridge):
    use(bridge, mmds_vmm("V1"))
    bridge.tap_frames()
    # a request to a neighbour that is not MMDS: its ARP request goes out through the device's tap
    curl(bridge, "--max-time", "1", "http://169.254.0.9/")
    neighbour = bytes([169, 254, 0, 9])
    frames = bridge.tap_frames()
    assert any(neighbour in f for f in frames) and bridge.dev.stats["tx_frames"] > 0
