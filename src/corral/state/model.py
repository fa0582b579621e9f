"""The captured state of a whole machine, and the host CPU it was captured on."""

from __future__ import annotations

import struct

from corral.errors import CorralError
from corral.kvm.structs import KvmCpuidEntry2
from corral.lazymodel import BaseModel, ConfigDict, quick_init
from corral.vstate.kvm_state import VcpuState, VmKvmState


class SnapshotError(CorralError):
    """A snapshot, or a migrated state, that cannot be written or loaded."""


@quick_init  # made at every launch (compared at restore): no pydantic for that
class CpuModel(BaseModel):
    """Enough of the host CPU to refuse a restore that would show the guest another CPU."""

    model_config = ConfigDict(defer_build=True)  # validators built on first use, not at launch

    vendor: str
    signature: int  # CPUID.1:EAX: family, model, stepping

    @classmethod
    def from_cpuid(cls, entries: list[KvmCpuidEntry2]) -> CpuModel:
        leaf = {(e.function, e.index): e for e in entries}
        v = leaf.get((0, 0))
        vendor = struct.pack("<III", v.ebx, v.edx, v.ecx).decode(errors="replace") if v else "?"
        sig = leaf.get((1, 0))
        return cls(vendor=vendor, signature=sig.eax if sig else 0)

    def describe(self) -> str:
        s = self.signature
        family = ((s >> 8) & 0xF) + (((s >> 20) & 0xFF) if (s >> 8) & 0xF == 0xF else 0)
        model = ((s >> 4) & 0xF) | (((s >> 16) & 0xF) << 4 if (s >> 8) & 0xF in (6, 0xF) else 0)
        return f"{self.vendor} family {family:#x} model {model:#x} stepping {s & 0xF}"


class MachineState(BaseModel):
    """Everything but RAM: KVM's VM and vCPU state, then every device by name, in the order
    they are loaded back (the PCI bus before the virtio functions on it)."""

    model_config = ConfigDict(defer_build=True)

    vm: VmKvmState
    vcpus: list[VcpuState]
    devices: dict[str, dict[str, object]]
