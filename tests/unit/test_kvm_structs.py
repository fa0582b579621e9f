"""The ctypes structs and ioctl numbers must match the real <linux/kvm.h>."""

import ctypes as C
import shutil
import subprocess

import pytest

from corral.kvm import constants as K
from corral.kvm import structs as S

STRUCTS = {
    "kvm_regs": S.KvmRegs,
    "kvm_sregs": S.KvmSregs,
    "kvm_segment": S.KvmSegment,
    "kvm_dtable": S.KvmDtable,
    "kvm_fpu": S.KvmFpu,
    "kvm_lapic_state": S.KvmLapicState,
    "kvm_cpuid_entry2": S.KvmCpuidEntry2,
    "kvm_msr_entry": S.KvmMsrEntry,
    "kvm_pit_config": S.KvmPitConfig,
    "kvm_userspace_memory_region": S.KvmUserspaceMemoryRegion,
    "kvm_irq_level": S.KvmIrqLevel,
    "kvm_mp_state": S.KvmMpState,
    "kvm_vcpu_events": S.KvmVcpuEvents,
    "kvm_debugregs": S.KvmDebugregs,
    "kvm_xsave": S.KvmXsave,
    "kvm_xcrs": S.KvmXcrs,
    "kvm_irqchip": S.KvmIrqchip,
    "kvm_pit_state2": S.KvmPitState2,
    "kvm_clock_data": S.KvmClockData,
    "kvm_enable_cap": S.KvmEnableCap,
    "kvm_guest_debug": S.KvmGuestDebug,
    "kvm_coalesced_mmio_zone": S.KvmCoalescedMmioZone,
    "kvm_irqfd": S.KvmIrqfd,
    "kvm_ioeventfd": S.KvmIoeventfd,
    "kvm_irq_routing_entry": S.KvmIrqRoutingEntry,
    "kvm_irq_routing_irqchip": S.KvmIrqRoutingIrqchip,
    "kvm_irq_routing_msi": S.KvmIrqRoutingMsi,
    "kvm_dirty_log": S.KvmDirtyLog,
    "kvm_translation": S.KvmTranslation,
}
IOCTLS = [n for n in vars(K) if n.startswith("KVM_") and n not in ("KVM_API_VERSION", "KVMIO")]
RUN_OFFSETS = {
    "RUN_EXIT_REASON": "exit_reason",
    "RUN_IMMEDIATE_EXIT": "immediate_exit",
    "RUN_IO_DIRECTION": "io.direction",
    "RUN_IO_SIZE": "io.size",
    "RUN_IO_PORT": "io.port",
    "RUN_IO_COUNT": "io.count",
    "RUN_IO_DATA_OFFSET": "io.data_offset",
    "RUN_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "RUN_MMIO_DATA": "mmio.data",
    "RUN_MMIO_LEN": "mmio.len",
    "RUN_MMIO_IS_WRITE": "mmio.is_write",
    "RUN_INTERNAL_SUBERROR": "internal.suberror",
    "RUN_INTERNAL_NDATA": "internal.ndata",
    "RUN_INTERNAL_DATA": "internal.data",
    "RUN_SYSTEM_EVENT_TYPE": "system_event.type",
    "RUN_SYSTEM_EVENT_DATA": "system_event.data",
    "RUN_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
    "RUN_DEBUG_EXCEPTION": "debug.arch.exception",
    "RUN_DEBUG_PC": "debug.arch.pc",
    "RUN_DEBUG_DR6": "debug.arch.dr6",
    "RUN_DEBUG_DR7": "debug.arch.dr7",
}


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory):
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("kvmh")
    lines = ["#include <linux/kvm.h>", "#include <stdio.h>", "#include <stddef.h>", "int main(void){"]
    for name in STRUCTS:
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    for const, field in RUN_OFFSETS.items():
        lines.append(f'printf("run {const} %zu\\n", offsetof(struct kvm_run, {field}));')
    lines.append('printf("run RUN_SIZE %zu\\n", sizeof(struct kvm_run));')
    lines.append("return 0;}")
    src = d / "facts.c"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(d / "facts"), str(src)], check=True)
    out = subprocess.run([str(d / "facts")], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        facts[(kind, name)] = int(value)
    return facts


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_sizes_match_header(header_facts, name):
    assert C.sizeof(STRUCTS[name]) == header_facts[("size", name)]


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_numbers_match_header(header_facts, name):
    assert getattr(K, name) == header_facts[("ioctl", name)], name


@pytest.mark.parametrize("const", sorted(RUN_OFFSETS) + ["RUN_SIZE"])
def test_kvm_run_offsets_match_header(header_facts, const):
    assert getattr(S, const) == header_facts[("run", const)]
