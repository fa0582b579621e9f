"""The probe's ring-3 virtio-blk driver against corral's virtio-pci device on the real /dev/kvm."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probe_runner import run_probe  # noqa: E402
from virtio_fixtures import MARKER, PROBE_WRITE, patterned_image, sector  # noqa: E402

from corral.config import DiskConfig  # noqa: E402




def test_blk_check_reads_writes_and_flushes(tmp_path):
    img = patterned_image(tmp_path / "disk.img", 4096)
    run = run_probe("blk-check", disks=[DiskConfig(path=img, serial="probe-serial-1")])
    assert run.result.status == 0, run.output
    assert run.results["blk_capacity"] == "4096"
    assert run.results["blk_serial"] == "probe-serial-1"
    assert run.results["blk_ok"] == "1"
    assert sector(img, 3).startswith(PROBE_WRITE)          # the guest's write reached the file
    assert sector(img, 4)[8:8 + len(MARKER)] == MARKER      # and nothing else changed


def test_blk_read_only_disk_refuses_the_guests_write(tmp_path):
    img = patterned_image(tmp_path / "disk.img", 1024)
    run = run_probe("blk-check", disks=[DiskConfig(path=img, read_only=True)])
    assert run.results["blk_ok"] == "0", run.output          # the write came back IOERR
    assert not sector(img, 3).startswith(PROBE_WRITE)


def test_blk_random_reads_complete_without_errors(tmp_path):
    img = patterned_image(tmp_path / "disk.img", 8192)
    run = run_probe("blk-bench rand4k 5000", disks=[DiskConfig(path=img)])
    assert run.result.status == 0, run.output
    assert run.results["blk_ops"] == "5000" and run.results["blk_errors"] == "0"


def test_probe_without_a_disk_says_so():
    run = run_probe("blk-check")
    assert run.result.status == 1
    assert "no virtio-blk" in run.output


def test_net_bench_frames_reach_the_tap():
    """Every frame the probe counts as sent must reach the host's tap."""
    import subprocess
    import uuid

    from corral.config import NetConfig

    if os.geteuid() != 0:
        pytest.skip("needs root for a tap")
    tap = "crk" + uuid.uuid4().hex[:6]
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    try:
        run = run_probe("net-bench 5000", nets=[NetConfig(tap=tap)])
        seen = int(open(f"/sys/class/net/{tap}/statistics/rx_packets").read())
    finally:
        subprocess.run(["ip", "tuntap", "del", tap, "mode", "tap"], capture_output=True)
    assert run.result.status == 0, run.output
    assert run.results["net_tx_frames"] == "5000"
    assert seen == 5000          # the device completed nothing it did not send
