"""The KVM layer: the only part of corral that talks to /dev/kvm."""

from corral.kvm.fds import Kvm, KvmError, VcpuFd, VmFd

__all__ = ["Kvm", "KvmError", "VcpuFd", "VmFd"]
