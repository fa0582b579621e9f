"""What the host offers: KVM API, hardware virtualization or PVM, and which of the capabilities
corral uses (the one list, corral.vstate.vm.CAPABILITIES) it has."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import HostError
from corral.kvm import Kvm
from corral.kvm import constants as K
from corral.vstate.vm import CAPABILITIES, missing_capabilities


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass
class HostReport:
    kvm_path: str
    api_version: int | None = None
    error: str | None = None
    virtualization: str = "unknown"  # "vmx", "svm", "pvm" or "unknown"
    capabilities: dict[str, int] = field(default_factory=dict)
    max_vcpus: int = 0
    recommended_vcpus: int = 0
    missing_required: list[str] = field(default_factory=list)
    vhost: dict[str, bool] = field(default_factory=dict)  # "vhost-net", "vhost-vsock": present

    @property
    def is_pvm(self) -> bool:
        return self.virtualization == "pvm"

    @property
    def usable(self) -> bool:
        return self.error is None and not self.missing_required


VHOST = ("vhost-net", "vhost-vsock")


def vhost_present(name: str) -> bool:
    """Whether the kernel offers `name` (vhost-net, vhost-vsock): its device node, or its module
    loaded. corral serves virtio-net and virtio-vsock itself either way (issue 16: the kernel's
    data path would be the faster one where it is there)."""
    return os.path.exists(f"/dev/{name}") or os.path.isdir(f"/sys/module/{name.replace('-', '_')}")


def probe_host(kvm_path: str = "/dev/kvm") -> HostReport:
    rep = HostReport(kvm_path=kvm_path, vhost={name: vhost_present(name) for name in VHOST})
    flags = _cpu_flags()
    if os.path.isdir("/sys/module/kvm_pvm"):
        rep.virtualization = "pvm"
    elif "vmx" in flags:
        rep.virtualization = "vmx"
    elif "svm" in flags:
        rep.virtualization = "svm"
    try:
        kvm = Kvm(kvm_path)
    except HostError as exc:  # with its own message
        rep.error = str(exc)
        return rep
    try:
        rep.api_version = K.KVM_API_VERSION
        rep.capabilities = {c.name: kvm.check_extension(c.cap) for c in CAPABILITIES}
        rep.missing_required = missing_capabilities(kvm)
        rep.max_vcpus = kvm.check_extension(K.CAP_MAX_VCPUS)
        rep.recommended_vcpus = kvm.check_extension(K.CAP_NR_VCPUS)
    finally:
        kvm.close()
    return rep


PVM_EXPLANATION = (
    "this host's /dev/kvm is PVM (no hardware virtualization): guest ring-0 code is emulated at "
    "about a million instructions per second, so a stock Linux kernel cannot boot here; run the "
    "probe guest (corral run --image probe), a PVM-enlightened kernel, or use a host with VT-x/AMD-V"
)
