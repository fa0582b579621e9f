"""Every VM a kvm test starts in this process runs under the seccomp filters, as the CLI's do
by default: its vCPU, device-loop and control-socket threads enter their allow-lists
(corral.seccomp), so a call missing from a list fails the run loudly (exit 148 naming it)."""

import subprocess
from pathlib import Path

import pytest

from corral import seccomp
from corral.images.probe import build_probe


@pytest.fixture(autouse=True)
def _seccomp_on():
    seccomp.enable()
    yield
    seccomp.enable(False)


@pytest.fixture(scope="module")
def probe64() -> Path:
    """The probe's ELF with its symbols (gdb and the dump tests read it)."""
    return build_probe().parent / "probe64.elf"


@pytest.fixture(scope="module")
def symbols(probe64) -> dict[str, int]:
    """The probe's symbols by name (nm)."""
    out = subprocess.run(["nm", str(probe64)], capture_output=True, text=True, check=True).stdout
    return {name: int(addr, 16) for addr, _kind, name in (line.split() for line in out.splitlines())}
