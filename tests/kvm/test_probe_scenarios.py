"""Every probe scenario (support/scenarios.py) boots under corral on the real /dev/kvm, through
the library, with each of its vCPU counts; the same table runs under QEMU in tests/qemu."""

import pytest
from support.disks import patterned_image
from support.net import fresh_tap, rx_packets
from support.probe import run_probe
from support.scenarios import Outcome, Scenario, params

from corral.config import DiskConfig, NetConfig


@pytest.mark.parametrize("sc,cpus", params("corral"))
def test_probe_scenario(sc: Scenario, cpus: int, tmp_path):
    devices: dict[str, object] = {}
    disk = None
    if sc.disk:
        disk = patterned_image(tmp_path / "disk.img", sc.disk.sectors)
        devices["disks"] = [DiskConfig(path=disk, serial=sc.disk.serial, read_only=sc.disk.read_only)]
    memory = {"memory": sc.memory} if sc.memory else {}
    frames = None
    if sc.net:
        with fresh_tap("crk") as tap:
            run = run_probe(sc.cmdline, cpus, timeout=sc.timeout, nets=[NetConfig(tap=tap)], **memory)
            frames = rx_packets(tap)
    else:
        run = run_probe(sc.cmdline, cpus, timeout=sc.timeout, **memory, **devices)
    sc.verify(Outcome.of(run, cpus, disk, frames, note=f"({run.result.kind}: {run.result.message})"))
