"""Diff snapshots below the API (corral/firecracker/snapshot.py, corral/state/snapshot.py): a
diff memory file holds exactly the dirty pages (a zero page too: it must overwrite the base),
rebase_memory layers it onto its base leaving the rest alone, and a failed write loses no dirty
page. tests/kvm/test_firecracker_api.py runs the whole thing on a real guest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.firecracker.snapshot import DirtyPages, SnapshotFileError, rebase_memory
from corral.memory import GuestMemory
from corral.state.snapshot import _write_memory

PAGE = 4096
MIB = 1 << 20


def data_ranges(path: Path) -> list[tuple[int, int]]:
    out, off, size = [], 0, path.stat().st_size
    with open(path, "rb") as f:
        while off < size:
            try:
                start = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    return out


def test_a_diff_memory_file_holds_exactly_the_dirty_pages(tmp_path):
    with GuestMemory(16 * MIB) as mem:
        mem.offset_view(0, PAGE)[:] = b"\x11" * PAGE  # written but not dirty: left out
        mem.offset_view(5 * PAGE, PAGE)[:] = b"\x55" * PAGE
        dirty = {5 * PAGE, 6 * PAGE, 7 * PAGE, 40 * PAGE}  # 6, 7 and 40 are zero pages now
        written = _write_memory(tmp_path / "diff.mem", mem, dirty)
    path = tmp_path / "diff.mem"
    assert written == 4 * PAGE and path.stat().st_size == 16 * MIB
    assert data_ranges(path) == [(5 * PAGE, 8 * PAGE), (40 * PAGE, 41 * PAGE)]
    raw = path.read_bytes()
    assert raw[5 * PAGE : 6 * PAGE] == b"\x55" * PAGE and raw[:PAGE] == bytes(PAGE)


def test_rebase_layers_the_diff_onto_its_base(tmp_path):
    base, diff = tmp_path / "base.mem", tmp_path / "diff.mem"
    base.write_bytes(b"B" * (64 * PAGE))
    with open(diff, "wb") as f:
        f.truncate(64 * PAGE)
        f.seek(3 * PAGE)
        f.write(b"D" * PAGE)
        f.seek(10 * PAGE)
        f.write(bytes(2 * PAGE))  # a page the guest zeroed: the base's copy must go
    assert rebase_memory(base, diff) == 3 * PAGE
    raw = base.read_bytes()
    assert raw[3 * PAGE : 4 * PAGE] == b"D" * PAGE
    assert raw[10 * PAGE : 12 * PAGE] == bytes(2 * PAGE)
    assert raw[: 3 * PAGE] == b"B" * (3 * PAGE) and raw[12 * PAGE :] == b"B" * (52 * PAGE)


def test_rebase_refuses_files_of_different_sizes(tmp_path):
    base, diff = tmp_path / "base.mem", tmp_path / "diff.mem"
    base.write_bytes(b"B" * PAGE)
    diff.write_bytes(b"D" * 2 * PAGE)
    with pytest.raises(SnapshotFileError, match="their sizes differ"):
        rebase_memory(base, diff)
    assert base.read_bytes() == b"B" * PAGE
    with pytest.raises(SnapshotFileError, match="cannot rebase"):
        rebase_memory(base, tmp_path / "none.mem")


class LoggingMachine:
    """The dirty-log verbs of a Machine: each read hands over what was dirtied since."""

    def __init__(self) -> None:
        self.memory = None
        self.started = False
        self.dirtied: set[int] = set()

    def start_dirty_log(self) -> None:
        self.started = True

    def read_dirty_log(self, *, with_vmm_writes: bool = False) -> set[int]:
        out, self.dirtied = self.dirtied, set()
        return out


def test_pages_of_a_snapshot_that_failed_go_into_the_next():
    machine = LoggingMachine()
    dirty = DirtyPages(machine)  # type: ignore[arg-type]
    assert machine.started
    machine.dirtied = {PAGE, 2 * PAGE}
    assert dirty.take() == {PAGE, 2 * PAGE}  # ... and the write fails: no commit()
    machine.dirtied = {9 * PAGE}
    assert dirty.take() == {PAGE, 2 * PAGE, 9 * PAGE}
    dirty.commit()
    machine.dirtied = {3 * PAGE}
    assert dirty.take() == {3 * PAGE}


def test_a_snapshot_file_nested_past_the_json_depth_is_one_line(tmp_path: Path) -> None:
    from corral.firecracker.snapshot import _read_bundle

    crafted = tmp_path / "vm.snap"
    crafted.write_text("[" * 200_000)
    with pytest.raises(SnapshotFileError, match="is not a snapshot written by corral firecracker"):
        _read_bundle(crafted)
