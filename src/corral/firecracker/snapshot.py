"""Firecracker's two snapshot files onto corral's snapshot directory, and back.

Firecracker writes the microVM state to `snapshot_path` and guest memory to `mem_file_path`;
corral writes a directory (manifest.json, state.json, memory.bin: corral.state.snapshot). The
mapping:

* create: corral's snapshot is written into a temporary directory beside `snapshot_path`; its
  memory.bin is renamed to `mem_file_path` (copied with its holes kept when that is on another
  file system); `snapshot_path` becomes one JSON file holding the text of manifest.json and
  state.json (byte for byte: the state's checksum still holds) and the Firecracker resources
  (drive and interface ids, machine-config), so a load can answer GET /vm/config and apply
  network_overrides by interface id. Both files are replaced whole, never left half-written.
* load: the directory is staged in a temporary place from `snapshot_path`, memory.bin being a
  symlink to the memory file given; corral checks it as any snapshot (format, version, CPU,
  state checksum, memory size) and maps RAM from that file privately and lazily.

Both files can be moved or copied together, as Firecracker's can.

Diff snapshots (Firecracker's semantics): with `track_dirty_pages` the machine logs the pages
the guest (KVM's dirty log) and the VMM (device writes) dirty; a Full snapshot resets the log, a
Diff one writes only the pages dirtied since the last snapshot into a sparse memory file of the
RAM's size (each dirty page is data, even a zero one; everything else a hole). A diff is loaded
layered on its base: `rebase_memory(base, diff)` copies the diff's data into the base memory
file (what Firecracker's rebase-snap does), then the diff's state file loads with that memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from corral._version import __version__
from corral.errors import CorralError
from corral.firecracker.models import FullVmConfiguration
from corral.machine import Machine
from corral.state.snapshot import MANIFEST, MEMORY, STATE, Snapshot, read_snapshot

FORMAT = "corral-firecracker-snapshot"
STATE_FILE_MAX = 64 << 20  # a state file larger than this is not ours
COPY_CHUNK = 4 << 20


class SnapshotFileError(CorralError):
    """Firecracker-style snapshot files that cannot be written or read."""


class DirtyPages:
    """The pages a machine dirtied since its last snapshot (track_dirty_pages)."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        machine.start_dirty_log()
        self._pending: set[int] = set()  # read from the log, not yet in a snapshot written

    def take(self) -> set[int]:
        """Backing offsets of the pages dirtied since the last commit(); call it paused."""
        self._pending |= self.machine.read_dirty_log(with_vmm_writes=True)
        if self.machine.memory is not None and self.machine.memory.vmm_dirty is not None:
            self.machine.memory.vmm_dirty = set()  # its pages are in _pending now
        return set(self._pending)

    def commit(self) -> None:
        """A snapshot holding every page take() gave was written: start afresh."""
        self._pending = set()


def create_snapshot_files(
    machine: Machine,
    state_path: Path,
    mem_path: Path,
    resources: FullVmConfiguration,
    dirty: DirtyPages | None,
    diff: bool,
) -> None:
    """A Full (or, with `diff`, a Diff) snapshot of `machine` into `state_path` + `mem_path`.
    The machine is paused for it (and resumed if it ran); a failed write loses no dirty page."""
    was_paused = machine.paused
    machine.pause()
    try:
        pages = dirty.take() if dirty is not None else None
        if diff:
            assert pages is not None
            write_snapshot_files(lambda d: machine.snapshot(d, pages=pages), state_path, mem_path, resources)
        else:
            write_snapshot_files(machine.snapshot, state_path, mem_path, resources)
        if dirty is not None:
            dirty.commit()
    finally:
        if not was_paused:
            machine.resume()


def rebase_memory(base: Path, diff: Path) -> int:
    """Layer a Diff snapshot's memory file onto its base's, in place (Firecracker's rebase-snap);
    returns the bytes copied. The base then holds the guest's RAM as of the diff."""
    try:
        with open(diff, "rb") as fi, open(base, "r+b") as fo:
            size = os.fstat(fi.fileno()).st_size
            if size != os.fstat(fo.fileno()).st_size:
                raise SnapshotFileError(
                    f"{diff} ({size} bytes) is not a diff of {base} "
                    f"({os.fstat(fo.fileno()).st_size} bytes): their sizes differ"
                )
            copied = _copy_data(fi, fo, size)
            os.fsync(fo.fileno())
            return copied
    except OSError as exc:
        raise SnapshotFileError(f"cannot rebase {base} on {diff}: {exc.strerror}") from None


def write_snapshot_files(
    take: Callable[[Path], object], state_path: Path, mem_path: Path, resources: FullVmConfiguration
) -> None:
    """Run `take(directory)` (a paused machine's corral snapshot) and turn the directory into
    `state_path` + `mem_path`."""
    for p in (state_path, mem_path):
        if not p.parent.is_dir():
            raise SnapshotFileError(
                f"Cannot perform open on the snapshot backing file: {p.parent} is not a directory"
            )
    work = Path(tempfile.mkdtemp(prefix=f".{state_path.name}.", dir=state_path.parent))
    try:
        snap = work / "snap"
        take(snap)
        bundle = {
            "format": FORMAT,
            "corral_version": __version__,
            "manifest": (snap / MANIFEST).read_text(),
            "state": (snap / STATE).read_text(),
            "firecracker": resources.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
        _move_sparse(snap / MEMORY, mem_path)
        tmp = work / "state"
        # 0600, as corral's own snapshot files: it holds the guest's registers
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(bundle))
        os.replace(tmp, state_path)
    except OSError as exc:
        raise SnapshotFileError(f"cannot write the snapshot: {exc.filename or ''}: {exc.strerror}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def staged_snapshot(state_path: Path, mem_path: Path) -> Iterator[tuple[Snapshot, FullVmConfiguration]]:
    """The corral snapshot (checked) and the Firecracker resources that `state_path` and
    `mem_path` hold; the staged directory exists while the block runs (build the machine there)."""
    bundle = _read_bundle(state_path)
    try:
        resources = FullVmConfiguration.model_validate_json(json.dumps(bundle.get("firecracker", {})))
    except ValidationError as exc:
        raise SnapshotFileError(
            f"{state_path}: its microVM resources are damaged ({exc.errors()[0]['msg']})"
        ) from None
    if not mem_path.is_file():
        raise SnapshotFileError(f"the memory file {mem_path} does not exist")
    work = Path(tempfile.mkdtemp(prefix="corral-fc-load."))
    try:
        (work / MANIFEST).write_text(bundle["manifest"])
        (work / STATE).write_text(bundle["state"])
        yield read_snapshot(work, memory_file=mem_path.resolve()), resources
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read_bundle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(STATE_FILE_MAX + 1)
    except OSError as exc:
        raise SnapshotFileError(f"cannot open the snapshot file {path}: {exc.strerror}") from None
    if len(raw) > STATE_FILE_MAX:
        raise SnapshotFileError(f"{path} is larger than a corral snapshot file can be")
    try:
        bundle = json.loads(raw)
    except (ValueError, RecursionError):  # JSON nested past the parser's depth too
        bundle = None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise SnapshotFileError(f"{path} is not a snapshot written by corral firecracker")
    if not isinstance(bundle.get("manifest"), str) or not isinstance(bundle.get("state"), str):
        raise SnapshotFileError(f"{path} is damaged: it lacks the machine's manifest or state")
    return bundle


def _move_sparse(src: Path, dest: Path) -> None:
    """Rename `src` to `dest`; across file systems, copy it keeping its holes."""
    try:
        os.replace(src, dest)
        return
    except OSError as exc:
        if exc.errno != 18:  # EXDEV
            raise
    size = src.stat().st_size
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        fo.truncate(size)
        _copy_data(fi, fo, size)
    os.replace(tmp, dest)
    src.unlink()


def _copy_data(fi: BinaryIO, fo: BinaryIO, size: int) -> int:
    """Copy the data ranges of `fi` (not its holes) to the same offsets of `fo`."""
    off = copied = 0
    while off < size:
        try:
            data_at = os.lseek(fi.fileno(), off, os.SEEK_DATA)
        except OSError:
            break  # only holes remain
        hole_at = min(os.lseek(fi.fileno(), data_at, os.SEEK_HOLE), size)
        fi.seek(data_at)
        fo.seek(data_at)
        left = hole_at - data_at
        while left:
            chunk = fi.read(min(left, COPY_CHUNK))
            if not chunk:
                break
            fo.write(chunk)
            left -= len(chunk)
            copied += len(chunk)
        off = hole_at
    return copied


__all__ = [
    "FORMAT",
    "DirtyPages",
    "SnapshotFileError",
    "create_snapshot_files",
    "rebase_memory",
    "staged_snapshot",
    "write_snapshot_files",
]
