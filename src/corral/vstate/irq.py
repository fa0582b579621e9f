"""Interrupts for devices: lines of the in-kernel irqchip, and MSI vectors on irqfds.

A `KvmIrqLine` drives one GSI through KVM_IRQ_LINE (legacy devices, PCI INTx).

KVM_SET_GSI_ROUTING replaces KVM's whole table, so the router always writes the PC routes too:
GSIs 0-15 on the 8259 pair (master pins 0-7 without the cascade pin 2, slave pins 8-15) and
GSIs 0-23 on the IOAPIC, where GSI 0 (the PIT) lands on pin 2 as the MADT's override promises.
Each MSI vector gets a GSI of its own (from 24 up) with an MSI route and an irqfd: raising it is
one eventfd write, from any thread, with no ioctl on the data path.
"""

from __future__ import annotations

import os
import threading

from corral.kvm import VmFd
from corral.kvm import structs as S

IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2
ROUTE_IRQCHIP, ROUTE_MSI = 1, 2
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS


class KvmIrqLine:
    """An interrupt input of the in-kernel PIC+IOAPIC, driven through KVM_IRQ_LINE."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self._level = 0
        self._lock = threading.Lock()

    def set_level(self, high: bool) -> None:
        level = 1 if high else 0
        with self._lock:
            if level != self._level:
                self._level = level
                self._vm.irq_line(self.gsi, level)

    def pulse(self) -> None:
        with self._lock:
            self._vm.irq_line(self.gsi, 1)
            self._vm.irq_line(self.gsi, 0)
            self._level = 0


def _irqchip_route(gsi: int, chip: int, pin: int) -> S.KvmIrqRoutingEntry:
    e = S.KvmIrqRoutingEntry(gsi=gsi, type=ROUTE_IRQCHIP)
    e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
    return e


def pc_routes() -> list[S.KvmIrqRoutingEntry]:
    routes = []
    for gsi in range(16):
        if gsi != 2:
            chip = IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE
            routes.append(_irqchip_route(gsi, chip, gsi % 8))
    for gsi in range(IOAPIC_PINS):
        if gsi != 2:
            routes.append(_irqchip_route(gsi, IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    return routes


class MsiVector:
    """One MSI(-X) vector: its message, its mask, and the irqfd that delivers it."""

    def __init__(self, router: IrqRouter, gsi: int) -> None:
        self.router = router
        self.gsi = gsi
        self.address = 0
        self.data = 0
        self.masked = True
        self.pending = False
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def update(self, address: int, data: int, masked: bool) -> None:
        """The guest rewrote the vector: reroute it, and deliver what waited while masked."""
        changed = (address, data) != (self.address, self.data)
        self.address, self.data, self.masked = address, data, masked
        if changed:
            self.router.commit()
        if not masked and self.pending:
            self.pending = False
            os.eventfd_write(self.fd, 1)

    def trigger(self) -> bool:
        """Raise the interrupt; a masked vector only records it as pending (the PBA bit)."""
        if self.masked or not self.address:
            self.pending = True
            return False
        os.eventfd_write(self.fd, 1)
        return True


class IrqRouter:
    def __init__(self, vm: VmFd) -> None:
        self.vm = vm
        self.vectors: list[MsiVector] = []
        self._lock = threading.Lock()

    def msi_vector(self) -> MsiVector:
        with self._lock:
            v = MsiVector(self, FIRST_MSI_GSI + len(self.vectors))
            self.vectors.append(v)
        self.commit()
        self.vm.irqfd(v.fd, v.gsi)
        return v

    def commit(self) -> None:
        """Write the whole routing table: the PC routes and one MSI route per vector."""
        with self._lock:
            routes = pc_routes()
            for v in self.vectors:
                e = S.KvmIrqRoutingEntry(gsi=v.gsi, type=ROUTE_MSI)
                e.u.msi.address_lo = v.address & 0xFFFF_FFFF
                e.u.msi.address_hi = v.address >> 32
                e.u.msi.data = v.data
                routes.append(e)
            self.vm.set_gsi_routing(routes)

    def close(self) -> None:
        for v in self.vectors:
            os.close(v.fd)
        self.vectors = []
