"""The probe's EVENT_IDX drivers (`blk-evidx`, `net-evidx`) against corral's virtio-blk (on the
compiled virtqueue path and on the Python one) and virtio-net transmit queue on /dev/kvm, and
under QEMU's virtio-blk, the reference.

With VIRTIO_F_EVENT_IDX the driver kicks only when its new avail index passes the avail event
the device published, and never otherwise. Each side must fence between publishing its index
and reading the other's: a device that reads the avail index before its own avail-event store
is visible (x86 lets the load pass the store) may go to sleep while the driver, reading the
stale event, decides not to kick, and the queue stalls for good. The probe reports that as
`RESULT error=stall` after 2 s without a completion, so a missing barrier (`GuestMemory.fence`,
`fence()` in _fastring.c) fails here in seconds, not as a hang.

The race's window is a store's trip out of the device thread's store buffer, so the run is set
up to hit it: the vCPU and the device loop are pinned to different CPUs (both must run at once;
on a loaded host they would often share one), 8 requests are in flight, and the probe publishes
its refills one at a time, a random 0-6 µs apart, so publishes land while the device ends a
pass. Measured on the 2-CPU development host (2026-11-30, other work running): with the
compiled path's fence() emptied, the block and transmit tests here failed in every run (11 of
11 and 5 of 5, most within their first 25,000 requests), and the probe's `recover` mode counted
4-16 stalls per 200,000 reads (5 runs); with the fence, none in 1,000,000. Without pinning the
rate fell to about one per 100,000-200,000. Without `GuestMemory.fence` the Python path never
stalled (1,200,000 reads): the interpreter runs so long between the store and the load that
the store is out first; the fence is there because nothing promises that.

Every read is one sector of a patterned disk (its number and CORRALDISK at its start): the
guest checks each and sums the sector numbers, and the sum is checked here against the same
random sequence, so a request lost, repeated or answered from the wrong sector fails too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from support.disks import patterned_image
from support.net import fresh_tap, rx_packets
from support.probe import run_probe
from support.qemu_probe import run_qemu_probe

from corral.config import DiskConfig, NetConfig
from corral.devices.virtio import fastpath

SECTORS = 8192
COUNT = 200_000
DEPTH = 8
SPREAD_NS = 6000  # refills published one at a time, up to this far apart
SEED = 0x9E3779B97F4A7C15  # the probe's xorshift64 seed (virtio.c, rng_state)


def expected_sum(count: int, sectors: int) -> int:
    """The sum of the sectors blk-evidx reads: its xorshift64 sequence modulo the capacity."""
    x, total, mask = SEED, 0, (1 << 64) - 1
    for _ in range(count):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        total += x % sectors
    return total & mask


@contextmanager
def _vcpu_apart_from_device_loop() -> Iterator[set[str]]:
    """Pin the next machine's vCPU 0 and its device loop to two different CPUs; yields the
    names of the threads pinned so far."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    where = dict(zip(("vcpu0", "corral-devices"), cpus, strict=False))
    pinned: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        done: set[int] = set()
        while not stop.is_set():
            for t in threading.enumerate():
                cpu = where.get(t.name)
                if cpu is not None and t.native_id is not None and t.native_id not in done:
                    with suppress(OSError):  # it ended meanwhile
                        os.sched_setaffinity(t.native_id, {cpu})
                        done.add(t.native_id)
                        pinned.add(t.name)
            stop.wait(0.002)

    watcher = threading.Thread(target=watch, name="pin-watch", daemon=True)
    watcher.start()
    try:
        yield pinned
    finally:
        stop.set()
        watcher.join()


def _check(results: dict[str, str], output: str, count: int) -> None:
    tail = "\n".join(output.splitlines()[-8:])
    assert "error" not in results, f"the probe failed ({results['error']}):\n{tail}"
    assert results["evidx_ops"] == str(count), tail
    assert (results["evidx_bad"], results["evidx_stalls"]) == ("0", "0"), tail
    assert int(results["evidx_bytes"]) == count * 512
    assert int(results["evidx_sum"]) == expected_sum(count, SECTORS)
    # the device asked for kicks, and fewer than one per request: suppression happened
    assert 0 < int(results["evidx_kicks"]) < count, results


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_event_idx_driver_never_stalls(path: str, tmp_path: Path, monkeypatch) -> None:
    if path == "python":
        # what CORRAL_NO_FASTPATH=1 does at import: every queue on queue.py's reference path
        monkeypatch.setattr(fastpath, "ENABLED", False)
    else:
        assert fastpath.ENABLED, f"the compiled path should run here: {fastpath.describe()}"
    disk = patterned_image(tmp_path / "disk.img", SECTORS)
    with _vcpu_apart_from_device_loop() as pinned:
        run = run_probe(
            f"blk-evidx {COUNT} {DEPTH} {SPREAD_NS}",
            timeout=90,
            disks=[DiskConfig(path=disk, read_only=True)],
        )
    assert run.status == 0, run.output[-2000:]
    _check(run.results, run.output, COUNT)
    if len(os.sched_getaffinity(0)) > 1:
        assert pinned == {"vcpu0", "corral-devices"}, "the threads were renamed: pin them again"


def test_event_idx_transmit_never_stalls() -> None:
    """The same run on virtio-net's transmit queue, through the compiled transmit drain (the
    Python path serves it with `serve`, which the block test above already drives): every
    frame reaches the tap."""
    assert fastpath.ENABLED, f"the compiled path should run here: {fastpath.describe()}"
    with fresh_tap("cev") as tap:
        with _vcpu_apart_from_device_loop():
            run = run_probe(f"net-evidx {COUNT} {DEPTH} {SPREAD_NS}", timeout=90, nets=[NetConfig(tap=tap)])
        frames = rx_packets(tap)
    tail = "\n".join(run.output.splitlines()[-8:])
    assert run.status == 0, tail
    assert (run.results["evidx_ops"], run.results["evidx_bad"]) == (str(COUNT), "0"), tail
    assert 0 < int(run.results["evidx_kicks"]) < COUNT, run.results
    assert frames == COUNT


def test_qemu_runs_the_same_event_idx_driver(tmp_path: Path) -> None:
    """QEMU's virtio-blk, with its own barriers, serves the same driver: the driver's side of
    the protocol (need_event, its mfence) is the spec's, not fitted to corral."""
    disk = patterned_image(tmp_path / "disk.img", SECTORS)
    count = 20_000
    run = run_qemu_probe(
        f"blk-evidx {count} {DEPTH} {SPREAD_NS}",
        accel="kvm",
        extra=[
            "-drive",
            f"if=none,id=d0,file={disk},format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=d0,disable-legacy=on",
        ],
        timeout=90,
    )
    assert run.status == 0, run.output[-2000:]
    _check(run.results, run.output, count)
