"""Exit traces: every vCPU exit as a compact binary record (`corral run --trace FILE`), and the
reader behind `corral trace show FILE` (a table by reason, address and device; exits over time
as a text sparkline, or a PNG when matplotlib is installed).

Writing: each vCPU fills its own buffer (no lock on the exit path) and hands full buffers to one
writer thread through a bounded queue; at close the rest is flushed. When the disk cannot keep
up (the queue is full) or the file reached its size limit, records are dropped and counted in
the header, never queued without bound. The file is created 0600, O_EXCL | O_NOFOLLOW.

Format (little-endian): a 24-byte header (magic, version, record size, length of a JSON block,
dropped records), the JSON block (the start time and the buses' device map, so the reader names
devices), then records of RECORD: t_ns since the start, duration_ns (VMM handling, saturated at
2^32-1), vcpu, reason (KVM_EXIT_*), port or guest-physical address, length, flags (bit 0: write).
A trace file is input like any other: the reader checks the header and bounds what it keeps.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter_ns, time_ns
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError
from corral.files import Refused, create_new, open_checked
from corral.kvm import constants as K

if TYPE_CHECKING:
    from corral.devices.bus import Mapping
    from corral.machine import Machine

MAGIC = b"CRLTRACE"
VERSION = 1
HEADER = struct.Struct("<8sHHIQ")  # magic, version, record size, JSON length, dropped records
DROPPED_AT = 16
RECORD = struct.Struct("<QIHHQHH")  # t_ns, duration_ns, vcpu, reason, addr, length, flags
BUFFER_RECORDS = 4096  # records a vCPU gathers before handing them to the writer
QUEUE_DEPTH = 64  # full buffers waiting for the disk (bounds the memory a trace holds)
MAX_BYTES = 1 << 30  # a trace stops growing here (records beyond are counted as dropped)
JSON_MAX = 1 << 20
KEYS_MAX = 65536  # distinct addresses a reader keeps apart; the rest are "other"
U32 = (1 << 32) - 1


class TraceError(CorralError):
    """A trace cannot be written or read (the file exists, is not a corral trace, ...)."""


def _device_map(machine: Machine) -> dict[str, list[list[Any]]]:
    board = machine.board
    if board is None:
        return {"pio": [], "mmio": []}

    def rows(maps: list[Mapping]) -> list[list[Any]]:
        return [[m.base, m.size, m.name or type(m.device).__name__] for m in maps]

    return {"pio": rows(list(board.pio.mappings)), "mmio": rows(list(board.mmio.mappings))}


class VcpuTrace:
    """One vCPU's recorder (corral.vstate.exits.ExitRecorder): used by that vCPU's thread only."""

    def __init__(self, writer: TraceWriter, index: int) -> None:
        self._writer = writer
        self._buf = bytearray(BUFFER_RECORDS * RECORD.size)
        self._n = 0
        self._pack = RECORD.pack_into
        self._t0 = writer.t0

    def record(
        self, t_ns: int, vcpu: int, reason: int, addr: int, length: int, flags: int, duration_ns: int
    ) -> None:
        self._pack(
            self._buf,
            self._n * RECORD.size,
            t_ns - self._t0,
            duration_ns if duration_ns < U32 else U32,
            vcpu,
            reason & 0xFFFF,
            addr,
            length & 0xFFFF,
            flags,
        )
        self._n += 1
        if self._n == BUFFER_RECORDS:
            self.flush()

    def flush(self) -> None:
        if self._n:
            self._writer.submit(bytes(self._buf[: self._n * RECORD.size]), self._n)
            self._n = 0


class TraceWriter:
    """A trace file being written; `for_vcpu(i)` is the recorder for vCPU i (Machine.trace_exits)."""

    def __init__(
        self, path: str | os.PathLike[str], devices: dict[str, Any], max_bytes: int = MAX_BYTES
    ) -> None:
        self.path = str(path)
        try:
            self._fd = create_new(self.path, "trace")
        except Refused as exc:
            raise TraceError(str(exc)) from None
        self.t0 = perf_counter_ns()
        meta = json.dumps({"start_unix_ns": time_ns(), "devices": devices}).encode()
        os.write(self._fd, HEADER.pack(MAGIC, VERSION, RECORD.size, len(meta), 0) + meta)
        self._size = HEADER.size + len(meta)
        self._max = max_bytes
        self.dropped = 0
        self.records = 0
        self._lock = threading.Lock()  # dropped/records: bumped by several vCPU threads
        self._queue: queue.Queue[tuple[bytes, int] | None] = queue.Queue(QUEUE_DEPTH)
        self._vcpus: dict[int, VcpuTrace] = {}
        self._error: str | None = None
        self._thread = threading.Thread(target=self._drain, name="trace-writer", daemon=True)
        self._thread.start()

    @classmethod
    def for_machine(cls, machine: Machine, path: str | os.PathLike[str]) -> TraceWriter:
        """A trace of `machine`'s exits at `path`, attached to it (tracing starts now)."""
        writer = cls(path, _device_map(machine))
        machine.trace_exits(writer.for_vcpu)
        return writer

    def for_vcpu(self, index: int) -> VcpuTrace:
        t = self._vcpus.get(index)
        if t is None:
            t = self._vcpus[index] = VcpuTrace(self, index)
        return t

    def submit(self, data: bytes, n: int) -> None:
        try:
            self._queue.put_nowait((data, n))
        except queue.Full:
            with self._lock:
                self.dropped += n

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            data, n = item
            if self._error is not None or self._size + len(data) > self._max:
                with self._lock:
                    self.dropped += n
                continue
            try:
                os.write(self._fd, data)
            except OSError as exc:
                self._error = exc.strerror or str(exc)
                with self._lock:
                    self.dropped += n
                continue
            self._size += len(data)
            with self._lock:
                self.records += n

    def close(self) -> None:
        """Flush every vCPU's buffer (their threads must have stopped), finish the file."""
        if self._thread.is_alive():
            for t in self._vcpus.values():
                t.flush()
            self._queue.put(None)
            self._thread.join()
            try:
                os.pwrite(self._fd, struct.pack("<Q", self.dropped), DROPPED_AT)
            finally:
                os.close(self._fd)


# -- reading ------------------------------------------------------------------------------------


@dataclass
class Summary:
    """What `corral trace show` prints: [count, ns] by reason, by address, by device, and the
    exits per time bucket."""

    records: int = 0
    dropped: int = 0
    span_ns: int = 0
    vcpus: set[int] = field(default_factory=set)
    by_reason: dict[str, list[int]] = field(default_factory=dict)
    by_address: dict[str, list[int]] = field(default_factory=dict)
    by_device: dict[str, list[int]] = field(default_factory=dict)
    timeline: list[int] = field(default_factory=list)
    bucket_ns: int = 0


def read_header(f: Any, path: str) -> tuple[int, dict[str, Any]]:
    raw = f.read(HEADER.size)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise TraceError(f"{path} is not a corral trace (corral run --trace writes them)")
    _, version, rsize, jlen, dropped = HEADER.unpack(raw)
    if version != VERSION or rsize != RECORD.size:
        raise TraceError(
            f"{path} is a corral trace of version {version}; this corral reads version {VERSION}"
        )
    if jlen > JSON_MAX:
        raise TraceError(f"{path}: its header claims {jlen} bytes of metadata (at most {JSON_MAX})")
    try:
        meta = json.loads(f.read(jlen))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError:
        raise TraceError(f"{path}: its header's metadata is not valid JSON") from None
    return dropped, meta


def records(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """Every record of the trace at `path`, in file order (vCPUs' buffers interleave)."""
    with _open(path) as f:
        read_header(f, str(path))
        chunk = RECORD.size * 8192
        while data := f.read(chunk):
            whole = len(data) - len(data) % RECORD.size  # a torn last record is left out
            yield from RECORD.iter_unpack(data[:whole])


def _open(path: str | os.PathLike[str]) -> Any:
    try:
        return os.fdopen(open_checked(path), "rb")
    except Refused as exc:
        raise TraceError(f"cannot open the trace: {exc}") from None


def _devices(meta: dict[str, Any]) -> dict[str, list[tuple[int, int, str]]]:
    out: dict[str, list[tuple[int, int, str]]] = {"pio": [], "mmio": []}
    devs = meta.get("devices")
    if isinstance(devs, dict):
        for space in out:
            for row in devs.get(space, [])[:4096] if isinstance(devs.get(space), list) else []:
                if isinstance(row, list) and len(row) == 3 and all(isinstance(x, int) for x in row[:2]):
                    out[space].append((row[0], row[1], str(row[2])[:64]))
    return out


def summarize(path: str | os.PathLike[str], buckets: int = 60) -> Summary:
    """Read the trace at `path` into a Summary (two passes: the time span, then the counts)."""
    with _open(path) as f:
        dropped, meta = read_header(f, str(path))
    devices = _devices(meta)
    s = Summary(dropped=dropped)
    span = 0
    for rec in records(path):
        span = max(span, rec[0])
    s.span_ns = span
    s.bucket_ns = max(1, span // buckets + 1)
    s.timeline = [0] * buckets
    cache: dict[tuple[int, int], str] = {}

    def bump(table: dict[str, list[int]], key: str, ns: int) -> None:
        e = table.get(key)
        if e is None:
            if len(table) >= KEYS_MAX:
                key = "other"
                e = table.get(key)
            if e is None:
                e = table[key] = [0, 0]
        e[0] += 1
        e[1] += ns

    for t, dur, vcpu, reason, addr, _length, _flags in records(path):
        s.records += 1
        s.vcpus.add(vcpu) if len(s.vcpus) < 1024 else None
        s.timeline[min(t // s.bucket_ns, buckets - 1)] += 1
        name = K.EXIT_NAMES.get(reason, str(reason))
        bump(s.by_reason, name, dur)
        if reason in (K.EXIT_IO, K.EXIT_MMIO):
            space = "pio" if reason == K.EXIT_IO else "mmio"
            bump(s.by_address, f"{space} {addr:#x}", dur)
            dev = cache.get((reason, addr))
            if dev is None:
                dev = next((n for b, sz, n in devices[space] if b <= addr < b + sz), "unassigned")
                if len(cache) < KEYS_MAX:
                    cache[(reason, addr)] = dev
            bump(s.by_device, f"{dev} ({space})", dur)
    return s


SPARKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[int]) -> str:
    top = max(values, default=0)
    if top == 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[(v * (len(SPARKS) - 1) + top - 1) // top] for v in values)


def plot_png(s: Summary, out: str | os.PathLike[str]) -> None:
    """Exits over time as a PNG (needs matplotlib: `pip install corral[plot]`)."""
    try:  # an optional dependency, found at run time (mypy need not know it)
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise TraceError(
            "matplotlib is not installed (pip install 'corral[plot]'): the sparkline shows the same"
        ) from None
    xs = [i * s.bucket_ns / 1e9 for i in range(len(s.timeline))]
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.bar(xs, s.timeline, width=s.bucket_ns / 1e9, align="edge")
    ax.set_xlabel("seconds since the trace started")
    ax.set_ylabel("exits")
    fig.tight_layout()
    fig.savefig(Path(out))
    plt.close(fig)


__all__ = [
    "RECORD",
    "Summary",
    "TraceError",
    "TraceWriter",
    "VcpuTrace",
    "plot_png",
    "records",
    "sparkline",
    "summarize",
]
