"""Doorbells: guest MMIO writes turned into eventfd wake-ups of the VM's event loop.

KVM matches the write against an ioeventfd and signals the eventfd in the kernel, so the vCPU
goes straight back into the guest; the event loop thread wakes on the eventfd and runs the
device. This is the data path of every virtio queue kick.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from corral.eventloop import EventLoop
from corral.kvm import VmFd

IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class _Doorbell:
    __slots__ = ("addr", "fd", "length")

    def __init__(self, fd: int, addr: int, length: int) -> None:
        self.fd, self.addr, self.length = fd, addr, length


class KvmDoorbells:
    def __init__(self, vm: VmFd, loop: EventLoop) -> None:
        self.vm = vm
        self.loop = loop
        self._live: set[_Doorbell] = set()

    def attach(self, addr: int, length: int, callback: Callable[[], None]) -> _Doorbell:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.vm.ioeventfd(fd, addr, length)
        except BaseException:
            os.close(fd)
            raise
        bell = _Doorbell(fd, addr, length)

        def ring() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            callback()

        self.loop.add_reader(fd, ring)
        self._live.add(bell)
        return bell

    def detach(self, bell: object) -> None:
        assert isinstance(bell, _Doorbell)
        if bell not in self._live:
            return
        self._live.discard(bell)
        self.loop.remove_reader(bell.fd)
        if self.vm.fd >= 0:
            self.vm.ioeventfd(bell.fd, bell.addr, bell.length, IOEVENTFD_FLAG_DEASSIGN)
        os.close(bell.fd)

    def close(self) -> None:
        for bell in list(self._live):
            self.detach(bell)
