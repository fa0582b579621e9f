"""The contract between a virtio device model and its transport (virtio-pci).

A device model (blk, net, rng, ...) knows nothing of PCI or KVM. The transport owns feature
negotiation, the device status machine, queue configuration and interrupts; it hands the device
ready-made `Virtqueue`s when the driver sets DRIVER_OK, and calls `queue_notify` from the VM's
device event loop when a queue's doorbell (an ioeventfd) fires. The device raises interrupts only
through `VirtioInterrupt`, so the transport decides between MSI-X and INTx.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from corral.devices.base import DeviceState
from corral.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError

if TYPE_CHECKING:
    from corral.memory import GuestMemory

# Device types (virtio 1.2 section 5)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19

# Device-independent feature bits (virtio 1.2 section 6)
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33

# Device status bits (virtio 1.2 section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128


class VirtioInterrupt(Protocol):
    """How a device interrupts its driver; the transport routes it (MSI-X vector or INTx+ISR)."""

    def signal_queue(self, index: int) -> None:
        """Tell the driver that queue `index` has new used buffers."""

    def signal_config(self) -> None:
        """Tell the driver that the device configuration space changed."""


S = TypeVar("S", bound=DeviceState)


class VirtioDevice(abc.ABC, Generic[S]):
    """One virtio device model. Subclasses set `device_id`, `queue_sizes` and `state_model`
    (the device's own state beyond its queues: `NoState` for a device without any).

    Threading: `activate`, `queue_notify` and `reset` run on the VM's device event loop thread;
    `read_config`/`write_config` run on a vCPU thread. A device that must be consistent between
    them takes its own lock.
    """

    device_id: int
    queue_sizes: tuple[int, ...]  # maximum size of each queue (a power of 2, <= 32768)

    def __init__(self) -> None:
        self.broken = False  # set with `fail()`; the transport then shows NEEDS_RESET

    @abc.abstractmethod
    def device_features(self) -> int:
        """Device-specific feature bits offered (transport adds VERSION_1, EVENT_IDX, INDIRECT)."""

    def read_config(self, offset: int, size: int) -> int:
        """Read `size` bytes of the device-specific configuration space (little endian)."""
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Driver writes to configuration space; most devices ignore them."""

    def config_bytes(self) -> bytes:
        """The device-specific configuration space as bytes (default: empty)."""
        return b""

    @abc.abstractmethod
    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        """The driver set DRIVER_OK: start serving `queues` (None-free, one per queue_sizes entry;
        a queue the driver did not enable is present with `ready == False`)."""

    @abc.abstractmethod
    def queue_notify(self, index: int) -> None:
        """The driver kicked queue `index`: process what it made available."""

    def serve(
        self, queue: Virtqueue, interrupt: VirtioInterrupt, handle: Callable[[DescriptorChain], int]
    ) -> None:
        """Drain `queue` in batches: take every request the driver has posted (`pop_into`), let
        `handle` serve each (it returns the bytes it wrote), complete the batch with one
        used-index publish, and look again; at most one interrupt for the whole drain (EVENT_IDX
        or NO_INTERRUPT decide). At most a queue's worth of requests per call: a guest that
        refills as fast as the device serves would hold the loop forever, so what is left sets
        `queue.deferred` and the transport serves it on the loop's next turn, after the other
        devices. A malformed ring puts the device in NEEDS_RESET, once the requests taken before
        the bad one are completed."""
        budget = queue.size
        while budget:
            chains: list[DescriptorChain] = []
            error: VirtqueueError | None = None
            try:
                queue.pop_into(chains, budget)
            except VirtqueueError as exc:
                error = exc
            queue.push_many([(chain.head, handle(chain)) for chain in chains])
            if error is not None:
                self.fail(str(error))
                interrupt.signal_config()
                return
            if not chains:
                break
            budget -= len(chains)
        else:
            queue.deferred = queue.has_available()
        if queue.needs_interrupt():
            interrupt.signal_queue(queue.index)

    def reset(self) -> None:
        """The driver wrote status 0: drop the queues and return to the initial state."""
        self.broken = False

    def fail(self, reason: str) -> None:
        """A guest error the device cannot recover from: the transport will set NEEDS_RESET."""
        self.broken = True

    # the state contract (devices/base.py: Stateful). A ClassVar cannot hold the type
    # variable, so this is a plain annotation; each device sets it as a class attribute.
    state_model: type[S]

    def save_state(self) -> S:
        """The device's own state; the default suits a model whose fields all have defaults."""
        return self.state_model()

    def load_state(self, state: S) -> None:
        """Take the device's own state (validated through `state_model` by the transport)."""

    def close(self) -> None:
        """Release host resources (files, sockets, taps)."""
