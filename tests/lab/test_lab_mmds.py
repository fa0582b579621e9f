"""MMDS V2 for a real Debian guest, booted through the Firecracker API in the lab: `corral
firecracker` gets the boot source, the root drive (the lab's systemd Debian, read-only), a second
drive holding the guest's script, a tap and `PUT /mmds/config` + `PUT /mmds`; the guest's curl
asks for a token, is refused without one, and fetches its metadata with it.

The guest runs its script through systemd's `systemd.run=` (kernel-command-line.service, which
the boot goes to instead of the default target, then powers off), reading it from /dev/vdb: no
serial login needed. The script configures the interface itself (networkd is not started on
that path) and adds the route to the MMDS address, as Firecracker's guide says a guest must.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from support.lab_debian import need
from support.lab_rootfs import GUEST_IP
from support.labhost import CORRAL

METADATA = {"latest": {"meta-data": {"instance-id": "i-corral-lab", "zone": "lab-1"}}}

GUEST_SCRIPT = f"""#!/bin/sh
exec > /dev/ttyS0 2>&1
echo MMDS_SCRIPT_START
IF=
for i in $(seq 120); do IF=$(ls /sys/class/net | grep '^e' | head -n 1); [ -n "$IF" ] && break; sleep 0.5; done
echo "IFACE=$IF"
ip link set "$IF" up
ip addr add {GUEST_IP}/24 dev "$IF" 2>/dev/null
ip route add 169.254.169.254 dev "$IF"
TOKEN=
for i in $(seq 30); do
    TOKEN=$(curl -sf --max-time 5 -X PUT -H 'X-metadata-token-ttl-seconds: 600' http://169.254.169.254/latest/api/token) && break
    sleep 1
done
echo "TOKEN_LEN=${{#TOKEN}}"
echo "NO_TOKEN_STATUS=$(curl -s --max-time 10 -o /dev/null -w '%{{http_code}}' http://169.254.169.254/latest/meta-data/instance-id)"
echo "MMDS_ID=$(curl -s --max-time 10 -H "X-metadata-token: $TOKEN" http://169.254.169.254/latest/meta-data/instance-id)"
echo "MMDS_JSON=$(curl -s --max-time 10 -H "X-metadata-token: $TOKEN" -H 'Accept: application/json' http://169.254.169.254/latest/meta-data)"
echo MMDS_SCRIPT_END
exit 0
"""


def test_debian_guest_fetches_its_metadata_with_mmds_v2(lab, debian_rootfs):
    fs = need(debian_rootfs)
    scratch = Path.home() / ".cache" / "corral" / "lab-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    script_img = scratch / f"mmds-script-{os.getpid()}.img"
    body = GUEST_SCRIPT.encode()
    script_img.write_bytes(body + bytes(-len(body) % 4096 or 4096))  # whole sectors; NULs after `exit`
    d = "/tmp/labmmds"
    boot_args = (
        "console=ttyS0 quiet panic=-1 reboot=k "
        'systemd.run="/bin/sh /dev/vdb" systemd.run_success_action=poweroff systemd.run_failure_action=poweroff'
    )
    requests = [
        (
            "PUT",
            "/boot-source",
            {
                "kernel_image_path": str(fs["kernel"]),
                "initrd_path": str(fs["initrd"]),
                "boot_args": boot_args,
            },
        ),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 512}),
        (
            "PUT",
            "/drives/rootfs",
            {
                "drive_id": "rootfs",
                "path_on_host": str(fs["image"]),
                "is_root_device": True,
                "is_read_only": True,
            },
        ),
        (
            "PUT",
            "/drives/script",
            {
                "drive_id": "script",
                "path_on_host": str(script_img),
                "is_root_device": False,
                "is_read_only": True,
            },
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "guest_mac": "06:00:0a:00:02:0f", "host_dev_name": "crl2"},
        ),
        ("PUT", "/mmds/config", {"version": "V2", "network_interfaces": ["eth0"]}),
        ("PUT", "/mmds", METADATA),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ]
    calls = "\n".join(
        f"curl -sS --unix-socket {d}/fc.sock -X {m} -H 'Content-Type: application/json' "
        f"-w ' {m} {p} -> %{{http_code}}\\n' -d '{json.dumps(b)}' http://localhost{p} >> {d}/api.out 2>&1"
        for m, p, b in requests
    )
    script = f"""
ip link set lo up; rm -rf {d}; mkdir -p {d}
timeout 560 {CORRAL} firecracker --api-sock {d}/fc.sock --id lab-mmds </dev/null > {d}/serial 2> {d}/log &
VM=$!
for i in $(seq 100); do [ -S {d}/fc.sock ] && break; sleep 0.2; done
{calls}
wait $VM; echo FC_EXIT=$?
echo ---API; cat {d}/api.out; echo ---LOG; tail -n 30 {d}/log; echo ---SERIAL; cat {d}/serial
"""
    try:
        out = lab.run(script, timeout=600).output.replace("\r", "")
    finally:
        script_img.unlink(missing_ok=True)
    api = out.split("---API", 1)[-1].split("---LOG", 1)[0]
    assert api.count("-> 204") == len(requests), out  # every request accepted
    serial = out.split("---SERIAL", 1)[-1]
    assert "MMDS_SCRIPT_END" in serial, out
    assert "NO_TOKEN_STATUS=401" in serial, out  # V2: no token, no metadata
    assert "TOKEN_LEN=0" not in serial, out  # the PUT /latest/api/token gave one
    assert "MMDS_ID=i-corral-lab" in serial, out
    line = next(x for x in serial.splitlines() if x.startswith("MMDS_JSON="))
    assert json.loads(line.removeprefix("MMDS_JSON=")) == METADATA["latest"]["meta-data"], out
