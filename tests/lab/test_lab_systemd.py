"""`corral run --disk rootfs.ext4 --net tap`: a small Debian made with debootstrap
(tests/support/lab_rootfs.py) boots from virtio-blk to a systemd login prompt in the lab, and its
network answers the host."""

from __future__ import annotations

from support.lab_debian import LAB_CPU, need
from support.lab_rootfs import GUEST_IP, HOST_IP
from support.labhost import CORRAL
from support.labhost import PYTHON as PY

PING = "/tmp/.lab/busybox ping"  # the lab agent's busybox: the host may have no ping


def test_debian_with_systemd_boots_to_login_from_virtio_blk_and_answers_ping(lab, debian_rootfs):
    fs = need(debian_rootfs)
    d = "/tmp/labsd"
    stop = f"{PY} -c 'import sys; from corral.api import ControlClient; ControlClient(sys.argv[1]).stop()'"
    # the base image is the host's (read-only in the lab): the guest writes go to an overlay
    script = f"""
ip link set lo up; rm -rf {d}; mkdir -p {d}
timeout 500 {CORRAL} run --kernel {fs["kernel"]} --initrd {fs["initrd"]} --memory 512M {LAB_CPU} \
  --disk {fs["image"]},overlay={d}/root.cow --net tap=crl1,host-ip={HOST_IP}/24 --api {d}/api.sock \
  --cmdline 'console=ttyS0 root=/dev/vda rw quiet panic=-1' </dev/null > {d}/out 2>&1 &
VM=$!
for i in $(seq 800); do grep -q 'login:' {d}/out 2>/dev/null && break; kill -0 $VM || break; sleep 0.5; done
for i in $(seq 30); do {PING} -c 1 -W 2 {GUEST_IP} > /dev/null && break; done
{PING} -c 2 -W 5 {GUEST_IP}; echo PING_EXIT=$?
{stop} {d}/api.sock; wait $VM
echo ---GUEST; cat {d}/out
"""
    out = lab.run(script, timeout=560).output.replace("\r", "")
    guest = out.split("---GUEST", 1)[-1]
    assert "corral-guest login:" in guest, out  # systemd started getty on ttyS0
    assert "PING_EXIT=0" in out, out  # networkd configured eth0 on the tap
    assert "2 packets transmitted, 2 packets received" in out or "2 received" in out, out
