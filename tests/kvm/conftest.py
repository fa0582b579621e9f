"""Every VM a kvm test starts in this process runs under the seccomp filters, as the CLI's do
by default: its vCPU, device-loop and control-socket threads enter their allow-lists
(corral.seccomp), so a call missing from a list fails the run loudly (exit 148 naming it)."""

import pytest

from corral import seccomp


@pytest.fixture(autouse=True)
def _seccomp_on():
    seccomp.enable()
    yield
    seccomp.enable(False)
