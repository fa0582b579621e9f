"""A Debian guest keeps counting across snapshot/restore and live migration, in the lab (real
SVM KVM, unmodified kernel): its timers, interrupts and memory must all survive the move."""

from __future__ import annotations

import re

from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL
from support.labhost import PYTHON as PY


def counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^COUNT (\d+)\r?$", text, re.M)]


def test_counter_survives_snapshot_restore_and_migration(lab, debian_build):
    images = need(debian_build)
    guest = "i=0; while :; do i=$((i+1)); echo COUNT $i; sleep 0.5; done"
    cmdline = f'{BASE_CMDLINE} -- sh -c "{guest}"'
    d = "/tmp/labstate"

    def wait_for(f: str, pat: str) -> str:
        return f"for i in $(seq 240); do grep -q '{pat}' {f} 2>/dev/null && break; sleep 0.5; done"

    # under TCG a count takes a second or more: wait for lines, not for a fixed time
    def wait_counts(f: str, n: int) -> str:
        return (
            f"for i in $(seq 240); do [ $(cat {f} 2>/dev/null | grep -c '^COUNT') -ge {n} ] "
            "&& break; sleep 0.5; done"
        )

    stop = f"{PY} -c 'import sys; from corral.api import ControlClient; ControlClient(sys.argv[1]).stop()'"
    script = f"""
ip link set lo up; rm -rf {d}; mkdir -p {d}
timeout 200 {CORRAL} run --kernel {images["bzimage"]} --initrd {images["initrd"]} --memory 256M {LAB_CPU} --no-reboot \
  --api {d}/a.sock --cmdline '{cmdline}' </dev/null > {d}/out1 2>&1 &
A=$!
{wait_for(f"{d}/out1", "^COUNT 6")}
timeout 60 {CORRAL} snapshot --api {d}/a.sock {d}/snap; echo SNAPSHOT_EXIT=$?
timeout 150 {CORRAL} receive --listen 127.0.0.1:7010 --insecure --api {d}/b.sock </dev/null > {d}/out2 2>&1 &
B=$!
{wait_for(f"{d}/out2", "waiting for a migration")}
timeout 60 {CORRAL} migrate --insecure --api {d}/a.sock 127.0.0.1:7010; echo MIGRATE_EXIT=$?
wait $A; echo SOURCE_EXIT=$?
{wait_counts(f"{d}/out2", 3)}; {stop} {d}/b.sock; wait $B
timeout 60 {CORRAL} restore {d}/snap </dev/null > {d}/out3 2>&1 &
C=$!
{wait_counts(f"{d}/out3", 3)}; kill $C; wait $C
"""
    status = lab.run(script, timeout=400).output
    files = lab.run(
        f"echo ---OUT1; cat {d}/out1; echo ---OUT2; cat {d}/out2; echo ---OUT3; cat {d}/out3", timeout=60
    ).output
    out = (status + files).replace("\r", "")
    assert "SNAPSHOT_EXIT=0" in out and "MIGRATE_EXIT=0" in out and "SOURCE_EXIT=0" in out, out
    out1 = out.split("---OUT1")[1].split("---OUT2")[0]
    out2 = out.split("---OUT2")[1].split("---OUT3")[0]
    out3 = out.split("---OUT3")[1]
    c1, c2, c3 = counts(out1), counts(out2), counts(out3)
    assert BANNER in out1 and c1 and c1 == list(range(1, len(c1) + 1)), out1
    # migrated: carried on from the source's last count, no reboot
    assert c2 and BANNER not in out2 and c2[0] in (c1[-1], c1[-1] + 1), out
    assert c2 == list(range(c2[0], c2[0] + len(c2))) and len(c2) >= 3, out2
    # restored from the snapshot taken at count >= 6: carries on from there
    assert c3 and BANNER not in out3 and 6 <= c3[0] <= c1[-1], out
    assert c3 == list(range(c3[0], c3[0] + len(c3))) and len(c3) >= 3, out3
