"""Snapshots on disk: a directory with a manifest, the machine state and a sparse memory file.

    DIR/manifest.json   format, version, corral version, host CPU, machine config, checksums
    DIR/state.json      MachineState (vCPUs, irqchip, PIT, clock, devices)
    DIR/memory.bin      guest RAM at memfd offsets; all-zero chunks are holes (sparse)

A snapshot is written into a temporary directory beside DIR and renamed into place, so DIR
either holds a whole snapshot or does not exist. Loading checks everything it can without
reading RAM (format, version, CPU, state checksum, memory file size), so a bad snapshot is
refused before any VM is built; RAM is then mapped, not read, which keeps restore time flat.

A snapshot holds the guest's RAM, so the directory is 0700 and its files 0600, whatever the
umask. Loading takes nothing on trust from the directory: each file is opened without
following a symlink (a memory.bin linked to a host file would become guest RAM) and must be a
regular file (a FIFO would hang the open: every open is O_NONBLOCK), of bounded size for the
JSON files and of exactly the RAM size for memory.bin.

A restored VM maps memory.bin (private: the guest's writes never reach the file), holds it
open and checks its size once more before the guest starts. Truncating it while the VM runs
is a host operator's action that corral does not survive: pages past the new end are gone, so
the VMM dies with SIGBUS when it touches one (a vCPU's KVM_RUN fails). Leave a snapshot alone
while VMs restored from it run, or restore from a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral._version import __version__
from corral.config import MachineConfig
from corral.files import Refused, open_checked
from corral.lazymodel import BaseModel, ConfigDict
from corral.memory import GuestMemory
from corral.state.model import CpuModel, MachineState, SnapshotError

FORMAT = "corral-snapshot"
FORMAT_VERSION = 2  # 2: every state record named (the one state contract)
MANIFEST, STATE, MEMORY = "manifest.json", "state.json", "memory.bin"
PAGE = 4096
MANIFEST_LIMIT = 1 << 20  # bytes: a config and a CPU model
STATE_LIMIT = 64 << 20  # bytes: vCPU, irqchip and device state (a few KiB per vCPU)


class Manifest(BaseModel):
    model_config = ConfigDict(defer_build=True)  # validators built on first use, not at launch

    format: str
    format_version: int
    corral_version: str
    created: float
    cpu: CpuModel
    config: MachineConfig
    memory_size: int
    state_sha256: str


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: Manifest
    state: MachineState
    memory_file: Path  # the snapshot's memory.bin, or the file the operator named instead


class SnapshotStats(BaseModel):
    """What writing a snapshot did (the reply of the snapshot verb)."""

    model_config = ConfigDict(defer_build=True)

    path: Path
    seconds: float
    memory_bytes_written: int  # RAM that was not zero
    disk_bytes: int  # what the directory takes on disk (sparse)


def write_snapshot(
    path: str | os.PathLike[str],
    config: MachineConfig,
    cpu: CpuModel,
    state: MachineState,
    memory: GuestMemory,
    *,
    pages: Collection[int] | None = None,
) -> SnapshotStats:
    """Write a snapshot of a paused machine to `path`, which must not exist yet. With `pages`
    (backing offsets) only those pages of RAM are written, each as data: a diff snapshot."""
    dest = Path(path)
    if dest.exists():
        raise SnapshotError(f"{dest} already exists: give a new directory for the snapshot")
    if not dest.parent.is_dir():
        raise SnapshotError(f"{dest.parent} is not a directory: create it first")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))  # 0700
    try:
        written = _write_memory(tmp / MEMORY, memory, pages)
        state_json = state.model_dump_json().encode()
        _write_file(tmp / STATE, state_json)
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            corral_version=__version__,
            created=time.time(),
            cpu=cpu,
            config=config,
            memory_size=memory.size,
            state_sha256=hashlib.sha256(state_json).hexdigest(),
        )
        _write_file(tmp / MANIFEST, (manifest.model_dump_json(indent=2) + "\n").encode())
        _fsync_dir(tmp)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise SnapshotError(f"cannot write snapshot {dest}: {exc.strerror}") from exc
        raise
    disk = sum(os.stat(dest / n).st_blocks * 512 for n in (MEMORY, STATE, MANIFEST))
    return SnapshotStats(
        path=dest, seconds=time.perf_counter() - t0, memory_bytes_written=written, disk_bytes=disk
    )


def _create(path: Path) -> int:
    """A new file only its owner can read (0600 whatever the umask: the umask only narrows)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _write_file(path: Path, data: bytes) -> None:
    fd = _create(path)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_memory(path: Path, memory: GuestMemory, pages: Collection[int] | None = None) -> int:
    written = 0
    fd = _create(path)
    try:
        os.ftruncate(fd, memory.size)  # holes where nothing is written
        for off, data in memory.populated() if pages is None else _page_runs(memory, pages):
            os.pwrite(fd, data, off)
            written += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def _page_runs(
    memory: GuestMemory, pages: Collection[int], most: int = 256
) -> Iterator[tuple[int, memoryview]]:
    """(offset, data) for runs of consecutive pages (at most `most` pages each)."""
    run_start = run_end = -1
    for off in sorted(pages):
        if off == run_end and run_end - run_start < most * PAGE:
            run_end += PAGE
            continue
        if run_start >= 0:
            yield run_start, memory.offset_view(run_start, run_end - run_start)
        run_start, run_end = off, off + PAGE
    if run_start >= 0:
        yield run_start, memory.offset_view(run_start, run_end - run_start)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_snapshot(
    path: str | os.PathLike[str], host_cpu: CpuModel | None = None, memory_file: Path | None = None
) -> Snapshot:
    """Load and check a snapshot's manifest and state (RAM stays on disk). `memory_file` is a
    guest RAM file the operator names in place of the snapshot's own memory.bin (Firecracker's
    mem_backend); it is checked the same way."""
    src = Path(path)
    if not src.is_dir():
        raise SnapshotError(f"{src} is not a snapshot directory (it does not exist)")
    try:
        raw = json.loads(_read_member(src, MANIFEST, MANIFEST_LIMIT))
    except (ValueError, RecursionError) as exc:  # (nesting deeper than the parser goes)
        raise SnapshotError(f"{src / MANIFEST} is unreadable ({exc}): the snapshot is damaged") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SnapshotError(f"{src} is not a corral snapshot (manifest format is not '{FORMAT}')")
    if raw.get("format_version") != FORMAT_VERSION or raw.get("corral_version") != __version__:
        raise SnapshotError(
            f"{src} was written by corral {raw.get('corral_version')} (snapshot format "
            f"{raw.get('format_version')}); this is corral {__version__} (format "
            f"{FORMAT_VERSION}): restore it with the corral that wrote it"
        )
    from pydantic import ValidationError  # (loading a snapshot: pydantic is needed now anyway)

    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise SnapshotError(
            f"{src / MANIFEST} is damaged: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None
    if host_cpu is not None and host_cpu != manifest.cpu:
        raise SnapshotError(
            f"{src} was taken on a {manifest.cpu.describe()}; this host has a "
            f"{host_cpu.describe()}: the guest would see its CPU change"
        )
    state_json = _read_member(src, STATE, STATE_LIMIT)
    if hashlib.sha256(state_json).hexdigest() != manifest.state_sha256:
        raise SnapshotError(f"{src / STATE} does not match its checksum: the snapshot is damaged")
    memory = memory_file if memory_file is not None else src / MEMORY
    fd = _open_member(memory.parent, memory.name)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size != manifest.memory_size:
        raise SnapshotError(
            f"{memory} is {size} bytes, not {manifest.memory_size}: the snapshot is truncated"
        )
    try:
        state = MachineState.model_validate_json(state_json)
    except ValidationError as exc:
        raise SnapshotError(
            f"{src / STATE} is damaged: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None
    if len(state.vcpus) != manifest.config.cpus:
        raise SnapshotError(f"{src}: state has {len(state.vcpus)} vCPUs, config {manifest.config.cpus}")
    return Snapshot(src, manifest, state, memory)


def _open_member(src: Path, name: str) -> int:
    """One of a snapshot's files, read-only: its own regular file, never a symlink to another."""
    try:
        return open_checked(src / name)
    except Refused as exc:
        if exc.kind == "missing":
            raise SnapshotError(
                f"{src} has no {name}: it is not a corral snapshot, or it is incomplete"
            ) from None
        hint = {
            "symlink": "a snapshot's files must be its own (copy the file in)",
            "kind": "the snapshot is damaged",
        }.get(exc.kind, "the snapshot is unreadable")
        raise SnapshotError(f"{exc}: {hint}") from None


def _read_member(src: Path, name: str, limit: int) -> bytes:
    """A snapshot's JSON file, refused past `limit` bytes before any of it is read."""
    fd = _open_member(src, name)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise SnapshotError(f"{src / name} is {size} bytes, more than {limit}: the snapshot is damaged")
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise SnapshotError(f"{src / name} is unreadable: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while read
        raise SnapshotError(f"{src / name} is more than {limit} bytes: the snapshot is damaged")
    return data
