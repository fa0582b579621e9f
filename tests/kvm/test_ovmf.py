"""OVMF (UEFI) on real /dev/kvm: Debian's OVMF starts from corral's flash pair.

On a PVM host (ring 0 emulated) OVMF gets as far as its SEC phase: the reset vector runs from
the read-only code bank, enters protected mode and SEC fills its temporary RAM (0x810000, 64 KiB
in OVMF's memory layout) with the 0x5AA55AA5 pattern it checks stack use with; then KVM's
instruction emulator meets SEC's x87 set-up (`fninit`), which it does not emulate, and the
vCPU stops with an emulation failure. Real hardware virtualization (the lab) runs on from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.boot import firmware
from corral.config import MachineConfig
from corral.machine import Machine

pytestmark = pytest.mark.skipif(
    not all(os.path.exists(p) for p in firmware.OVMF_FILES[0]),
    reason="Debian's ovmf package is not installed",
)
TEMP_RAM, TEMP_RAM_SIZE = 0x810000, 0x10000
STACK_PATTERN = bytes.fromhex("a55aa55a")  # 0x5AA55AA5, little-endian


def test_ovmf_runs_sec_from_the_flash_pair(tmp_path: Path):
    vars_path = tmp_path / "vars.fd"
    cfg = MachineConfig.build(firmware=f"ovmf,vars={vars_path}", memory="256M", no_reboot=True)
    ovmf = firmware.read_ovmf(cfg.firmware or "")
    out = bytearray()
    m = Machine(cfg, console=out.extend)
    try:
        m.start()
        assert vars_path.read_bytes() == ovmf.vars_template  # created from the template
        deadline = time.monotonic() + 60
        seen = False
        while time.monotonic() < deadline and not seen:
            assert m.memory is not None
            seen = m.memory.read(TEMP_RAM, TEMP_RAM_SIZE).count(STACK_PATTERN) > 1000
            if m.wait(0.2) is not None:
                seen = m.memory.read(TEMP_RAM, TEMP_RAM_SIZE).count(STACK_PATTERN) > 1000
                break
        result = m.wait(0)
    finally:
        m.close()
    assert seen, (result, bytes(out))
    if result is not None:  # a PVM host: KVM's emulator stopped in SEC, inside the code bank
        assert result.kind == "crash" and "emulation failed" in result.message, result
        rip = int(result.message.split("RIP=")[1].split()[0], 16)
        assert ovmf.code_base <= rip < 1 << 32, result.message
    # the guest wrote no variable yet: the file is still the template, and a second boot reuses it
    assert vars_path.read_bytes() == ovmf.vars_template


FLASH_UNDER_VCPU_FILTER = """
import mmap, threading
from corral import seccomp
from corral.vstate.vm import Vm
seccomp.enable()
seccomp.prepare()
vm = Vm.create("/dev/kvm", 1)
bank = mmap.mmap(-1, 0x10000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
vm.map_flash(0xFF000000, bank, True)  # at build time, unfiltered
def vcpu():
    seccomp.enter("vcpu")
    for mapped in (False, True, False):  # a flash command, read array, another command
        vm.map_flash(0xFF000000, bank, mapped)
    print("switched", flush=True)
t = threading.Thread(target=vcpu)
t.start(); t.join()
"""


def test_the_flash_bank_switches_modes_under_the_vcpu_filter(tmp_path: Path):
    """A flash command arrives on a vCPU thread: mapping the bank in and out must be a call its
    seccomp filter allows (a KVM-fd ioctl there stopped the VM in the lab)."""
    r = subprocess.run(
        [sys.executable, "-c", FLASH_UNDER_VCPU_FILTER], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "switched" in r.stdout, (r.stdout, r.stderr)
