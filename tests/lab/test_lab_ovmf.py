"""OVMF (UEFI) in the lab (real SVM KVM): Debian's OVMF from corral's CFI flash pair runs
through SEC, PEI and DXE to its boot manager, with its console on COM1 (found through the
PIIX3 ISA bridge) and its timer on the PIIX4 PM block."""

from __future__ import annotations

import pytest
from support.lab_debian import LAB_CPU
from support.labhost import CORRAL


# Measured 2026-11-30 (twice): a few seconds into OVMF under corral, the lab's own QEMU (7.2, TCG
# with emulated SVM) aborts with "tcg_handle_interrupt: assertion failed:
# (qemu_mutex_iothread_locked())", which ends the lab session for every later test. Before the
# map_flash fix the guest had reached OVMF's flash probe (its first vars-bank command) in the lab.
@pytest.mark.skip(reason="the lab's QEMU 7.2 TCG aborts (BQL assertion in tcg_handle_interrupt) under OVMF")
def test_ovmf_reaches_its_boot_manager(lab):
    d = "/tmp/labovmf"  # the lab's tmpfs: the host's files are read-only there
    vars_path = f"{d}/vars.fd"
    script = f"""
rm -rf {d}; mkdir -p {d}
timeout 300 {CORRAL} -v run --firmware ovmf,vars={vars_path} --memory 512M {LAB_CPU} \
  </dev/null > {d}/out 2>&1 &
VM=$!
for i in $(seq 240); do grep -q 'Shell>\\|startup.nsh\\|Boot0' {d}/out 2>/dev/null && break; kill -0 $VM || break; sleep 0.5; done
sleep 3; kill $VM; wait $VM
echo ---GUEST; cat {d}/out
"""
    out = lab.run(script, timeout=420).output.replace("\r", "")
    print(out)
    guest = out.split("---GUEST", 1)[-1]
    assert "Shell" in guest or "Boot" in guest, out
