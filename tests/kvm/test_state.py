"""Pause, snapshot, restore and clone on the real /dev/kvm, proven by a probe guest that keeps
writing and checking memory from ring 3 (native speed even on PVM hosts)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.hostile import fifo, umask
from support.live_probe import LiveProbe, assert_continues, reference_rounds

from corral.errors import ConfigError
from corral.machine import Machine, VmStateError
from corral.state.snapshot import MANIFEST, MEMORY, STATE, SnapshotError, read_snapshot


@pytest.fixture
def probe():
    p = LiveProbe.boot()
    yield p
    p.close()


def test_pause_holds_the_guest_and_resume_continues_it(probe):
    probe.wait_rounds(3)
    for _ in range(3):
        probe.machine.pause()
        assert probe.machine.paused
        held = probe.output
        time.sleep(0.3)
        assert probe.output == held, "the guest ran while paused"
        probe.machine.resume()
        probe.wait_rounds(probe.last_round() + 2)
    assert all(ok for _, ok in probe.rounds().values())


def test_pause_is_quick_after_resume(probe):
    # a resume followed at once by a pause (the vCPU has not woken yet) must still pause
    probe.wait_rounds(1)
    for _ in range(20):
        probe.machine.pause(timeout=2)
        probe.machine.resume()
    probe.wait_rounds(probe.last_round() + 2)


def test_a_pause_that_fails_leaves_the_guest_running(tmp_path):
    """The device loop held busy past the timeout: the pause (and a snapshot) fails with one line
    and the guest runs on, vCPUs and devices, without a resume (issue 13, finding 4)."""
    p = LiveProbe.boot(rng=True)
    try:
        p.wait_rounds(2)
        loop = p.machine.loop
        assert loop is not None
        loop.call_soon(lambda: time.sleep(1.5))  # a device callback that takes too long
        with pytest.raises(VmStateError, match="did not pause within 0.3 s; the guest runs on"):
            p.machine.pause(timeout=0.3)
        assert not p.machine.paused
        at = p.last_round()
        p.wait_rounds(at + 2, timeout=10)  # the vCPUs were released
        done = threading.Event()
        loop.call_soon(done.set)
        assert done.wait(5), "the device loop stayed held"
        p.machine.pause()  # and a later pause works
        p.machine.resume()
        p.wait_rounds(p.last_round() + 1)
    finally:
        p.close()


def test_snapshot_restore_continues_the_guest(probe, tmp_path):
    probe.wait_rounds(3)
    stats = probe.machine.snapshot(tmp_path / "snap")
    assert not probe.machine.paused  # a running machine keeps running
    taken_at = probe.last_round()
    probe.wait_rounds(taken_at + 4)
    # sparse: 16 MiB touched of 256 MiB, so the memory file is mostly holes
    assert stats.memory_bytes_written < 32 << 20
    assert stats.disk_bytes < 40 << 20
    assert os.stat(tmp_path / "snap" / MEMORY).st_size == 256 << 20

    restored = LiveProbe.restore(tmp_path / "snap")
    try:
        restored.wait_rounds(taken_at + 4)
        # it resumed mid-run: no fresh boot banner, and it started past round 1
        assert "probe: mem-touch range" not in restored.output
        assert min(restored.rounds()) > 1
        assert_continues(probe, restored)
    finally:
        restored.close()


def test_snapshot_of_a_paused_machine_leaves_it_paused(probe, tmp_path):
    probe.wait_rounds(2)
    probe.machine.pause()
    probe.machine.snapshot(tmp_path / "s")
    assert probe.machine.paused
    probe.machine.resume()
    probe.wait_rounds(probe.last_round() + 1)


def test_clones_share_one_snapshot(probe, tmp_path):
    probe.wait_rounds(2)
    probe.machine.snapshot(tmp_path / "snap")
    taken_at = probe.last_round()
    probe.wait_rounds(taken_at + 6)
    clones = [LiveProbe.restore(tmp_path / "snap") for _ in range(3)]
    try:
        for c in clones:
            c.wait_rounds(taken_at + 3)
            assert_continues(probe, c)
    finally:
        for c in clones:
            c.close()


def test_restored_machine_snapshots_again(probe, tmp_path):
    """A restored guest's RAM is a private mapping of the first snapshot: a second snapshot
    must still carry every page the guest changed since."""
    probe.wait_rounds(2)
    probe.machine.snapshot(tmp_path / "a")
    first = LiveProbe.restore(tmp_path / "a")
    try:
        at = first.wait_rounds(probe.last_round() + 2)
        first.machine.snapshot(tmp_path / "b")
    finally:
        first.close()
    second = LiveProbe.restore(tmp_path / "b")
    try:
        second.wait_rounds(at + 3)
        assert_continues(probe, second)
    finally:
        second.close()


def test_two_vcpus_restore(tmp_path):
    p = LiveProbe.boot(cpus=2)
    try:
        p.wait_rounds(2)
        p.machine.snapshot(tmp_path / "snap")
        at = p.last_round()
        p.wait_rounds(at + 3)
    finally:
        p.close()
    snap = read_snapshot(tmp_path / "snap")
    assert len(snap.state.vcpus) == 2
    r = LiveProbe.restore(tmp_path / "snap")
    try:
        r.wait_rounds(at + 3)
        assert_continues(p, r)
    finally:
        r.close()


# -- refusing bad snapshots -------------------------------------------------------------------


@pytest.fixture
def snapshot_dir(probe, tmp_path):
    probe.wait_rounds(1)
    probe.machine.snapshot(tmp_path / "snap")
    return tmp_path / "snap"


def test_existing_directory_is_not_overwritten(probe, snapshot_dir):
    before = sorted(os.listdir(snapshot_dir))
    with pytest.raises(SnapshotError, match="already exists"):
        probe.machine.snapshot(snapshot_dir)
    assert sorted(os.listdir(snapshot_dir)) == before
    assert not probe.machine.paused


def test_missing_snapshot(tmp_path):
    with pytest.raises(SnapshotError, match="does not exist"):
        Machine.from_snapshot(tmp_path / "nowhere")


def test_truncated_memory_is_refused(snapshot_dir):
    os.truncate(snapshot_dir / MEMORY, 1 << 20)
    with pytest.raises(SnapshotError, match="truncated"):
        Machine.from_snapshot(snapshot_dir)


def test_a_snapshot_is_its_owners_alone_whatever_the_umask(probe, tmp_path):
    probe.wait_rounds(1)
    with umask(0):
        probe.machine.snapshot(tmp_path / "snap")
    assert stat.S_IMODE(os.stat(tmp_path / "snap").st_mode) == 0o700
    for name in (MANIFEST, STATE, MEMORY):
        assert stat.S_IMODE(os.stat(tmp_path / "snap" / name).st_mode) == 0o600, name


@pytest.mark.parametrize("name", [MEMORY, STATE, MANIFEST])
def test_a_symlinked_snapshot_file_is_refused_with_one_line(snapshot_dir, tmp_path, name):
    """memory.bin linked to a host file of the right size would become guest RAM."""
    elsewhere = tmp_path / "elsewhere"
    os.rename(snapshot_dir / name, elsewhere)
    (snapshot_dir / name).symlink_to(elsewhere)
    with pytest.raises(SnapshotError) as exc:
        Machine.from_snapshot(snapshot_dir)
    line = f"{snapshot_dir / name} is a symbolic link: a snapshot's files must be its own (copy the file in)"
    assert str(exc.value) == line
    if name == MEMORY:  # and `corral restore` says just that
        r = subprocess.run(
            [sys.executable, "-m", "corral", "restore", str(snapshot_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and r.stderr == f"corral: error: {line}\n", r.stderr


def test_a_fifo_for_memory_is_refused_without_hanging(snapshot_dir):
    (snapshot_dir / MEMORY).unlink()
    with fifo(snapshot_dir / MEMORY), pytest.raises(SnapshotError, match="is not a regular file"):
        Machine.from_snapshot(snapshot_dir)


def test_memory_truncated_after_restore_is_refused_before_the_guest_runs(snapshot_dir):
    m = Machine.from_snapshot(snapshot_dir)
    try:
        m.build()
        os.truncate(snapshot_dir / MEMORY, 1 << 20)
        with pytest.raises(ConfigError, match="truncated"):
            m.start()
        assert all(v.thread is None for v in m.vcpus)
    finally:
        m.close()


def test_damaged_state_is_refused(snapshot_dir):
    raw = (snapshot_dir / STATE).read_bytes()
    (snapshot_dir / STATE).write_bytes(raw.replace(b'"mp_state":0', b'"mp_state":3', 1))
    with pytest.raises(SnapshotError, match="checksum"):
        Machine.from_snapshot(snapshot_dir)


def test_other_version_is_refused(snapshot_dir):
    m = json.loads((snapshot_dir / MANIFEST).read_text())
    m["corral_version"] = "0.0.1"
    (snapshot_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="written by corral 0.0.1"):
        Machine.from_snapshot(snapshot_dir)


def test_snapshot_from_the_previous_format_is_refused_with_one_line(tmp_path):
    """A snapshot written by corral 0.1.0 (format 1, positional state records) is refused before
    anything is built, by the library and by `corral restore`, naming both versions."""
    import shutil
    import subprocess
    import sys

    old = tmp_path / "old"
    shutil.copytree(Path(__file__).parents[1] / "data" / "snapshot-format1", old)
    with open(old / MEMORY, "wb") as f:
        f.truncate(json.loads((old / MANIFEST).read_text())["memory_size"])
    with pytest.raises(
        SnapshotError,
        match=r"written by corral 0\.1\.0 \(snapshot format 1\).*"
        r"restore it with the corral that wrote it",
    ):
        Machine.from_snapshot(old)
    r = subprocess.run(
        [sys.executable, "-m", "corral", "restore", str(old)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: error: ") and "format 1" in lines[0], r.stderr


def test_other_cpu_is_refused(snapshot_dir):
    m = json.loads((snapshot_dir / MANIFEST).read_text())
    m["cpu"]["signature"] ^= 0xF0  # another model
    (snapshot_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="the guest would see its CPU change"):
        Machine.from_snapshot(snapshot_dir).build()


def test_not_a_snapshot(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / MANIFEST).write_text('{"format": "something"}')
    with pytest.raises(SnapshotError, match="not a corral snapshot"):
        Machine.from_snapshot(tmp_path / "x")


def test_save_state_needs_a_pause(probe):
    probe.wait_rounds(1)
    with pytest.raises(VmStateError, match="pause the machine"):
        probe.machine.save_state()


def test_devices_travel_and_clones_get_their_own_identity(tmp_path):
    """A machine with virtio devices (rng, vsock, a tap NIC, a disk) snapshots and clones:
    each clone gets its own vsock socket and CID and its own tap; the disk is shared read-only."""
    import uuid

    from corral.config import DiskConfig, NetConfig, VsockConfig
    from corral.state.snapshot import read_snapshot

    if os.geteuid() != 0:
        pytest.skip("needs root for taps")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    tap = "crs" + uuid.uuid4().hex[:6]
    p = LiveProbe.boot(
        rng=True,
        vsock=VsockConfig(cid=9, uds_path=tmp_path / "v.sock"),
        nets=[NetConfig(tap=tap)],
        disks=[DiskConfig(path=disk, read_only=True)],
    )
    try:
        p.wait_rounds(2)
        p.machine.snapshot(tmp_path / "snap")
        at = p.last_round()
        granted = p.machine.config.host_resources()  # restore is given its host resources again
    finally:
        p.close()
    state = read_snapshot(tmp_path / "snap").state
    assert {"virtio-rng", "virtio-vsock", "virtio-net0", "virtio-blk0", "pci"} <= set(state.devices)
    clones = []
    try:
        for i in range(2):
            c = LiveProbe(Machine.from_snapshot(tmp_path / "snap", clone_index=i, host=granted))
            clones.append(c)
            c.machine.start()
        for i, c in enumerate(clones):
            c.wait_rounds(at + 2)
            assert c.machine.config.vsock.cid == 9 + i
            assert (tmp_path / f"v.sock.{i}").exists()
            assert os.path.exists(f"/sys/class/net/{tap}c{i}")
        assert_continues(
            reference_rounds("mem-touch 16M forever", max(c.last_round() for c in clones)), clones[0]
        )
    finally:
        for c in clones:
            c.close()


def test_balloon_target_from_the_host():
    p = LiveProbe.boot(balloon=True)
    try:
        p.wait_rounds(1)
        p.machine.set_balloon(64 << 20)
        info = p.machine.balloon_info(timeout=0.1)
        assert info.target_bytes == 64 << 20 and info.host_resident_bytes > 16 << 20
        with pytest.raises(VmStateError, match="does not fit"):
            p.machine.set_balloon(1 << 40)
    finally:
        p.close()


def test_no_balloon_says_how_to_get_one(probe):
    with pytest.raises(VmStateError, match=r"balloon=True"):
        probe.machine.set_balloon(1 << 20)
