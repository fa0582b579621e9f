"""What the lab tests that boot the Debian guest under corral share: its kernel command line,
the lab's CPU options, the banner its /init prints, the skip for an image this host cannot
provide, and a boot from a disk through firmware to systemd's login prompt."""

from __future__ import annotations

import pytest

from support.labhost import CORRAL

# quiet: under nested TCG every console byte costs two exits, so a chatty boot takes minutes.
BASE_CMDLINE = "console=ttyS0 panic=-1 reboot=acpi quiet"
# The lab's emulated SVM does not hand the guest's XSETBV to KVM, so KVM never updates CPUID
# leaf 0xD for the guest's XCR0 and Linux warns "XSAVE consistency problem". That is the lab's
# CPU, not corral's machine model (real VT-x/AMD-V intercept XSETBV): hide XSAVE in the lab.
LAB_CPU = "--cpu-hide xsave"
BANNER = "corral debian guest:"


def need(build):
    """The value of a (value, reason) build fixture, or skip the test with the reason."""
    value, reason = build
    if value is None:
        pytest.skip(reason)
    return value


def boot_disk_to_login(lab, disk, firmware: str, d: str) -> tuple[str, str]:
    """Boot `disk` (a host file the lab sees, deleted afterwards) through `--firmware firmware`
    with a copy-on-write overlay in the lab's directory `d`, until systemd's login prompt or
    about 14 minutes; returns (the whole lab output, the guest's console)."""
    script = f"""
rm -rf {d}; mkdir -p {d}
timeout 840 {CORRAL} run --firmware {firmware} --disk {disk},overlay={d}/disk.cow --memory 512M {LAB_CPU} \
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
    return out, out.split("---GUEST", 1)[-1]
