"""Restores into a VM made before the restore was asked for (machine.WarmVm): the snapshot's
memory file is mapped over RAM whose KVM slots are already registered, and the guest must go on
exactly as a cold restore's does; a prepared VM that does not fit is refused in one line."""

from __future__ import annotations

import os

import pytest
from support.live_probe import LiveProbe, assert_continues, reference_rounds

from corral.errors import ConfigError
from corral.machine import Machine, VmStateError, WarmVm
from corral.memory import GuestMemory
from corral.state.snapshot import MEMORY

MiB = 1 << 20


@pytest.fixture
def taken(tmp_path):
    """A running probe's snapshot: (the probe, the snapshot's path, the round it was taken at)."""
    p = LiveProbe.boot()
    try:
        p.wait_rounds(2)
        p.machine.snapshot(tmp_path / "snap")
        at = p.last_round()
        p.wait_rounds(at + 4)
    finally:
        p.close()
    return p, tmp_path / "snap", at


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_warm_restore_continues_the_guest_and_snapshots_again(taken, tmp_path):
    probe, snap, at = taken
    restored = LiveProbe.restore(snap, warm=WarmVm(256 * MiB))
    try:
        restored.wait_rounds(at + 3)
        assert "probe: mem-touch range" not in restored.output  # resumed, not booted
        assert_continues(probe, restored)
        memory = restored.machine.memory
        assert memory is not None and memory.backing == str(snap / MEMORY) and memory.private
        again = restored.machine.snapshot(tmp_path / "again")
        assert again.memory_bytes_written > 0
        last = restored.last_round()
    finally:
        restored.close()
    second = LiveProbe.restore(tmp_path / "again")  # what the warm guest changed is in it
    try:
        got = second.wait_rounds(last + 2)
        assert_continues(reference_rounds("mem-touch 16M forever", got), second)
    finally:
        second.close()
    # the snapshot's own file is as it was: the warm guest's writes went to private pages
    third = LiveProbe.restore(snap, warm=WarmVm(256 * MiB))
    try:
        third.wait_rounds(at + 2)
        assert_continues(probe, third)
    finally:
        third.close()


def test_a_warm_vm_with_more_vcpus_than_needed_serves(taken):
    probe, snap, at = taken
    restored = LiveProbe.restore(snap, warm=WarmVm(256 * MiB, cpus=2))
    try:
        restored.wait_rounds(at + 2)
        assert_continues(probe, restored)
        assert len(restored.machine.vcpus) == 1
    finally:
        restored.close()


def test_a_warm_vm_that_does_not_fit_is_refused_and_stays_usable(taken):
    _probe, snap, at = taken
    small = WarmVm(128 * MiB)
    try:
        m = Machine.from_snapshot(snap, warm=small)
        with pytest.raises(VmStateError) as e:
            m.build()
        assert "128 MiB" in str(e.value) and "256 MiB" in str(e.value) and "\n" not in str(e.value)
        m.close()
        assert small.vm is not None and small.memory is not None  # not taken: still its own
    finally:
        small.close()
    warm = WarmVm(256 * MiB)
    restored = LiveProbe.restore(snap, warm=warm)
    try:
        restored.wait_rounds(at + 2)
        assert warm.vm is None and warm.memory is None  # the machine's now
        with pytest.raises(VmStateError, match="served a restore already"):
            Machine.from_snapshot(snap, warm=warm).build()
    finally:
        restored.close()


def test_a_memory_file_truncated_before_a_warm_build_is_refused_and_nothing_leaks(taken):
    _probe, snap, _at = taken
    before = _open_fds()
    m = Machine.from_snapshot(snap, warm=WarmVm(256 * MiB))
    os.truncate(snap / MEMORY, 1 * MiB)
    with pytest.raises(ConfigError, match="truncated"):
        m.build()
    m.close()
    assert m.vm is None and m.memory is None
    assert _open_fds() == before


def test_only_fresh_memory_adopts_a_file(taken):
    _probe, snap, _at = taken
    with GuestMemory(256 * MiB, backing=snap / MEMORY) as restored:
        with pytest.raises(ValueError, match="fresh"):
            restored.adopt_backing(snap / MEMORY)
    fresh = GuestMemory(128 * MiB)
    try:
        with pytest.raises(ConfigError, match="not 134217728"):  # another size: refused, unchanged
            fresh.adopt_backing(snap / MEMORY)
        assert fresh.backing is None and not fresh.private
        fresh.write(0x1000, b"still mine")
        assert fresh.read(0x1000, 10) == b"still mine"
    finally:
        fresh.close()
    with pytest.raises(ValueError, match="WarmVm serves a restore"):
        Machine(Machine.from_snapshot(snap).config, warm=WarmVm(256 * MiB))
