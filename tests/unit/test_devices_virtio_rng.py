"""virtio-rng (corral.devices.virtio.rng) driven from a Python driver."""

from __future__ import annotations

from support.virtio_driver import Driver

from corral.devices.virtio.rng import VirtioRng


def test_rng_fills_buffers():
    d = Driver(VirtioRng())
    d.setup()
    try:
        buf = d.alloc(4096)
        head = d.submit(0, [(buf, True)])
        assert d.used(0) == [(head, 4096)]
        data = d.mem.read(*buf)
        assert len(set(data)) > 200  # random, not zeros
    finally:
        d.close()
