"""The legacy timer path in the lab: Debian with `nolapic_timer` ticks on corral's PIT.

With `nolapic_timer` Linux leaves the LAPIC timer alone and takes its clock events from the
i8254 on IRQ 0, which the MADT's interrupt source override puts on IOAPIC pin 2. KVM's default
GSI routing wires GSI 0 to pin 0 instead, so until corral wrote its own routes at VM creation
(not only when a PCI device asked for MSI-X) such a guest got no timer interrupt at all and
slept for ever in its first `sleep 1`.
"""

from __future__ import annotations

import re

import pytest
from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL

COMMAND = (
    "echo CLOCKEVENTS=`cat /sys/devices/system/clockevents/*/current_device`; "
    "echo BEFORE `cat /proc/uptime` `grep timer /proc/interrupts`; sleep 1; "
    "echo AFTER `cat /proc/uptime` `grep timer /proc/interrupts`"
)


def _sample(output: str, tag: str) -> tuple[float, int]:
    """(uptime s, IRQ 0 count summed over the CPUs) from a BEFORE/AFTER line."""
    m = re.search(rf"^{tag} ([\d.]+) [\d.]+ 0: ([\d ]+) IO-APIC", output, re.M)
    assert m, f"no {tag} line with IRQ 0 on the IOAPIC:\n{output}"
    return float(m.group(1)), sum(int(n) for n in m.group(2).split())


@pytest.mark.parametrize("cpus", [1, 2])
def test_nolapic_timer_guest_sleeps_on_pit_interrupts(lab, debian_build, cpus):
    images = need(debian_build)
    cmdline = f'{BASE_CMDLINE} nolapic_timer -- sh -c "{COMMAND}"'
    res = lab.run(
        f"{CORRAL} run --kernel {images['bzimage']} --initrd {images['initrd']} --cpus {cpus} "
        f"--memory 512M {LAB_CPU} --no-reboot --cmdline '{cmdline}' </dev/null",
        timeout=300,
    )
    assert BANNER in res.output, res.output
    events = re.search(r"CLOCKEVENTS=(.*)", res.output)
    assert events and "pit" in events.group(1).split(), res.output  # the PIT is the clock event device
    t0, irq0 = _sample(res.output, "BEFORE")
    t1, irq1 = _sample(res.output, "AFTER")
    # The sleep ended, not early. A hang is the 300 s timeout; the generous upper bound is the
    # lab's: a busy 2-core host once stretched 2 vCPUs' `sleep 1` to 12 s of guest uptime.
    assert 1.0 <= t1 - t0 < 60.0, res.output
    assert irq1 > irq0, res.output  # ... woken by the PIT on IOAPIC pin 2
    assert res.status == 0, res.output
