"""virtio over PCI, modern transport only (virtio 1.2 section 4.1).

One 32-bit memory BAR holds the four register blocks the vendor capabilities point at:
common configuration, ISR status, device configuration and the notification area (one 4-byte
doorbell per queue). Doorbells become ioeventfds through `Doorbells`, so a kick wakes the VM's
event loop without a vCPU exit into Python; a kick that does reach Python (before the ioeventfd
exists) takes the same path. Interrupts: MSI-X when the driver enables it (one vector per
queue plus one for configuration changes, each an irqfd the VMM provides), INTx with the ISR
register otherwise.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from corral.devices.base import U8, U16, U32, U64, DeviceState, IrqLine, StateBytes, StateError
from corral.devices.pci.config import CAP_ID_MSIX, CAP_ID_VENDOR, Bar, PciConfig
from corral.devices.virtio.base import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VirtioDevice,
)
from corral.devices.virtio.queue import QueueSize, Virtqueue, VirtqueueError, VirtqueueState
from corral.lazymodel import Field

if TYPE_CHECKING:
    from corral.eventloop import EventLoop
    from corral.memory import GuestMemory

log = logging.getLogger(__name__)

VENDOR_VIRTIO = 0x1AF4
PCI_DEVICE_BASE = 0x1040
# BAR 0 layout
BAR_SIZE = 0x8000
COMMON_OFF, COMMON_LEN = 0x0000, 0x38
ISR_OFF, ISR_LEN = 0x1000, 4
DEVICE_OFF, DEVICE_LEN = 0x2000, 0x1000
NOTIFY_OFF, NOTIFY_MULTIPLIER = 0x3000, 4
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE = 1, 2, 3, 4
MSIX_TABLE_OFF, MSIX_PBA_OFF = 0x4000, 0x5000
MSIX_ENABLE, MSIX_FUNCTION_MASK = 1 << 15, 1 << 14
NO_VECTOR = 0xFFFF
ISR_QUEUE, ISR_CONFIG = 1, 2
# PCI class per device type (net: ethernet, blk: SCSI storage, others: "other")
_CLASS = {1: 0x020000, 2: 0x018000, 3: 0x078000}


class MsiVector(Protocol):
    """One MSI-X vector as the VMM delivers it (corral.vstate.irq.MsiVector: an irqfd)."""

    pending: bool

    def update(self, address: int, data: int, masked: bool) -> None: ...

    def trigger(self) -> bool: ...


class Doorbells(Protocol):
    """Turns a guest MMIO write to `addr` (`length` bytes) into `callback` on the event loop."""

    def attach(self, addr: int, length: int, callback: Callable[[], None]) -> object: ...

    def detach(self, handle: object) -> None: ...


class QueueState(DeviceState):
    """One queue's registers in the common configuration block, as the driver set them."""

    size: QueueSize = Field(description="queue_size: entries (the driver may shrink it)")
    enable: int = Field(ge=0, le=1, description="queue_enable")
    desc: U64 = Field(description="queue_desc: guest address of the descriptor table")
    avail: U64 = Field(description="queue_driver: guest address of the available ring")
    used: U64 = Field(description="queue_device: guest address of the used ring")
    vector: U16 = Field(description="queue_msix_vector (0xFFFF: none)")


class VirtioPciState(DeviceState):
    status: U8 = Field(description="device_status: the driver's progress bits")
    device_feature_select: U32 = Field(description="which 32 bits device_feature shows")
    driver_feature_select: U32 = Field(description="which 32 bits driver_feature writes")
    driver_features: U64 = Field(description="the features the driver accepted")
    queue_select: U16 = Field(description="the queue the queue_* registers address")
    config_generation: U8 = Field(description="bumped on each device configuration change")
    isr: U8 = Field(description="ISR status (bit 0 queue, bit 1 configuration), INTx only")
    config_vector: U16 = Field(description="config_msix_vector (0xFFFF: none)")
    broken: bool = Field(description="the device failed and shows NEEDS_RESET")
    queues: list[QueueState] = Field(description="each queue's registers, by queue index")
    msix_table: StateBytes = Field(description="the MSI-X table: 16 bytes per vector")
    active: list[VirtqueueState] = Field(description="live queue positions; empty unless DRIVER_OK")
    device: dict[str, Any] = Field(
        description="the device's own state, as its state_model "
        "dumps it (validated through that model on load)"
    )


class _QueueConfig:
    __slots__ = ("avail", "desc", "enable", "size", "used", "vector")

    def __init__(self, size: int) -> None:
        self.size, self.enable, self.desc, self.avail, self.used = size, 0, 0, 0, 0
        self.vector = NO_VECTOR


class VirtioPciDevice:
    """A PCI function carrying one virtio device."""

    state_model: ClassVar[type[VirtioPciState]] = VirtioPciState

    def __init__(
        self,
        device: VirtioDevice[Any],
        memory: GuestMemory,
        irq: IrqLine,
        loop: EventLoop,
        doorbells: Doorbells,
        msi_vectors: Sequence[MsiVector] | None = None,
    ) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.loop = loop
        self.doorbells = doorbells
        self.offered = device.device_features() | F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
        self.config = PciConfig(
            vendor=VENDOR_VIRTIO,
            device=PCI_DEVICE_BASE + device.device_id,
            class_code=_CLASS.get(device.device_id, 0xFF0000),
            revision=1,
            subsys_vendor=VENDOR_VIRTIO,
            subsys_id=PCI_DEVICE_BASE + device.device_id,
            interrupt_pin=1,
        )
        self.config.add_bar(Bar(0, BAR_SIZE))
        nq = len(device.queue_sizes)
        for cfg_type, off, length, extra in (
            (CFG_COMMON, COMMON_OFF, COMMON_LEN, b""),
            (CFG_NOTIFY, NOTIFY_OFF, NOTIFY_MULTIPLIER * max(nq, 1), struct.pack("<I", NOTIFY_MULTIPLIER)),
            (CFG_ISR, ISR_OFF, ISR_LEN, b""),
            (CFG_DEVICE, DEVICE_OFF, DEVICE_LEN, b""),
        ):
            # cap_len, cfg_type, bar, id, padding, offset, length (+ notify multiplier)
            body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, 0, 0, off, length) + extra
            self.config.add_capability(CAP_ID_VENDOR, body)
        # MSI-X: table and PBA in BAR 0; message control's enable and function-mask bits writable
        self.msi = list(msi_vectors or [])
        self.msix_table = bytearray(16 * len(self.msi))
        for i in range(len(self.msi)):
            self.msix_table[16 * i + 12] = 1  # vectors start masked
        self._msix_cap = None
        if self.msi:
            body = struct.pack("<HII", len(self.msi) - 1, MSIX_TABLE_OFF, MSIX_PBA_OFF)
            self._msix_cap = self.config.add_capability(CAP_ID_MSIX, body, wmask=b"\x00\xc0")
        self._lock = threading.Lock()
        self._doorbell_handles: list[object] = []
        self._bar_addr: int | None = None
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        self.queues = [_QueueConfig(n) for n in self.device.queue_sizes]
        self.active: list[Virtqueue] = []
        self.config_vector = NO_VECTOR

    # -- PCI function --------------------------------------------------------------------------
    def bars_moved(self, addresses: list[int | None]) -> None:
        with self._lock:
            for h in self._doorbell_handles:
                self.doorbells.detach(h)
            self._doorbell_handles = []
            self._bar_addr = addresses[0]
            if self._bar_addr is None:
                return
            for i in range(len(self.queues)):
                addr = self._bar_addr + NOTIFY_OFF + NOTIFY_MULTIPLIER * i
                self._doorbell_handles.append(
                    self.doorbells.attach(addr, 2, (lambda q: lambda: self._notify(q))(i))
                )

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if COMMON_OFF <= offset < COMMON_OFF + COMMON_LEN:
            return self._common_read(offset - COMMON_OFF, size)
        if ISR_OFF <= offset < ISR_OFF + ISR_LEN:
            with self._lock:  # reading the ISR acknowledges and lowers INTx
                value, self.isr = self.isr, 0
                self.irq.set_level(False)
            return value if offset == ISR_OFF else 0
        if DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            return self.device.read_config(offset - DEVICE_OFF, size)
        if MSIX_TABLE_OFF <= offset and offset + size <= MSIX_TABLE_OFF + len(self.msix_table):
            o = offset - MSIX_TABLE_OFF
            return int.from_bytes(self.msix_table[o : o + size], "little")
        if MSIX_PBA_OFF <= offset < MSIX_PBA_OFF + 8 and self.msi:
            bits = sum(1 << i for i, v in enumerate(self.msi) if v.pending)
            return (bits >> (8 * (offset - MSIX_PBA_OFF))) & ((1 << (8 * size)) - 1)
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if COMMON_OFF <= offset < COMMON_OFF + COMMON_LEN:
            self._common_write(offset - COMMON_OFF, size, value)
        elif DEVICE_OFF <= offset < DEVICE_OFF + DEVICE_LEN:
            self.device.write_config(offset - DEVICE_OFF, size, value)
        elif MSIX_TABLE_OFF <= offset and offset + size <= MSIX_TABLE_OFF + len(self.msix_table):
            o = offset - MSIX_TABLE_OFF
            self.msix_table[o : o + size] = value.to_bytes(size, "little")
            self._msix_update(o // 16)
        elif NOTIFY_OFF <= offset < NOTIFY_OFF + NOTIFY_MULTIPLIER * len(self.queues):
            # a kick that reached Python: hand it to the loop like an ioeventfd would
            q = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
            self.loop.call_soon(lambda: self._notify(q))

    # -- MSI-X ---------------------------------------------------------------------------------------
    def _msix_control(self) -> int:
        return self.config.read(self._msix_cap + 2, 2) if self._msix_cap is not None else 0

    def _msix_update(self, index: int) -> None:
        if not 0 <= index < len(self.msi):
            return
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self.msix_table, 16 * index)
        control = self._msix_control()
        masked = bool(ctrl & 1 or control & MSIX_FUNCTION_MASK or not control & MSIX_ENABLE)
        self.msi[index].update(lo | hi << 32, data, masked)

    def config_written(self, offset: int, size: int) -> None:
        """PCI config space changed: MSI-X enable / function mask apply to every vector."""
        cap = self._msix_cap
        if cap is not None and offset < cap + 4 and offset + size > cap + 2:
            for i in range(len(self.msi)):
                self._msix_update(i)

    def _raise(self, vector: int, isr_bit: int) -> None:
        if self._msix_control() & MSIX_ENABLE:
            if vector < len(self.msi):
                self.msi[vector].trigger()
            return  # no vector assigned: no interrupt
        with self._lock:
            self.isr |= isr_bit
            self.irq.set_level(True)

    def _vector(self, value: int) -> int:
        return value if value < len(self.msi) else NO_VECTOR

    # -- common configuration ------------------------------------------------------------------
    def _selected(self) -> _QueueConfig | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_read(self, off: int, size: int) -> int:
        with self._lock:
            q = self._selected()
            regs = {
                0x00: self.device_feature_select,
                0x04: (self.offered >> (32 * self.device_feature_select)) & 0xFFFF_FFFF
                if self.device_feature_select < 2
                else 0,
                0x08: self.driver_feature_select,
                0x0C: (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF
                if self.driver_feature_select < 2
                else 0,
                0x10: self.config_vector,
                0x12: len(self.queues),
                0x14: self.status | (STATUS_NEEDS_RESET if self.device.broken else 0),
                0x15: self.config_generation,
                0x16: self.queue_select,
                0x18: q.size if q else 0,
                0x1A: q.vector if q else NO_VECTOR,
                0x1C: q.enable if q else 0,
                0x1E: self.queue_select if q else 0,  # notify offset: queue index
                0x20: q.desc if q else 0,
                0x28: q.avail if q else 0,
                0x30: q.used if q else 0,
            }
        # registers are read whole or in parts (64-bit addresses as two 32-bit halves)
        for base, value in regs.items():
            width = 8 if base >= 0x20 else 1 if base in (0x14, 0x15) else 2 if 0x10 <= base < 0x20 else 4
            if base <= off and off + size <= base + width:
                return (value >> (8 * (off - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, off: int, size: int, value: int) -> None:
        activate = reset = False
        with self._lock:
            q = self._selected()
            live = bool(self.status & STATUS_DRIVER_OK)
            if off == 0x00 and size == 4:
                self.device_feature_select = value
            elif off == 0x08 and size == 4:
                self.driver_feature_select = value
            elif off == 0x0C and size == 4 and self.driver_feature_select < 2 and not live:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
            elif off == 0x14 and size == 1:
                if value == 0:
                    # the registers reset now: a driver that reads status 0 back goes on to
                    # configure the queues, and a reset arriving later would wipe that
                    self._reset_registers()
                    reset = True
                else:
                    activate = self._set_status(value)
            elif off == 0x16 and size == 2:
                self.queue_select = value
            elif off == 0x10 and size == 2:
                self.config_vector = self._vector(value)  # reads back NO_VECTOR if refused
            elif off == 0x1A and size == 2 and q is not None:
                q.vector = self._vector(value)
            elif q is not None and not live:
                if off == 0x18 and size == 2:
                    # the driver may shrink a queue, to any power of two
                    if 0 < value <= self.device.queue_sizes[self.queue_select] and not value & (value - 1):
                        q.size = value
                elif off == 0x1C and size == 2:
                    q.enable = value & 1
                elif 0x20 <= off < 0x38 and size in (4, 8):
                    name = ("desc", "avail", "used")[(off - 0x20) // 8]
                    shift = 8 * ((off - 0x20) % 8)
                    mask = ((1 << (8 * size)) - 1) << shift
                    setattr(q, name, (getattr(q, name) & ~mask) | ((value << shift) & mask))
        if reset:
            self.loop.call_soon(self._reset)
        if activate:
            self.loop.call_soon(self._activate)

    def _set_status(self, value: int) -> bool:
        """Apply a non-zero status write; True when the driver just set DRIVER_OK."""
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            if self.driver_features & ~self.offered or not self.driver_features & F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # refused: the driver reads it back clear
        newly_ok = bool(value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK)
        self.status = (self.status | value) & 0xFF
        return newly_ok and bool(self.status & STATUS_FEATURES_OK)

    def _activate(self, serve_pending: bool = True) -> None:
        queues = []
        try:
            for i, q in enumerate(self.queues):
                vq = Virtqueue(
                    self.memory,
                    i,
                    q.size,
                    q.desc,
                    q.avail,
                    q.used,
                    event_idx=bool(self.driver_features & F_EVENT_IDX),
                    indirect=bool(self.driver_features & F_INDIRECT_DESC),
                )
                vq.ready = bool(q.enable)
                queues.append(vq)
        except VirtqueueError as exc:
            self.device.fail(str(exc))
            self.signal_config()
            return
        self.active = queues
        self.device.activate(self.memory, queues, self, self.driver_features)
        if serve_pending:
            # the doorbell is an ioeventfd and this callback is not: a driver's first kick can
            # reach the loop before it and find no active queues. Serve what is already posted.
            for vq in queues:
                if vq.has_available():
                    self._notify(vq.index)

    def _reset(self) -> None:
        # on the loop: the device stops using the old queues (it may still have been serving
        # them), before any activation the driver queued after this reset
        self.device.reset()
        with self._lock:
            self.isr = 0
            self.irq.set_level(False)

    def _notify(self, index: int) -> None:
        if self.status & STATUS_DRIVER_OK and self.active and not self.device.broken:
            try:
                self.device.queue_notify(index)
            except VirtqueueError as exc:  # a device path that did not catch it itself
                self.device.fail(str(exc))
                self.signal_config()
            # a queue the device stopped serving at its per-wake budget: the rest on a later turn
            for vq in self.active:
                if vq.deferred:
                    vq.deferred = False
                    self.loop.call_soon((lambda q: lambda: self._notify(q))(vq.index))

    # -- state (snapshot, migration) -------------------------------------------------------------
    def save_state(self) -> VirtioPciState:
        """Transport registers, MSI-X table, live virtqueue positions and the device's own
        state. The PCI configuration space itself travels with the bus (PciRoot)."""
        with self._lock:
            return VirtioPciState(
                status=self.status,
                device_feature_select=self.device_feature_select,
                driver_feature_select=self.driver_feature_select,
                driver_features=self.driver_features,
                queue_select=self.queue_select,
                config_generation=self.config_generation,
                isr=self.isr,
                config_vector=self.config_vector,
                broken=self.device.broken,
                queues=[
                    QueueState(
                        size=q.size, enable=q.enable, desc=q.desc, avail=q.avail, used=q.used, vector=q.vector
                    )
                    for q in self.queues
                ],
                msix_table=bytes(self.msix_table),
                active=[vq.save_state() for vq in self.active],
                device=self.device.save_state().model_dump(mode="json"),
            )

    def load_state(self, state: VirtioPciState) -> None:
        """Called on a fresh device after the bus restored its configuration space: the guest's
        rings are in restored memory, so live queues are rebuilt over them and re-kicked."""
        if (
            len(state.queues) != len(self.queues)
            or len(state.msix_table) != len(self.msix_table)
            or len(state.active) not in (0, len(self.queues))
        ):
            raise StateError("virtio state is for a device with a different queue layout")
        for i, (regs, most) in enumerate(zip(state.queues, self.device.queue_sizes, strict=True)):
            # what a guest's own queue_size write may set, and no more: a larger queue would
            # make every later bound (chain length, iovec count) the stream's choice
            if regs.size > most or regs.size & (regs.size - 1):
                raise StateError(
                    f"virtio state: queue {i} has {regs.size} entries (this device offers {most})"
                )
        # the device's own state first: it is refused before anything changed
        own = self.device.state_model.model_validate(state.device)
        with self._lock:
            self.status = state.status
            self.device_feature_select = state.device_feature_select
            self.driver_feature_select = state.driver_feature_select
            self.driver_features = state.driver_features & self.offered
            self.queue_select = state.queue_select
            self.config_generation = state.config_generation
            self.isr = state.isr & (ISR_QUEUE | ISR_CONFIG)
            self.config_vector = self._vector(state.config_vector)
            for q, regs in zip(self.queues, state.queues, strict=True):
                q.size, q.enable, q.desc, q.avail, q.used = (
                    regs.size,
                    regs.enable,
                    regs.desc,
                    regs.avail,
                    regs.used,
                )
                q.vector = self._vector(regs.vector)
            self.msix_table[:] = state.msix_table
        self.device.load_state(own)
        for i in range(len(self.msi)):
            self._msix_update(i)
        if self.isr and not self._msix_control() & MSIX_ENABLE:
            self.irq.set_level(True)
        if state.broken:
            self.device.fail("restored broken")
        elif self.status & STATUS_DRIVER_OK and state.active:
            self._activate(serve_pending=False)  # the saved positions first, then serve
            for vq, saved in zip(self.active, state.active, strict=False):
                vq.load_state(saved)
            # requests made available but not served before the snapshot
            for i in range(len(self.active)):
                self.loop.call_soon((lambda q: lambda: self._notify(q))(i))

    # -- VirtioInterrupt --------------------------------------------------------------------------
    def signal_queue(self, index: int) -> None:
        q = self.queues[index] if index < len(self.queues) else None
        self._raise(q.vector if q else NO_VECTOR, ISR_QUEUE)

    def signal_config(self) -> None:
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._raise(self.config_vector, ISR_CONFIG)
