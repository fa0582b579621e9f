"""Debian's unmodified kernel using corral's other virtio devices, in the lab (real SVM KVM):
it pings the host over virtio-net on a tap, echoes over vsock (both directions of connection),
writes to hvc0, reads /dev/hwrng, and gives memory back when the balloon inflates. One boot
answers all of them; the host side of each runs in the lab next to corral."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL
from support.labhost import PYTHON as PY

HERE = Path(__file__).parent

# host side of the vsock test, run inside the lab: serve <uds>_1235 (the guest connects there
# after the echo), connect to the guest's port 1234 through <uds>, echo a message
HOST_VSOCK = r"""
import os, socket, sys, threading, time
uds = sys.argv[1]
srv = socket.socket(socket.AF_UNIX); srv.bind(uds + "_1235"); srv.listen(1)
def serve():
    c, _ = srv.accept(); data = c.recv(100); c.sendall(b"from-host:" + data); c.close()
threading.Thread(target=serve, daemon=True).start()
for _ in range(600):
    if b"LISTENING" in open(sys.argv[2], "rb").read(): break
    time.sleep(0.5)
s = socket.socket(socket.AF_UNIX); s.connect(uds); s.sendall(b"CONNECT 1234\n")
print("HOST GOT", s.recv(64).decode().strip(), flush=True)
s.sendall(b"echo-me-please"); print("HOST GOT ECHO", s.recv(64).decode(), flush=True)
s.close(); time.sleep(5)
"""


def test_net_vsock_console_rng_balloon_under_linux(lab, debian_build, tmp_path):
    images = need(debian_build)
    scratch = Path.home() / ".cache" / "corral" / "lab-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    echo = scratch / f"vsock_echo-{os.getpid()}"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(echo), str(HERE / "vsock_echo.c")], check=True)
    size = echo.stat().st_size
    img = scratch / f"echo-{os.getpid()}.img"
    img.write_bytes(echo.read_bytes() + bytes(-size % 512 or 512))
    host_py = scratch / f"host_vsock-{os.getpid()}.py"
    host_py.write_text(HOST_VSOCK)
    guest = (
        "ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; ping -c 2 -W 5 10.0.2.1; "
        "echo hvc-says-hello > /dev/hvc0; "
        "dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -dc 0-9a-f; echo; "
        f"head -c {size} /dev/vda > /tmp/ve; chmod +x /tmp/ve; /tmp/ve 1234; "
        # the host inflates the balloon by 128 MiB now: wait until free memory shows it,
        # then give the host time to read the balloon's account before powering off
        "F0=`grep MemFree /proc/meminfo | tr -dc 0-9`; for i in `seq 240`; do "
        "F=`grep MemFree /proc/meminfo | tr -dc 0-9`; [ $((F0 - F)) -ge 122880 ] && break; sleep 0.5; done; "
        "echo BALLOONED $(((F0 - F) / 1024)) MiB; sleep 45; "
        "echo BALLOON `cat /sys/bus/virtio/drivers/virtio_balloon/*/features 2>/dev/null | head -c 6`"
    )
    cmdline = f'{BASE_CMDLINE} -- sh -c "{guest}"'
    d = "/tmp/labdev"
    script = f"""
ip link set lo up; rm -rf {d}; mkdir -p {d}; cp {img} {d}/echo.img
timeout 300 {CORRAL} run --kernel {images["bzimage"]} --initrd {images["initrd"]} --memory 512M {LAB_CPU} --no-reboot \
  --net tap=crl0,host-ip=10.0.2.1/24 --vsock cid=3,uds={d}/v.sock --disk {d}/echo.img,ro --rng \
  --virtio-console file={d}/hvc.log --balloon --api {d}/api.sock --cmdline '{cmdline}' </dev/null > {d}/out 2>&1 &
VM=$!
timeout 200 {PY} {host_py} {d}/v.sock {d}/out > {d}/host.out 2>&1 &
for i in $(seq 400); do grep -q ECHOED {d}/out 2>/dev/null && break; sleep 0.5; done
timeout 30 {CORRAL} balloon --api {d}/api.sock 128M > {d}/balloon1.out 2>&1
for i in $(seq 240); do grep -q BALLOONED {d}/out 2>/dev/null && break; sleep 0.5; done
for i in $(seq 15); do   # the guest sends the pages' numbers after taking them: the host's count lags
    timeout 30 {CORRAL} balloon --api {d}/api.sock > {d}/balloon2.out 2>&1
    grep -q "guest gave 128 MiB" {d}/balloon2.out && break; sleep 1
done
wait $VM; echo CORRAL_EXIT=$? > {d}/exit
"""
    try:
        lab.run(script, timeout=450)
        # read the results in a second command, so a step that hung still leaves its evidence
        out = lab.run(
            f"cat {d}/exit; cat {d}/out; echo ---HOST; cat {d}/host.out; echo ---HVC; "
            f"cat {d}/hvc.log; echo ---BALLOON1; cat {d}/balloon1.out; echo ---BALLOON2; "
            f"cat {d}/balloon2.out",
            timeout=60,
        ).output
    finally:
        for p in (echo, img, host_py):
            p.unlink(missing_ok=True)
    assert BANNER in out and "CORRAL_EXIT=0" in out, out
    assert re.search(r"2 packets transmitted, 2 (packets )?received", out), out  # virtio-net
    assert "HOST GOT OK" in out and "HOST GOT ECHO echo-me-please" in out, out  # host -> guest
    assert "ECHOED 14" in out and "HOST SAID from-host:from-guest" in out, out  # guest -> host
    assert "---HVC\nhvc-says-hello" in out.replace("\r", ""), out  # virtio-console
    assert re.search(r"^[0-9a-f]{64}\r?$", out, re.M), out  # hwrng
    m = re.search(
        r"guest gave (\d+) MiB; host memory behind guest RAM (\d+) MiB", out.split("---BALLOON2")[1]
    )
    assert m and int(m.group(1)) == 128, out  # balloon
    seen = re.search(r"^BALLOONED (\d+) MiB", out, re.M)
    assert seen and int(seen.group(1)) >= 120, out  # the guest felt it
