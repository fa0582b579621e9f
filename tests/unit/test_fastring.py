"""The compiled virtqueue path (devices/virtio/_fastring.c) against the Python reference: the
same hostile queues, built in a real GuestMemory, give the same chains or the same error, the
same ring positions and the same avail event; virtio-net's transmit drain and virtio-blk's
reads and writes give the same completions, bytes, counters and device state either way."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fakes import FakeLoop
from support.virtio_driver import Driver, blk_image_file

from corral.arch.x86.layout import MMIO_HOLE_END, MMIO_HOLE_START
from corral.backends.disk import open_disk
from corral.devices.virtio import fastpath
from corral.devices.virtio.base import F_EVENT_IDX, STATUS_NEEDS_RESET
from corral.devices.virtio.blk import HEADER, T_FLUSH, T_GET_ID, T_IN, T_OUT, VirtioBlock
from corral.devices.virtio.net import F_MRG_RXBUF, VirtioNet
from corral.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from corral.memory import GuestMemory

pytestmark = pytest.mark.skipif(not fastpath.BUILT, reason=f"the compiled path is {fastpath.WHY_NOT}")

MiB = 1 << 20
# more examples for a long run (a sanitizer build, say): CORRAL_FUZZ_EXAMPLES raises every count
EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "0"))


def examples(n: int) -> int:
    return max(n, EXAMPLES)


@contextmanager
def compiled(on: bool) -> Iterator[None]:
    saved = fastpath.ENABLED
    fastpath.ENABLED = on
    try:
        yield
    finally:
        fastpath.ENABLED = saved


# -- the walk ---------------------------------------------------------------------------------
# RAM in two slots (below the 32-bit MMIO hole and above it): buffers at both edges, across the
# hole, past the end, at addresses whose end wraps 64 bits, and lengths up to 4 GiB
RAM = MMIO_HOLE_START + 16 * MiB
END = MMIO_HOLE_END + 16 * MiB
DESC, AVAIL, USED, TABLE, TABLE2 = 0x10000, 0x20000, 0x30000, 0x50000, MMIO_HOLE_END + 0x1000
ADDRS = [0, 0x40000, TABLE, TABLE2, MMIO_HOLE_START - 16, MMIO_HOLE_START - 4096, MMIO_HOLE_START,
         MMIO_HOLE_END, END - 64, END - 16, END, 1 << 63, (1 << 64) - 16]  # fmt: skip
LENS = [0, 1, 16, 64, 4096, 1 << 31, (1 << 32) - 1, (1 << 32) - 16]


@pytest.fixture(scope="module")
def ram() -> Iterator[GuestMemory]:
    mem = GuestMemory(RAM)  # sparse: only the pages the tests write are backed
    yield mem
    mem.close()


NEXT = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 15, 16, 31, 32, 33]), st.integers(0, 40))
descriptor = st.tuples(st.sampled_from(ADDRS), st.sampled_from(LENS), st.integers(0, 7), NEXT).map(
    lambda d: struct.pack("<QIHH", *d)
)


def _pop(q: Virtqueue, limit: int) -> tuple[list[tuple], str | None, int]:
    out: list[DescriptorChain] = []
    error = None
    try:
        q.pop_into(out, limit)
    except VirtqueueError as exc:
        error = str(exc)
    return [(c.head, c.readable, c.writable) for c in out], error, q.last_avail


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([1, 2, 4, 16, 32]),
    table=st.lists(descriptor, min_size=32, max_size=32),
    table1=st.lists(descriptor, max_size=36),  # indirect tables, whole or not, up to size + 4
    table2=st.lists(descriptor, max_size=36),
    heads=st.lists(st.integers(0, 40), min_size=32, max_size=32),
    start=st.integers(0, 0xFFFF),
    ahead=st.integers(0, 40),
    limit=st.integers(1, 40),
    event_idx=st.booleans(),
    indirect=st.booleans(),
)
def test_the_compiled_walk_agrees_with_python_on_hostile_rings(
    ram, size, table, table1, table2, heads, start, ahead, limit, event_idx, indirect
):
    ram.write(DESC, b"".join(table))
    ram.write(TABLE, b"".join(table1))
    ram.write(TABLE2, b"".join(table2))
    ram.write(AVAIL, struct.pack("<HH", 0, (start + ahead) & 0xFFFF))  # ahead > size: a bogus index
    ram.write(AVAIL + 4, struct.pack(f"<{size}H", *heads[:size]))
    results = []
    for on in (False, True):
        ram.write(USED, bytes(8 + 8 * size))
        q = Virtqueue(ram, 3, size, DESC, AVAIL, USED, event_idx=event_idx, indirect=indirect)
        q.last_avail = start
        with compiled(on):
            results.append((_pop(q, limit), ram.read(USED + 4 + 8 * size, 2)))
    assert results[0] == results[1]


def test_every_rule_has_its_message_in_both_paths(ram):
    """Each rule of queue.py's docstring, broken once: the same message from both walks."""
    d = struct.Struct("<QIHH").pack
    cases = {
        "head descriptor 9 >= size 8": ([d(0x40000, 16, 0, 0)], 9),
        "longer than the queue size 8 (or a loop)": ([d(0x40000, 16, 1, 0)], 0),
        "indirect descriptor not allowed here": ([d(TABLE, 16, 4, 0)], 0, False),
        "bad indirect table (24 bytes)": ([d(TABLE, 24, 4, 0)], 0),
        "indirect table of 9 descriptors is larger": ([d(TABLE, 16 * 9, 4, 0)], 0),
        "indirect table outside RAM": ([d(END - 16, 32, 4, 0)], 0),
        f"buffer {END - 8:#x}+0x10 is outside guest RAM": ([d(END - 8, 16, 0, 0)], 0),
        f"buffer {MMIO_HOLE_START - 8:#x}+0x10 is outside": ([d(MMIO_HOLE_START - 8, 16, 0, 0)], 0),
        "request larger than 4 GiB": ([d(0, 1 << 31, 1, 1), d(0, 1 << 31, 1, 2), d(0, 1, 0, 0)], 0),
        "readable buffer after a writable one": ([d(0x40000, 16, 3, 1), d(0x40000, 16, 0, 0)], 0),
        "next descriptor 8 >= 8": ([d(0x40000, 16, 1, 8)], 0),
        "avail idx 12 is 12 ahead": ([d(0x40000, 16, 0, 0)], 0, True, 12),
    }
    ram.write(TABLE, d(TABLE, 16, 4, 0))  # a nested table, for the indirect-in-indirect case
    for expected, (descs, head, *rest) in cases.items():
        indirect = rest[0] if rest else True
        avail_idx = rest[1] if len(rest) > 1 else 1
        ram.write(DESC, bytes(16 * 8))
        ram.write(DESC, b"".join(descs))
        ram.write(AVAIL, struct.pack("<HHH", 0, avail_idx, head))
        got = []
        for on in (False, True):
            q = Virtqueue(ram, 3, 8, DESC, AVAIL, USED, event_idx=False, indirect=indirect)
            with compiled(on):
                got.append(_pop(q, 8))
        assert got[0] == got[1], expected
        assert expected in (got[0][1] or ""), got[0]


def test_off_during_migration_and_after_close():
    mem = GuestMemory(16 * MiB)
    assert fastpath.usable(mem) == fastpath.ENABLED
    mem.vmm_dirty = set()  # the VMM's own writes are tracked: only Python knows how
    assert not fastpath.usable(mem)
    mem.vmm_dirty = None
    mem.close()
    assert not fastpath.usable(mem)


def test_tracking_starts_and_memory_goes_only_between_compiled_calls():
    mem = GuestMemory(16 * MiB)
    mem.direct_access.acquire()  # as a compiled drain holds it
    started = threading.Thread(target=mem.track_vmm_writes)
    closed = threading.Thread(target=mem.close)
    started.start()
    started.join(0.2)
    assert started.is_alive() and mem.vmm_dirty is None  # waits for the drain
    mem.direct_access.release()
    started.join(5)
    assert mem.vmm_dirty == set()
    mem.direct_access.acquire()
    closed.start()
    closed.join(0.2)
    assert closed.is_alive() and not mem.closed
    mem.direct_access.release()
    closed.join(5)
    assert mem.closed


def test_a_tracked_memory_is_served_by_python_which_records_the_pages(tmp_path):
    d = Driver(VirtioBlock(open_disk(str(blk_image_file(tmp_path / "disk.img")))))
    try:
        d.setup(queue_size=64)
        d.mem.track_vmm_writes()
        buf = d.alloc(4096)
        d.submit(0, [(d.alloc(HEADER.pack(T_IN, 0, 8)), False), (buf, True), (d.alloc(1), True)])
        assert d.used(0)[0][1] == 4097
        assert (buf[0] >> 12) in d.mem.vmm_dirty  # the page the read landed in is recorded
    finally:
        d.close()


# -- virtio-net transmit -----------------------------------------------------------------------
class _Wire:
    """A tap stand-in: one end of a datagram socketpair (one frame per datagram)."""

    def __init__(self) -> None:
        self.host, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.host.setblocking(False)
        peer.setblocking(False)
        self.fd, self.name, self._peer = peer.fileno(), "wire", peer

    def set_offload(self, *, csum: bool, tso4: bool, tso6: bool, ecn: bool) -> None:
        pass

    def frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.host.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self._peer.close()
        self.host.close()


def _start_at(d: Driver, qi: int, q: Virtqueue | None, start: int) -> None:
    """Both sides of queue `qi` at ring index `start` (near 0xFFFF: the indices wrap mid-run)."""
    assert q is not None
    q.last_avail = q.used_idx = q._signalled_used = start
    d.avail_idx[qi] = d.seen_used[qi] = start
    _, avail, used = d.rings(qi)
    d.mem.write(avail + 2, struct.pack("<H", start))
    d.mem.write(used + 2, struct.pack("<H", start))


START = st.sampled_from([0, 0xFFFF - 2, 0xFFF0])  # ring indices that wrap during the run

frame_spec = st.tuples(
    st.integers(0, 200),  # bytes
    st.integers(1, 3),  # split over this many buffers
    st.sampled_from(["ok", "ok", "ok", "writable", "bad-head", "huge"]),
)


def _transmit(frames: list[tuple[int, int, str]], on: bool, event_idx: bool, start: int = 0) -> tuple:
    wire = _Wire()
    dev = VirtioNet(wire, bytes(6), FakeLoop())
    d = Driver(dev)
    try:
        d.setup(features=None if event_idx else ~F_EVENT_IDX & (1 << 64) - 1, queue_size=64)
        _start_at(d, 1, dev.tx, start)
        for i, (n, parts, kind) in enumerate(frames):
            data = bytes((i + j) & 0xFF for j in range(n))
            cut = [len(data) * k // parts for k in range(parts + 1)]
            bufs = [(d.alloc(data[a:b] or b"\0"), False) for a, b in itertools.pairwise(cut)]
            if kind == "writable":
                bufs[0] = (bufs[0][0], True)
            if kind == "huge":
                bufs = [((0x100000, 70000), False)]
            if kind == "bad-head":
                d.put_avail(1, 200, kick=False)
                continue
            d.submit(1, bufs, head=(3 * i) % 64, kick=False)
        raised = d.irq.raised
        with compiled(on):
            d.kick(1)
        return (
            d.used(1),
            wire.frames(),
            dev.stats,
            bool(d.status() & STATUS_NEEDS_RESET),
            d.irq.raised - raised,
        )
    finally:
        d.close()


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(frame_spec, max_size=21), event_idx=st.booleans(), start=START)
def test_compiled_transmit_sends_what_python_sends(frames, event_idx, start):
    assert _transmit(frames, False, event_idx, start) == _transmit(frames, True, event_idx, start)


def test_compiled_transmit_writes_each_frame_once_from_guest_ram():
    frames = [(60, 2, "ok")] * 20 + [(5, 1, "ok")]  # the last: shorter than the header, dropped
    used, sent, stats, broken, irqs = _transmit(frames, True, True)
    assert len(used) == 21 and all(n == 0 for _, n in used)
    assert len(sent) == 20 and sent[0] == bytes(range(60))
    assert stats["tx_frames"] == 20 and stats["tx_dropped"] == 1 and stats["tx_bytes"] == 20 * 48
    assert not broken and irqs == 1


# -- virtio-net receive --------------------------------------------------------------------------
rx_chain = st.tuples(
    st.sampled_from([[64], [2048], [8, 8, 2048], [4, 200], [11], [100, 100]]),  # writable sizes
    st.sampled_from(["ok", "ok", "ok", "alias", "readable-first", "bad-head"]),
)


def _receive(
    chains: list, frames: list[int], on: bool, mergeable: bool, event_idx: bool, kicks: int
) -> tuple:
    wire = _Wire()
    loop = FakeLoop()
    dev = VirtioNet(wire, bytes(6), loop)
    d = Driver(dev)
    try:
        features = (1 << 64) - 1
        if not event_idx:
            features &= ~F_EVENT_IDX
        if not mergeable:
            features &= ~F_MRG_RXBUF
        d.setup(features=features, queue_size=32)
        bufs = []
        for i, (sizes, kind) in enumerate(chains):
            if kind == "bad-head":
                d.put_avail(0, 77, kick=False)
                continue
            parts = [(d.alloc(n), True) for n in sizes]
            if kind == "alias":
                parts.append(parts[0])
            if kind == "readable-first":
                parts.insert(0, (d.alloc(16), False))
            d.submit(0, parts, head=(4 * i) % 32, kick=False)
            bufs.append(parts)
        for i, n in enumerate(frames):
            wire.host.send(bytes(10) + bytes([1, 0]) + bytes((i + j) & 0xFF for j in range(n)))
        with compiled(on):
            for _ in range(kicks):
                if dev.tap.fd in loop.readers:
                    loop.readers[dev.tap.fd]()
            d.kick(0)
        seen = [d.mem.read(a, n) for parts in bufs for (a, n), _ in parts]
        return (
            d.used(0),
            seen,
            dev.stats,
            dev._pending,
            dev.tap.fd in loop.readers,
            bool(d.status() & STATUS_NEEDS_RESET),
            d.irq.raised,
            len(wire.frames()),
        )
    finally:
        d.close()


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=st.lists(rx_chain, max_size=12),
    frames=st.lists(st.sampled_from([0, 1, 40, 60, 300, 1500, 5000]), max_size=80),
    mergeable=st.booleans(),
    event_idx=st.booleans(),
    kicks=st.integers(1, 3),
)
def test_compiled_receive_delivers_what_python_delivers(chains, frames, mergeable, event_idx, kicks):
    python = _receive(chains, frames, False, mergeable, event_idx, kicks)
    assert python == _receive(chains, frames, True, mergeable, event_idx, kicks)


def test_compiled_receive_reads_frames_into_the_guest_buffers():
    chains = [([2048], "ok")] * 8
    used, seen, stats, pending, reading, broken, irqs, _ = _receive(chains, [60] * 5, True, True, True, 1)
    assert [n for _, n in used] == [72] * 5
    assert seen[0][:12] == bytes(10) + b"\1\0" and seen[0][12:72] == bytes(range(60))
    assert stats["rx_frames"] == 5 and stats["rx_bytes"] == 300 and pending is None
    assert reading and not broken and irqs == 1


# -- virtio-blk reads and writes ---------------------------------------------------------------
request_spec = st.tuples(
    st.sampled_from([T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, 99]),
    st.sampled_from([0, 1, 7, 250, 255, 256, 1 << 60, (1 << 64) - 1]),  # sector
    st.sampled_from([0, 1, 512, 1024, 4096, 4095]),  # data bytes
    st.sampled_from(["split", "one", "header-split", "no-status", "bad-head"]),
)


def _blk(
    tmp_path,
    requests: list[tuple],
    on: bool,
    read_only: bool,
    event_idx: bool,
    shrink: bool = False,
    start: int = 0,
) -> tuple:
    path = blk_image_file(tmp_path / f"disk-{on}.img")
    d = Driver(VirtioBlock(open_disk(str(path), read_only=read_only)))
    if shrink:  # the image lost its second half behind the device's back: short reads
        os.truncate(path, path.stat().st_size // 2)
    try:
        d.setup(features=None if event_idx else ~F_EVENT_IDX & (1 << 64) - 1, queue_size=64)
        _start_at(d, 0, d.device.queue, start)
        bufs = []
        for i, (rtype, sector, n, layout) in enumerate(requests):
            hdr = HEADER.pack(rtype, 0, sector)
            data = d.alloc(bytes([i + 1]) * n) if n else None
            status = d.alloc(1)
            if layout == "bad-head":
                d.put_avail(0, 99, kick=False)
                continue
            if layout == "header-split":
                chain = [(d.alloc(hdr[:8]), False), (d.alloc(hdr[8:]), False)]
            else:
                chain = [(d.alloc(hdr), False)]
            if data is not None:
                chain.append((data, rtype != T_OUT))
            if layout == "one" and data is not None and rtype != T_OUT:
                chain[-1] = ((data[0], n + 1), True)  # data and status in one buffer
                status = (data[0] + n, 1)
            elif layout != "no-status":
                chain.append((status, True))
            d.submit(0, chain, head=(4 * i) % 64, kick=False)
            bufs.append((data, status))
        with compiled(on):
            d.kick(0)
        seen = [d.mem.read(a, n) for b, s in bufs for a, n in ([b] if b else []) + [s]]
        dev = d.device
        return (
            d.used(0),
            seen,
            dev.io_counters(),
            bool(d.status() & STATUS_NEEDS_RESET),
            d.irq.raised,
            path.read_bytes(),
        )
    finally:
        d.close()


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request_spec, max_size=16),
    read_only=st.booleans(),
    event_idx=st.booleans(),
    shrink=st.booleans(),
    start=START,
)
def test_compiled_reads_and_writes_agree_with_python(
    tmp_path_factory, requests, read_only, event_idx, shrink, start
):
    tmp = tmp_path_factory.mktemp("blk")
    python = _blk(tmp, requests, False, read_only, event_idx, shrink, start)
    assert python == _blk(tmp, requests, True, read_only, event_idx, shrink, start)


def test_compiled_blk_reads_and_writes_the_file(tmp_path):
    reqs = [(T_IN, 8 * i, 4096, "split") for i in range(8)] + [
        (T_OUT, 3, 512, "split"),
        (T_FLUSH, 0, 0, "split"),
    ]
    used, seen, counters, broken, _, image = _blk(tmp_path, reqs, True, False, True)
    assert [n for _, n in used] == [4097] * 8 + [1, 1]
    assert all(struct.unpack_from("<Q", seen[2 * i])[0] == 8 * i for i in range(8))
    assert all(s == b"\0" for s in seen[1::2])  # every status S_OK
    assert image[3 * 512 : 4 * 512] == bytes([9]) * 512
    assert counters == {"requests": 10, "read_bytes": 8 * 4096, "write_bytes": 512, "errors": 0}
    assert not broken


def test_the_env_var_turns_the_compiled_path_off():
    import subprocess
    import sys

    code = "from corral.devices.virtio import fastpath as f; print(f.ENABLED, f.describe())"
    env = dict(os.environ, CORRAL_NO_FASTPATH="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False Python; the compiled one is off (CORRAL_NO_FASTPATH is set)")
    env["CORRAL_NO_FASTPATH"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True compiled")


def test_a_short_read_fails_the_request_in_both_paths(tmp_path):
    """An image shrunk behind the device's back reads short: IOERR, never data that is not there."""
    reqs = [(T_IN, 250, 1024, "split"), (T_IN, 8, 512, "split")]
    python = _blk(tmp_path, reqs, False, False, True, shrink=True)
    assert python[2]["errors"] == 1 and python[1][1] == b"\x01" and python[1][3] == b"\0"
    assert _blk(tmp_path, reqs, True, False, True, shrink=True) == python


# -- found in review (issue 16): each failed before its fix ------------------------------------
def test_a_receive_chain_of_many_buffers_goes_to_python_not_a_quadratic_check():
    """A queue as large as the spec allows (a restored one may be) and a receive chain of one
    writable byte pair per descriptor: the C aliasing check was pairwise, ~5e8 compares with
    the GIL-free loop thread stuck, per wake. Past 64 buffers Python (which sorts) decides."""
    import time

    size = 32768
    mem = GuestMemory(64 * MiB)
    wire = _Wire()
    try:
        desc, avail, used, bufs = 0x100000, 0x200000, 0x300000, 0x400000
        mem.write(desc, b"".join(struct.pack("<QIHH", bufs + 2 * i, 2, 3, i + 1) for i in range(size - 1)))
        mem.write(desc + 16 * (size - 1), struct.pack("<QIHH", bufs + 2 * (size - 1), 2, 2, 0))
        mem.write(avail, struct.pack("<HHH", 0, 1, 0))
        q = Virtqueue(mem, 0, size, desc, avail, used, event_idx=False, indirect=False)
        wire.host.send(bytes(12) + bytes(60))
        start = time.monotonic()
        with compiled(True):
            got = fastpath.net_rx(q, wire.fd, memoryview(bytearray(65550)), 1)
        took = time.monotonic() - start
        assert got is not None and got.status == fastpath.RX_PYTHON and got.frames == 0
        assert q.last_avail == 0 and took < 0.25, took  # the chain is left, found long at once
    finally:
        wire.close()
        mem.close()


def test_a_pop_after_the_memory_closed_fails_the_queue_not_the_vmm():
    """`pop_into` checks `usable` and then calls `take`; the GIL may pass in between to a thread
    that closes (unmaps) the memory (teardown after the loop did not stop in time). take then
    read unmapped RAM: SIGSEGV. Now it checks under the memory's lock (in a child: the crash)."""
    import subprocess
    import sys

    code = f"""
import struct
from corral.devices.virtio import fastpath
from corral.devices.virtio.queue import Virtqueue
from corral.memory import GuestMemory
mem = GuestMemory({16 * MiB})
mem.write(0x20000, struct.pack("<HHH", 0, 1, 0))
q = Virtqueue(mem, 0, 8, 0x10000, 0x20000, 0x30000, event_idx=False, indirect=False)
assert fastpath.usable(mem)
mem.close()  # as another thread does right after the check
print(fastpath.take(q, 1), q.last_avail)
"""
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_NO_FASTPATH"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "([], 'queue 0: guest memory is closed (the VM is going away)') 0"


def test_a_spilled_frame_is_whole_in_the_bounce_buffer_when_the_guest_changes_its_chain(monkeypatch):
    """A frame larger than the next receive chain: net.py walked that chain a second time to
    read its part back, and the guest (another vCPU) may change the chain between the two
    walks: an IndexError in the device (the avail index taken back) or another buffer's bytes
    in the frame. Now C puts the frame together in the bounce buffer and Python takes it there."""
    wire = _Wire()
    loop = FakeLoop()
    dev = VirtioNet(wire, bytes(6), loop)
    d = Driver(dev)
    try:
        d.setup(features=(1 << 64) - 1 & ~F_MRG_RXBUF, queue_size=32)
        first = d.alloc(64)
        d.submit(0, [(first, True)], head=0, kick=False)
        frame = bytes(10) + b"\1\0" + bytes(i & 0xFF for i in range(300))
        wire.host.send(frame)
        real = fastpath.net_rx
        _, avail, _ = d.rings(0)

        def guest_changes_its_mind(*args: object) -> fastpath.Received | None:
            got = real(*args)  # type: ignore[arg-type]
            # right after the C call, as a vCPU may: the chain taken back (avail idx), its
            # buffer scribbled over, and a chain of room enough posted in its place
            d.mem.write(first[0], b"\xee" * 64)
            d.mem.write(avail + 2, struct.pack("<H", 0))
            d.avail_idx[0] = 0
            d.submit(0, [(d.alloc(2048), True)], head=5, kick=False)
            return got

        monkeypatch.setattr(fastpath, "net_rx", guest_changes_its_mind)
        with compiled(True):
            loop.readers[dev.tap.fd]()
        used = d.used(0)
        assert used == [(5, len(frame))]  # the frame, whole, in the chain posted in its place
        (addr,) = struct.unpack_from("<Q", d.mem.read(d.rings(0)[0] + 16 * 5, 8))
        assert d.mem.read(addr, len(frame)) == frame
    finally:
        d.close()


def test_a_read_shorter_than_the_header_counts_no_negative_bytes():
    """A read of fewer bytes than the virtio-net header (no tap sends one; a socket does): C
    counted 2**64 - 7 received bytes where Python counted -7. Neither: it carries no payload."""
    results = []
    for on in (False, True):
        wire = _Wire()
        loop = FakeLoop()
        dev = VirtioNet(wire, bytes(6), loop)
        d = Driver(dev)
        try:
            d.setup(queue_size=32)
            d.submit(0, [(d.alloc(2048), True)], kick=False)
            wire.host.send(b"\1\2\3\4\5")
            with compiled(on):
                loop.readers[dev.tap.fd]()
            results.append((d.used(0), dev.stats))
        finally:
            d.close()
    assert results[0] == results[1]
    assert results[1][0] == [(0, 5)] and results[1][1]["rx_bytes"] == 0


def test_the_c_calls_refuse_unaligned_rings(ram):
    """queue.py refuses them when a queue is set up; the C module, which loads and stores ring
    indices whole (atomically), refuses them too rather than trust every caller."""
    regions = fastpath.regions(ram)
    for desc, avail, used in ((DESC + 8, AVAIL, USED), (DESC, AVAIL + 1, USED), (DESC, AVAIL, USED + 2)):
        with pytest.raises(ValueError, match="not aligned"):
            fastpath._ring.take(regions, desc, avail, used, 8, 0, False, 0, 0)
        with pytest.raises(ValueError, match="not aligned"):
            fastpath._ring.net_tx(regions, desc, avail, used, 8, 0, False, False, 0, 0, 8, -1)
