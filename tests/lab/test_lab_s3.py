"""ACPI S3 in the lab: Debian's kernel under corral on a real SVM /dev/kvm suspends to RAM with
`echo mem > /sys/power/state`, the host wakes it through corral's API (`corral wake`), and the
guest runs its next command with /proc/uptime continuing (not restarted: RAM was kept).
"""

from __future__ import annotations

import re

from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL


def test_linux_suspends_to_ram_and_the_host_wakes_it(lab, debian_build):
    images = need(debian_build)
    guest = (
        "echo STATES `cat /sys/power/state`; echo BEFORE; cat /proc/uptime; "
        "echo mem > /sys/power/state; echo RESUMED rc=$?; echo AFTER; cat /proc/uptime"
    )
    cmdline = f'{BASE_CMDLINE} no_console_suspend -- sh -c "{guest}"'
    d = "/tmp/labs3"
    script = f"""
rm -rf {d}; mkdir -p {d}
timeout 400 {CORRAL} run --kernel {images["bzimage"]} --initrd {images["initrd"]} --memory 512M --cpus 2 \
  {LAB_CPU} --no-reboot --api {d}/api.sock --cmdline '{cmdline}' </dev/null > {d}/out 2>&1 &
VM=$!
for i in $(seq 150); do
    kill -0 $VM 2>/dev/null || break
    timeout 30 {CORRAL} status --api {d}/api.sock 2>/dev/null | grep -q ^suspended && break; sleep 0.5
done
timeout 30 {CORRAL} status --api {d}/api.sock > {d}/status 2>&1
sleep 2   # asleep a while: the wake must not depend on the host being quick
timeout 30 {CORRAL} wake --api {d}/api.sock > {d}/wake 2>&1; echo WAKE_EXIT=$? >> {d}/wake
wait $VM; echo CORRAL_EXIT=$? > {d}/exit
"""
    lab.run(script, timeout=500)
    out = lab.run(
        f"cat {d}/exit; echo ---STATUS; cat {d}/status; echo ---WAKE; cat {d}/wake; echo ---OUT; cat {d}/out",
        timeout=60,
    ).output
    assert BANNER in out, out
    states = re.search(r"STATES (.*)", out)
    assert states and "mem" in states.group(1).split(), out
    assert "---STATUS\nsuspended" in out.replace("\r", ""), out
    assert "WAKE_EXIT=0" in out, out
    assert "RESUMED rc=0" in out, out
    before = float(re.search(r"BEFORE\s+([\d.]+)", out).group(1))
    after = float(re.search(r"AFTER\s+([\d.]+)", out).group(1))
    assert before < after < before + 300, out  # uptime went on from where it was
    assert "CORRAL_EXIT=0" in out, out
