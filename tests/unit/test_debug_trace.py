"""Exit traces without a guest: records written by per-vCPU buffers come back in order, full
buffers beyond the queue or the size limit are dropped and counted (never held without bound),
and a hostile trace file is one clear error, never a crash or an unbounded read."""

from __future__ import annotations

import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.debug import trace as T
from corral.debug.trace import HEADER, MAGIC, RECORD, TraceError, TraceWriter, records, sparkline, summarize
from corral.kvm import constants as K
from corral.vstate.exits import FLAG_WRITE, ExitObserver

DEVICES = {"pio": [[0x3F8, 8, "com1"], [0x504, 1, "bench-sink"]], "mmio": [[0xD0000000, 0x1000, "bench"]]}


def test_records_round_trip_with_devices_named(tmp_path):
    path = tmp_path / "t"
    w = TraceWriter(path, DEVICES)
    v0, v1 = w.for_vcpu(0), w.for_vcpu(1)
    assert w.for_vcpu(0) is v0
    n = T.BUFFER_RECORDS + 10  # one full buffer handed over, the rest flushed at close
    for i in range(n):
        v0.record(w.t0 + i, 0, K.EXIT_IO, 0x504, 1, FLAG_WRITE, 100)
    v1.record(w.t0 + 5, 1, K.EXIT_MMIO, 0xD0000010, 4, 0, 2**40)  # duration saturates
    v1.record(w.t0 + 6, 1, K.EXIT_IO, 0x3FD, 1, 0, 50)
    w.close()
    recs = list(records(path))
    assert len(recs) == n + 2 and w.records == n + 2 and w.dropped == 0
    assert [r[0] for r in recs if r[2] == 0] == list(range(n))
    assert (5, 2**32 - 1, 1, K.EXIT_MMIO, 0xD0000010, 4, 0) in recs
    s = summarize(path)
    assert s.by_device["bench-sink (pio)"] == [n, 100 * n]
    assert s.by_device["bench (mmio)"][0] == 1 and s.by_device["com1 (pio)"][0] == 1
    assert s.by_reason["IO"][0] == n + 1 and s.vcpus == {0, 1}
    assert sum(s.timeline) == n + 2
    assert (path.stat().st_mode & 0o777) == 0o600


def test_a_slow_disk_drops_and_counts_never_queues_without_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "QUEUE_DEPTH", 2)
    gate = threading.Event()
    real_write = T.os.write

    def slow_write(fd: int, data: bytes) -> int:
        gate.wait(10)
        return real_write(fd, data)

    w = TraceWriter(tmp_path / "t", DEVICES)
    monkeypatch.setattr(T.os, "write", slow_write)
    v = w.for_vcpu(0)
    total = T.BUFFER_RECORDS * 10
    for i in range(total):
        v.record(w.t0 + i, 0, K.EXIT_IO, 0x504, 1, 1, 1)
    assert w._queue.qsize() <= 2  # held back: at most the queue's depth of buffers
    gate.set()
    w.close()
    assert w.dropped > 0 and w.records + w.dropped == total
    assert len(list(records(tmp_path / "t"))) == w.records
    assert summarize(tmp_path / "t").dropped == w.dropped  # the header says so


def test_the_size_limit_bounds_the_file(tmp_path):
    w = TraceWriter(tmp_path / "t", DEVICES, max_bytes=3 * T.BUFFER_RECORDS * RECORD.size)
    v = w.for_vcpu(0)
    for i in range(T.BUFFER_RECORDS * 6):
        v.record(w.t0 + i, 0, K.EXIT_HLT, 0, 0, 0, 1)
    w.close()
    assert (tmp_path / "t").stat().st_size <= 3 * T.BUFFER_RECORDS * RECORD.size
    assert w.dropped >= T.BUFFER_RECORDS * 3


def test_an_existing_file_is_refused(tmp_path):
    (tmp_path / "t").write_bytes(b"x")
    with pytest.raises(TraceError, match="exists"):
        TraceWriter(tmp_path / "t", DEVICES)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a corral trace"),
        (b"ELF\0" * 10, "not a corral trace"),
        (HEADER.pack(MAGIC, 9, RECORD.size, 0, 0), "version 9"),
        (HEADER.pack(MAGIC, 1, RECORD.size, 1 << 30, 0), "metadata"),
        (HEADER.pack(MAGIC, 1, RECORD.size, 3, 0) + b"{{{", "not valid JSON"),
        (HEADER.pack(MAGIC, 1, RECORD.size, 2, 0) + b"[]", "not valid JSON"),
    ],
)
def test_a_bad_trace_is_one_clear_error(tmp_path, data, message):
    (tmp_path / "t").write_bytes(data)
    with pytest.raises(TraceError, match=message):
        summarize(tmp_path / "t")


def test_a_directory_or_fifo_is_not_read(tmp_path):
    with pytest.raises(TraceError):
        summarize(tmp_path)
    import os

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TraceError, match="not a regular file"):
        summarize(tmp_path / "fifo")


@settings(max_examples=60, deadline=None)
@given(meta=st.binary(max_size=200), tail=st.binary(max_size=200))
def test_any_metadata_and_records_summarize_or_fail_cleanly(tmp_path_factory, meta, tail):
    path = tmp_path_factory.mktemp("h") / "t"
    path.write_bytes(HEADER.pack(MAGIC, 1, RECORD.size, len(meta), 0) + meta + tail)
    try:
        s = summarize(path)
    except TraceError:
        return
    assert s.records == len(tail) // RECORD.size  # a torn last record is left out


def test_devices_from_a_hostile_header_are_bounded(tmp_path):
    rows = [[i, 1, "x" * 100] for i in range(6000)] + [["bad"], [1, "2", 3]]
    meta = ('{"devices": {"pio": ' + __import__("json").dumps(rows) + "}}").encode()
    rec = RECORD.pack(1, 1, 0, K.EXIT_IO, 3, 1, 0)
    (tmp_path / "t").write_bytes(HEADER.pack(MAGIC, 1, RECORD.size, len(meta), 0) + meta + rec)
    s = summarize(tmp_path / "t")
    (name,) = s.by_device
    assert name.startswith("x" * 64 + " ") and len(name) < 80


def test_sparkline():
    assert sparkline([0, 0]) == "  "
    assert sparkline([0, 1, 8]) == " ▁█"
    assert len(sparkline([5] * 60)) == 60


def test_observer_counts_and_snapshots():
    o = ExitObserver()
    o.count(o.pio, 0x504, 10)
    o.count(o.pio, 0x504, 30)
    by_reason, pio, mmio, run_ns = o.snapshot()
    assert pio == {0x504: [2, 40]} and by_reason == {} and mmio == {} and run_ns == 0
    pio[0x504][0] = 99
    assert o.pio[0x504][0] == 2  # a copy


def test_record_layout_is_compact():
    assert RECORD.size == 28
    assert struct.calcsize("<QIHHQHH") == RECORD.size
