"""What the lab tests that boot the Debian guest under corral share: its kernel command line,
the lab's CPU options, the banner its /init prints, and the skip for an image this host cannot
provide."""

from __future__ import annotations

import pytest

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
