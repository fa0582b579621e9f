"""The probe's virtio-blk driver against QEMU's virtio-blk-pci (modern only): the reference
that corral's device is measured against."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_probe import run_qemu_probe  # noqa: E402
from virtio_fixtures import PROBE_WRITE, patterned_image, sector  # noqa: E402



def blk_args(img: Path, serial: str = "qemu-serial") -> list[str]:
    return ["-drive", f"if=none,id=d0,file={img},format=raw",
            "-device", f"virtio-blk-pci,drive=d0,disable-legacy=on,serial={serial}"]


def test_blk_check_under_qemu(tmp_path):
    img = patterned_image(tmp_path / "disk.img", 4096)
    run = run_qemu_probe("blk-check", extra=blk_args(img), timeout=120)
    assert run.status == 0, run.output
    assert run.results["blk_capacity"] == "4096" and run.results["blk_ok"] == "1"
    assert run.results["blk_serial"] == "qemu-serial"
    assert sector(img, 3).startswith(PROBE_WRITE)


def test_net_bench_frames_reach_the_host_under_qemu():
    """The probe's transmit driver is right: under QEMU every frame it counts reaches the tap
    (the reference for corral's virtio-net, whose PVM figure the stale-ring defect spoils)."""
    import os
    import subprocess
    import uuid

    if os.geteuid() != 0:
        pytest.skip("needs root for a tap")
    tap = "crq" + uuid.uuid4().hex[:6]
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        run = run_qemu_probe("net-bench 5000", extra=[
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,disable-legacy=on"], timeout=120)
        seen = int(Path(f"/sys/class/net/{tap}/statistics/rx_packets").read_text())
    finally:
        subprocess.run(["ip", "tuntap", "del", tap, "mode", "tap"], capture_output=True)
    assert run.status == 0, run.output
    assert run.results["net_tx_frames"] == "5000"
    assert seen >= 5000                                  # (plus any frame the host sent itself)
