"""virtio-rng: fills the driver's buffers with the host's randomness (getrandom)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from corral.devices.base import NoState
from corral.devices.virtio.base import VIRTIO_ID_RNG, VirtioDevice, VirtioInterrupt

if TYPE_CHECKING:
    from corral.devices.virtio.queue import DescriptorChain, Virtqueue
    from corral.memory import GuestMemory

MAX_REQUEST = 64 * 1024  # per request: a guest asking for gigabytes gets this much


class VirtioRng(VirtioDevice[NoState]):
    device_id = VIRTIO_ID_RNG
    queue_sizes = (256,)
    state_model = NoState  # nothing beyond its queues

    def __init__(self) -> None:
        super().__init__()
        self.queue: Virtqueue | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.bytes_served = 0

    def device_features(self) -> int:
        return 0

    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        self.queue, self.interrupt = queues[0], interrupt

    def queue_notify(self, index: int) -> None:
        if self.queue is not None and self.interrupt is not None:
            self.serve(self.queue, self.interrupt, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        assert self.queue is not None
        n = min(chain.writable_len, MAX_REQUEST)
        written = self.queue.write_all(chain, os.urandom(n)) if n else 0
        self.bytes_served += written
        return written

    def reset(self) -> None:
        super().reset()
        self.queue = self.interrupt = None
