"""OVMF (UEFI) in the lab (real SVM KVM): Debian's OVMF from corral's CFI flash pair runs
through SEC, PEI and DXE to its boot manager, with its console on COM1 (found through the
PIIX3 ISA bridge) and its timer on the PIIX4 PM block."""

from __future__ import annotations

import pytest
from support.lab_debian import LAB_CPU
from support.labhost import CORRAL


# Not corral: the lab's QEMU aborts. Measured 2026-11-30: a few seconds into OVMF under corral,
# bookworm's QEMU 7.2 (TCG with emulated SVM) aborts with "tcg_handle_interrupt: assertion failed:
# (qemu_mutex_iothread_locked())", and bookworm-backports' QEMU 10.0.2 (tests/support/lab_qemu.py)
# the same way ("(bql_locked())"), ending the lab session for every later test. Under gdb (10.0.2)
# the aborting call came from a translated block that called helper_svm_check_intercept(env, 0x18:
# SVM_EXIT_WRITE_CR8) and then helper_write_crN(env, 8, RAX): OVMF, as KVM's nested guest, writes
# CR8 while KVM does not intercept that and has a virtual interrupt pending (V_IRQ). For CR8,
# helper_write_crN (target/i386/tcg/sysemu/misc_helper.c in 7.2, tcg/system/ later) calls
# cpu_interrupt(cs, CPU_INTERRUPT_VIRQ) when ctl_has_irq() without taking the BQL, and
# tcg_handle_interrupt asserts that it is held. The newest QEMU source we read (2025, after 10.0)
# still does: no QEMU release fixes it, so no lab QEMU can host this test yet. The Linux guests the
# lab runs do not write CR8, hence only OVMF trips it. (Before the map_flash fix the guest had
# reached OVMF's flash probe.)
@pytest.mark.skip(
    reason="the lab's QEMU (7.2 and 10.0) aborts under OVMF: helper_write_crN's CR8 path calls "
    "cpu_interrupt without the BQL (unfixed upstream)"
)
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
