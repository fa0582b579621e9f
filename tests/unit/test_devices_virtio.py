"""Hostile queues against every virtio device: random descriptor tables (addresses, lengths,
flags, next links), random heads and random buffer contents (request headers, packet headers,
page numbers) on every queue. Whatever happens, no exception escapes the device, the transport
still answers, and a reset brings the device back to work."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fakes import FakeLoop
from support.virtio_driver import DATA, Driver

from corral.backends.console import ConsoleBackend
from corral.backends.disk import open_disk
from corral.backends.unix_socket import listen_unix
from corral.devices.virtio.balloon import VirtioBalloon
from corral.devices.virtio.blk import VirtioBlock
from corral.devices.virtio.console import VirtioConsole
from corral.devices.virtio.rng import VirtioRng
from corral.devices.virtio.vsock import VirtioVsock

DEVICES = ["blk", "rng", "console", "balloon", "vsock", "net"]


def make(kind: str, tmp: Path):
    loop = FakeLoop()
    if kind == "blk":
        img = tmp / "d.img"
        img.write_bytes(bytes(64 * 512))
        return VirtioBlock(open_disk(str(img))), loop
    if kind == "rng":
        return VirtioRng(), loop
    if kind == "console":
        return VirtioConsole(ConsoleBackend(f"file={tmp / 'hvc.log'}"), loop), loop
    if kind == "balloon":
        return VirtioBalloon(), loop
    if kind == "vsock":
        uds = tmp / f"v{uuid.uuid4().hex[:6]}.sock"
        return VirtioVsock(5, listen_unix(uds, "vsock socket", "vsock.uds_path"), loop), loop
    from corral.backends.tap import Tap
    from corral.devices.virtio.net import VirtioNet

    return VirtioNet(Tap("crlf" + uuid.uuid4().hex[:8]), bytes.fromhex("525400000001"), loop), loop


descriptor = st.tuples(
    st.one_of(st.integers(0, 1 << 25), st.integers(0, 1 << 64 - 1)),
    st.one_of(st.integers(0, 8192), st.integers(0, 1 << 32 - 1)),
    st.integers(0, 7),
    st.integers(0, 300),
)


@pytest.mark.parametrize("kind", DEVICES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(descriptor, min_size=1, max_size=40),
    heads=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 300)), min_size=1, max_size=12),
    junk=st.binary(min_size=64, max_size=4096),
)
def test_hostile_queues_never_break_the_vmm(tmp_path_factory, kind, descs, heads, junk):
    if kind == "net" and (os.geteuid() != 0 or not os.path.exists("/dev/net/tun")):
        pytest.skip("needs root for a tap")
    tmp = tmp_path_factory.mktemp(kind)
    dev, loop = make(kind, tmp)
    d = Driver(dev)
    try:
        d.setup()
        nq = len(dev.queue_sizes)
        d.mem.write(DATA, (junk * (65536 // len(junk) + 1))[:65536])  # garbage "requests"
        for q in range(nq):
            table, _, _ = d.rings(q)
            for i, (addr, n, flags, nxt) in enumerate(descs):
                d.mem.write(
                    table + 16 * i,
                    (addr & (1 << 64) - 1).to_bytes(8, "little")
                    + (n & 0xFFFF_FFFF).to_bytes(4, "little")
                    + flags.to_bytes(2, "little")
                    + nxt.to_bytes(2, "little"),
                )
        for q, h in heads:
            d.put_avail(q % nq, h)
        loop.run_ready(timeout=0.01)
        d.status()  # the transport still answers
        d.setup()  # and a reset brings the device back
        assert not dev.broken
    finally:
        d.close()
