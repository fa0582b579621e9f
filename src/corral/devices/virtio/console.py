"""virtio-console, one port (the guest's hvc0), connected to a host pseudo-terminal or a file.

Host to guest: bytes read from the pty go into the receive queue while the guest has buffers
there; without buffers the pty is left unread (its kernel buffer holds what is typed) until the
guest adds some. Guest to host: the transmit queue is written to the pty or appended to the
file; a pty nobody reads fills up, and output beyond that is dropped and counted, as a serial
line would lose it, rather than stalling the device loop.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from corral.devices.base import NoState
from corral.devices.virtio.base import VIRTIO_ID_CONSOLE, VirtioDevice, VirtioInterrupt
from corral.devices.virtio.queue import VirtqueueError

if TYPE_CHECKING:
    from corral.devices.virtio.queue import DescriptorChain, Virtqueue
    from corral.eventloop import EventLoop
    from corral.memory import GuestMemory

RXQ, TXQ = 0, 1
READ_CHUNK = 4096


class ConsolePort(Protocol):
    """The host end as the device sees it (backends/console.py: ConsoleBackend): a non-blocking
    fd, whether it can be read (a pty can, a file cannot), where it goes (for the user), and close."""

    fd: int
    readable: bool
    path: str

    def close(self) -> None: ...


class VirtioConsole(VirtioDevice[NoState]):
    device_id = VIRTIO_ID_CONSOLE
    queue_sizes = (64, 64)
    state_model = NoState  # nothing beyond its queues

    def __init__(self, backend: ConsolePort, loop: EventLoop) -> None:
        super().__init__()
        self.backend, self.loop = backend, loop
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self.interrupt: VirtioInterrupt | None = None
        self._reading = False
        self.dropped = 0

    def device_features(self) -> int:
        return 0

    def activate(
        self, memory: GuestMemory, queues: list[Virtqueue], interrupt: VirtioInterrupt, driver_features: int
    ) -> None:
        self.rx, self.tx, self.interrupt = queues[RXQ], queues[TXQ], interrupt
        self._watch(True)

    def reset(self) -> None:
        super().reset()
        self._watch(False)
        self.rx = self.tx = self.interrupt = None

    def close(self) -> None:
        self._watch(False)
        self.backend.close()

    def _watch(self, on: bool) -> None:
        if on and not self._reading and self.backend.readable:
            self.loop.add_reader(self.backend.fd, self._receive)
            self._reading = True
        elif not on and self._reading:
            self.loop.remove_reader(self.backend.fd)
            self._reading = False

    def queue_notify(self, index: int) -> None:
        if self.interrupt is None:
            return
        if index == TXQ and self.tx is not None:
            self.serve(self.tx, self.interrupt, self._write)
        elif index == RXQ:
            self._receive()

    def _write(self, chain: DescriptorChain) -> int:
        assert self.tx is not None
        data = self.tx.read_all(chain, 1 << 20)
        try:
            n = os.write(self.backend.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            n = 0  # the pty was hung up: output goes nowhere
        self.dropped += len(data) - n
        return 0

    def _receive(self) -> None:
        rx, irq = self.rx, self.interrupt
        if rx is None or irq is None or self.broken:
            self._watch(False)  # input left unread would spin the loop
            return
        used = False
        # at most a queue's worth per wake: a host side that never runs dry and a guest that
        # refills as fast would hold the loop; a pty left unread wakes the loop again
        for _ in range(rx.size):
            try:
                chain = rx.pop()
            except VirtqueueError as exc:
                self.fail(str(exc))
                self._watch(False)
                irq.signal_config()
                return
            if chain is None:
                self._watch(False)  # until the guest posts buffers
                break
            try:
                data = os.read(self.backend.fd, min(READ_CHUNK, chain.writable_len))
            except (BlockingIOError, OSError):
                data = b""
            if not data:
                rx.undo_pop()
                self._watch(True)
                break
            rx.push(chain.head, rx.write_all(chain, data))
            used = True
        else:
            self._watch(True)  # the budget ran out: the reader brings the loop back for the rest
        if used and rx.needs_interrupt():
            irq.signal_queue(RXQ)
