"""Fidelity in the lab: Debian's unmodified cloud kernel under corral on a real SVM /dev/kvm.

Each test boots the guest with a command after `--` on the kernel command line (the image's
/init runs it instead of the shell, then powers off), so one boot answers one question.
"""

from __future__ import annotations

import re

import pytest
from support.lab_debian import BANNER, BASE_CMDLINE, LAB_CPU, need
from support.labhost import CORRAL

from corral.arch.x86 import layout

# dmesg lines at warning level or worse that do not come from our machine model: listed with
# the reason, so that anything new fails the test.
BENIGN = [
    (r"Unknown kernel command line parameters", "our batch command after -- is not a kernel option"),
    (r"raid6: ", "module-less RAID self test noise"),
    (r"x86/cpu: SGX disabled by BIOS", "host CPU feature, not ours"),
    (
        r"RETBleed|Spectre|MDS CPU bug|MMIO Stale Data|SRSO|GDS",
        "CPU vulnerability notices from the host CPU model",
    ),
    (r"TSC.*unstable|tsc: Marking TSC unstable", "nested TCG lab: the TSC of an emulated CPU is not stable"),
    (r"clocksource: .*wd_nsec|timekeeping watchdog", "nested TCG lab timing jitter"),
    (r"kvm-guest: .*steal", "informational"),
    # a few percent off only: a busy TCG lab shifts the 100 ms calibration window. A wrong PM
    # timer or APIC timer frequency in our model would be off by far more, and still fails.
    (
        r"APIC calibration not consistent with PM-Timer: (9[0-9]|10[0-9]|110)ms instead of 100ms",
        "nested TCG lab timing jitter",
    ),
]


def boot(
    lab,
    images,
    command: str,
    *,
    kernel: str = "bzimage",
    cpus: int = 1,
    memory: str = "512M",
    extra: str = "--no-reboot",
    timeout: float = 240.0,
):
    cmdline = f'{BASE_CMDLINE} -- sh -c "{command}"'
    run = (
        f"{CORRAL} run --kernel {images[kernel]} --initrd {images['initrd']} --cpus {cpus} "
        f"--memory {memory} {LAB_CPU} {extra} --cmdline '{cmdline}' </dev/null"
    )
    return lab.run(run, timeout=timeout)


@pytest.mark.parametrize("kernel", ["bzimage", "vmlinux"])
@pytest.mark.parametrize("cpus", [1, 2])
def test_boots_to_userspace_sees_every_cpu_and_powers_off(lab, debian_build, kernel, cpus):
    images = need(debian_build)
    res = boot(lab, images, "echo NPROC=`nproc`", kernel=kernel, cpus=cpus)
    assert BANNER in res.output, res.output
    assert f"NPROC={cpus}" in res.output, res.output
    assert res.status == 0, res.output  # ACPI S5 poweroff -> corral exits 0


def test_no_machine_model_warnings_in_dmesg(lab, debian_build):
    images = need(debian_build)
    res = boot(lab, images, "dmesg -r", cpus=2)  # SMP bring-up warnings count too
    assert res.status == 0, res.output
    bad = []
    for line in res.output.splitlines():
        m = re.match(r"<(\d+)>", line.strip())
        if not m or int(m.group(1)) & 7 > 4:  # keep emerg..warning
            continue
        if not any(re.search(p, line) for p, _ in BENIGN):
            bad.append(line)
    assert not bad, "warnings caused by corral's machine model:\n" + "\n".join(bad)


def test_memory_and_e820_are_what_we_gave(lab, debian_build):
    images = need(debian_build)
    res = boot(lab, images, "grep MemTotal /proc/meminfo; dmesg | grep BIOS-e820", memory="768M")
    assert res.status == 0, res.output
    seen = [
        (int(a, 16), int(b, 16), kind)
        for a, b, kind in re.findall(r"BIOS-e820: \[mem (0x[0-9a-f]+)-(0x[0-9a-f]+)\] (\w+)", res.output)
    ]
    want = [(a, a + s - 1, "usable" if t == 1 else "reserved") for a, s, t in layout.e820_map(768 << 20)]
    assert seen == want, res.output
    total_kb = int(re.search(r"MemTotal:\s+(\d+) kB", res.output).group(1))
    assert 600 * 1024 < total_kb <= 768 * 1024, total_kb


def test_guest_time_comes_from_our_rtc(lab, debian_build):
    images = need(debian_build)
    before = int(lab.check("date +%s", timeout=30).strip())
    res = boot(lab, images, "echo GUEST_EPOCH=`date +%s`")
    after = int(lab.check("date +%s", timeout=30).strip())
    assert res.status == 0, res.output
    guest = int(re.search(r"GUEST_EPOCH=(\d+)", res.output).group(1))
    assert before - 2 <= guest <= after + 2, (before, guest, after)


def test_reboot_restarts_the_guest(lab, debian_build):
    images = need(debian_build)
    # corral keeps rebooting the guest; `timeout` interrupts it after a few boots
    res = lab.run(
        f"timeout -s INT 90 {CORRAL} run {LAB_CPU} --kernel {images['bzimage']} --initrd {images['initrd']} "
        f"--cmdline '{BASE_CMDLINE} -- reboot -f' </dev/null",
        timeout=200,
    )
    assert res.output.count(BANNER) >= 2, res.output


def test_no_reboot_stops_instead(lab, debian_build):
    images = need(debian_build)
    res = boot(lab, images, "reboot -f")
    assert res.output.count(BANNER) == 1, res.output
    assert res.status == 0, res.output
