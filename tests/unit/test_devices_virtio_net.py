"""virtio-net on a real tap device, driven by the Python driver: frames from the guest appear on
the host's interface, frames sent on the host interface land in the guest's receive buffers."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from support.fakes import FakeLoop
from support.virtio_driver import Driver

from corral.backends.tap import Tap
from corral.config import NetConfig
from corral.devices.virtio import fastpath
from corral.devices.virtio.base import F_EVENT_IDX
from corral.devices.virtio.net import F_MRG_RXBUF, RX_BATCH, VirtioNet
from corral.errors import ConfigError, HostError

ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_QDISC_BYPASS = 263, 20  # <linux/if_packet.h>: a send is on the tap's queue when it returns
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing on the host answers it
GUEST_MAC = bytes.fromhex("525400c0ffee")
HOST_MAC = bytes.fromhex("525400aabbcc")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun to create taps",
)


@pytest.fixture
def net():
    name = "crlt" + uuid.uuid4().hex[:8]
    loop = FakeLoop()
    dev = VirtioNet(Tap(name), GUEST_MAC, loop)
    # no IPv6 autoconfiguration chatter from the host on the test's wire
    Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
    # Tap() brought the link up first, so the host may already have queued a frame of its own
    # (a duplicate address detection solicitation took a test's only buffer in CI): drain them
    for _ in range(64):  # (bounded: a host that never stops sending fails the test, not hangs it)
        if not select.select([dev.tap.fd], [], [], 0.2)[0]:
            break
        os.read(dev.tap.fd, 65536)
    d = Driver(dev)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((name, 0))
    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    sock.settimeout(5)
    yield d, loop, sock, dev
    sock.close()
    d.close()


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + struct.pack(">H", ETHERTYPE) + payload


def host_receives(sock: socket.socket, payload: bytes) -> bytes:
    while True:
        data = sock.recv(65536)
        if payload in data:
            return data


def pump(loop: FakeLoop, dev: VirtioNet) -> None:
    """Wait until the tap is readable and run the device's reader, as the event loop would."""
    r, _, _ = select.select([dev.tap.fd], [], [], 5)
    assert r, "nothing arrived on the tap"
    loop.readers[dev.tap.fd]()


def received(d: Driver, loop: FakeLoop, dev: VirtioNet, bufs, payload: bytes):
    """Pump until a frame carrying `payload` is in the guest's used ring (the host may send a
    stray frame of its own first); returns its completions [(head, len)] and bytes."""
    for _ in range(10):
        pump(loop, dev)
        done = d.used(0)
        i = 0
        while i < len(done):
            head = done[i][0]
            count = struct.unpack_from("<H", d.mem.read(bufs[head][0], 12), 10)[0]
            group = done[i : i + count]
            data = b"".join(d.mem.read(bufs[h][0], n) for h, n in group)
            if payload in data:
                return group, data
            i += count
    raise AssertionError("the frame never reached the guest")


def test_config_space_has_mac_and_link_up(net):
    d, _, _, _ = net
    d.setup()
    assert bytes(d.config(i, 1) for i in range(6)) == GUEST_MAC
    assert d.config(6, 2) == 1  # VIRTIO_NET_S_LINK_UP


def test_guest_frame_reaches_the_host(net):
    d, _, sock, dev = net
    d.setup()
    payload = b"corral-tx-" + uuid.uuid4().hex.encode()
    d.submit(1, [(d.alloc(bytes(12) + frame(b"\xff" * 6, GUEST_MAC, payload)), False)])
    got = host_receives(sock, payload)
    assert got[6:12] == GUEST_MAC and got[12:14] == struct.pack(">H", ETHERTYPE)
    assert [h for h, _ in d.used(1)] == [0] and dev.stats["tx_frames"] == 1


def test_a_batch_of_scattered_frames_leaves_whole_with_one_publish(net):
    """Frames split over several buffers (header, then the frame in two pieces) leave as one
    frame each, straight from guest RAM; one kick sends the whole batch."""
    d, _, sock, dev = net
    d.setup()
    payloads = [b"corral-sg-%d-" % i + uuid.uuid4().hex.encode() for i in range(8)]
    for i, p in enumerate(payloads):
        whole = frame(b"\xff" * 6, GUEST_MAC, p)
        bufs = [(d.alloc(bytes(12)), False), (d.alloc(whole[:20]), False), (d.alloc(whole[20:]), False)]
        d.submit(1, bufs, head=3 * i, kick=False)
    d.kick(1)
    for p in payloads:
        got = host_receives(sock, p)
        assert got[6:12] == GUEST_MAC and got.endswith(p)
    assert len(d.used(1)) == 8 and dev.stats["tx_frames"] == 8


def test_host_frame_reaches_the_guest(net):
    d, loop, sock, dev = net
    d.setup()
    bufs = [d.alloc(2048) for _ in range(4)]
    for b in bufs:
        d.submit(0, [(b, True)], kick=False)
    d.kick(0)
    payload = b"corral-rx-" + uuid.uuid4().hex.encode()
    sock.send(frame(GUEST_MAC, HOST_MAC, payload))
    done, data = received(d, loop, dev, bufs, payload)
    assert len(done) == 1
    hdr, eth = data[:12], data[12:]
    assert struct.unpack_from("<H", hdr, 10)[0] == 1  # num_buffers
    assert eth[:6] == GUEST_MAC and payload in eth


def _post_rx(d: Driver, n: int, size: int = 2048) -> list[tuple[int, int]]:
    bufs = [d.alloc(size) for _ in range(n)]
    for i, b in enumerate(bufs):
        d.submit(0, [(b, True)], head=i, kick=False)
    d.kick(0)  # the buffers wait (or take a stray frame of the host's: dropped here)
    d.used(0)
    d.isr()  # acknowledged: the line is low before the test's frames
    return bufs


def _send_burst(sock: socket.socket, n: int) -> list[bytes]:
    tag = uuid.uuid4().hex.encode()
    payloads = [b"corral-burst-%03d-" % i + tag for i in range(n)]
    for p in payloads:
        sock.send(frame(GUEST_MAC, HOST_MAC, p))
    return payloads


def _frames_in(d: Driver, bufs, done) -> list[bytes]:
    out = []
    for head, n in done:
        data = d.mem.read(bufs[head][0], n)
        assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers: each in one buffer
        out.append(data[12:])
    return out


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_burst_of_frames_is_received_with_one_publish_and_one_interrupt(net, event_idx, monkeypatch):
    """N frames waiting on the tap and buffers for them: one wake-up delivers all N, in order,
    straight into the guest's buffers, behind one used-index store and one interrupt. (Stores
    are counted through GuestMemory.store_u16, which only the Python path calls: the compiled
    one is held to the Python path by test_fastring.py.)"""
    monkeypatch.setattr(fastpath, "ENABLED", False)
    d, loop, sock, dev = net
    d.setup(features=None if event_idx else ~F_EVENT_IDX & (1 << 64) - 1, queue_size=128)
    assert bool(d.features & F_EVENT_IDX) == event_idx
    bufs = _post_rx(d, 32)
    payloads = _send_burst(sock, 16)
    publishes = d.count_used_publishes(0)
    raised, before = d.irq.raised, dev.stats["rx_frames"]  # (a stray host frame may be counted)
    loop.readers[dev.tap.fd]()
    done = d.used(0)
    got = [f for f in _frames_in(d, bufs, done) if b"corral-burst-" in f]
    assert [f.endswith(p) for f, p in zip(got, payloads, strict=True)] == [True] * 16
    assert len(publishes) == 1 and d.irq.raised - raised == 1
    assert dev.stats["rx_frames"] - before == len(done)


def test_a_driver_that_asks_for_no_interrupt_gets_none(net):
    d, loop, sock, dev = net
    d.setup(queue_size=128)
    _, avail, _ = d.rings(0)
    bufs = _post_rx(d, 32)
    d.mem.write(avail + 4 + 2 * 128, struct.pack("<H", 40))  # used_event: wake me at the 41st
    _send_burst(sock, 8)
    raised = d.irq.raised
    loop.readers[dev.tap.fd]()
    assert len(_frames_in(d, bufs, d.used(0))) >= 8 and d.irq.raised == raised


def test_a_flood_is_taken_a_batch_per_wake_up(net):
    """More frames than the per-wake cap: the first wake-up takes RX_BATCH and leaves the tap on
    the loop (other devices get their turn), the next takes the rest."""
    d, loop, sock, dev = net
    d.setup(queue_size=256)
    bufs = _post_rx(d, 2 * RX_BATCH)
    payloads = _send_burst(sock, RX_BATCH + 10)
    loop.readers[dev.tap.fd]()
    first = d.used(0)
    assert len(first) == RX_BATCH and dev.tap.fd in loop.readers
    loop.readers[dev.tap.fd]()
    got = [f for f in _frames_in(d, bufs, first + d.used(0)) if b"corral-burst-" in f]
    assert [f.endswith(p) for f, p in zip(got, payloads, strict=True)] == [True] * len(payloads)


def test_buffers_run_out_mid_burst_the_rest_waits(net):
    d, loop, sock, dev = net
    d.setup(queue_size=128)
    bufs = _post_rx(d, 4)
    payloads = _send_burst(sock, 6)
    loop.readers[dev.tap.fd]()
    first = _frames_in(d, bufs, d.used(0))
    assert len(first) == 4 and dev.tap.fd not in loop.readers  # parked, the next frame held
    more = [d.alloc(2048) for _ in range(4)]
    for i, b in enumerate(more):
        d.submit(0, [(b, True)], head=4 + i, kick=False)
    d.kick(0)
    # (a frame of the host's own may take a buffer: only the burst's are checked, in order)
    got = [f for f in first + _frames_in(d, bufs + more, d.used(0)) if b"corral-burst-" in f]
    assert [f.endswith(p) for f, p in zip(got, payloads, strict=True)] == [True] * 6
    assert dev.tap.fd in loop.readers


def test_large_frame_spans_mergeable_buffers(net):
    d, loop, sock, dev = net
    d.setup()
    assert d.features & F_MRG_RXBUF
    bufs = [d.alloc(256) for _ in range(8)]
    for b in bufs:
        d.submit(0, [(b, True)], kick=False)
    d.kick(0)
    payload = bytes(range(256)) * 3
    sock.send(frame(GUEST_MAC, HOST_MAC, payload))
    done, data = received(d, loop, dev, bufs, payload)
    assert len(done) == 4  # 12 + 14 + 768 bytes in 256s
    assert [n for _, n in done] == [256, 256, 256, 12 + 14 + 768 - 3 * 256]
    assert data[12 + 14 :] == payload


def test_small_buffers_without_mergeable_drop_the_frame(net):
    d, loop, sock, dev = net
    d.setup(features=~F_MRG_RXBUF & (1 << 64) - 1)
    d.submit(0, [(d.alloc(64), True)])
    sock.send(frame(GUEST_MAC, HOST_MAC, b"x" * 500))
    pump(loop, dev)
    assert [n for _, n in d.used(0)][-1:] == [0] and dev.stats["rx_dropped"] >= 1


def test_frame_waits_for_buffers_instead_of_being_lost(net):
    d, loop, sock, dev = net
    d.setup()
    payload = b"corral-wait-" + uuid.uuid4().hex.encode()
    sock.send(frame(GUEST_MAC, HOST_MAC, payload))
    pump(loop, dev)  # no buffers yet
    assert dev.tap.fd not in loop.readers  # the tap is parked, not spinning
    buf = d.alloc(2048)
    d.submit(0, [(buf, True)])  # the kick delivers it
    ((_head, n),) = d.used(0)
    assert payload in d.mem.read(buf[0], n)
    assert dev.tap.fd in loop.readers


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_tap_whose_reads_fail_is_parked_not_spun_on(net, compiled, monkeypatch, caplog):
    """An interface deleted under the VM leaves a tap fd that polls readable for ever and fails
    every read (EBADFD): left on the loop it would spin it at 100%. It is parked, each failed
    read counted, and logged once; the guest's kicks try it again."""
    if compiled and not fastpath.BUILT:
        pytest.skip("the compiled path is not built")
    monkeypatch.setattr(fastpath, "ENABLED", compiled)
    d, loop, _, dev = net
    d.setup()
    d.submit(0, [(d.alloc(2048), True)])
    assert dev.tap.fd in loop.readers
    subprocess.run(["ip", "link", "del", dev.tap.name], check=True)
    pump(loop, dev)  # readable: the read fails
    assert dev.tap.fd not in loop.readers  # parked
    assert dev.stats["rx_errors"] == 1 and not dev.broken
    assert select.select([dev.tap.fd], [], [], 0)[0]  # (and still readable: it would have spun)
    d.submit(0, [(d.alloc(2048), True)])  # the guest's kicks try it again: it fails again
    d.submit(1, [(d.alloc(64), False)])
    assert dev.tap.fd not in loop.readers and dev.stats["rx_errors"] == 3
    warned = [r for r in caplog.records if "read failed" in r.getMessage()]
    assert len(warned) == 1, warned  # once per run of failures, not once per kick


def test_hostile_tx_chains_never_break_the_device(net):
    d, _, _, dev = net
    d.setup()
    d.submit(1, [(d.alloc(4), False)])  # shorter than the header
    d.submit(1, [(d.alloc(64), True)])  # write-only: no frame at all
    assert len(d.used(1)) == 2 and dev.stats["tx_dropped"] == 2 and not dev.broken


def test_tap_in_use_and_bad_names(net):
    _, _, _, dev = net
    with pytest.raises(HostError, match="in use"):
        Tap(dev.tap.name)
    with pytest.raises(ConfigError, match="cannot name a network interface"):
        Tap("a-name-far-too-long-for-linux")
    with pytest.raises(ConfigError, match="not a MAC address"):
        NetConfig.parse("tap=t0,mac=52:54:00:zz:00:01")
    with pytest.raises(ConfigError, match="multicast"):
        NetConfig.parse("tap=t0,mac=01:00:5e:00:00:01")
    with pytest.raises(ConfigError, match="only tap networking"):
        NetConfig.parse("user")
    with pytest.raises(ConfigError, match="no prefix length"):
        NetConfig.parse("tap=t0,host-ip=10.0.0.1")


def test_host_ip_is_set_up_with_pyroute2():
    name = "crlt" + uuid.uuid4().hex[:8]
    tap = Tap(name, host_ip="10.213.7.1/24")
    try:
        addrs = open(f"/sys/class/net/{name}/operstate").read()
        assert addrs.strip() in ("up", "unknown", "down")  # no carrier until opened: fine
        import subprocess

        out = subprocess.run(["ip", "-o", "addr", "show", "dev", name], capture_output=True, text=True).stdout
        assert "10.213.7.1/24" in out
    finally:
        tap.close()
    assert not os.path.exists(f"/sys/class/net/{name}")  # created by us: gone with us
