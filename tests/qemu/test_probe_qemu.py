"""The probe guest under QEMU (TCG): every probe scenario (support/scenarios.py, the table
corral boots in tests/kvm) with each of its vCPU counts, through Multiboot (QEMU's choice for
this ELF) and, for the scenarios booted every way, through PVH (a copy with the Multiboot magic
zeroed). QEMU's devices are the reference corral's are measured against."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.disks import patterned_image
from support.net import fresh_tap, rx_packets
from support.qemu_probe import pvh_only_copy, run_qemu_probe
from support.scenarios import Disk, Outcome, Scenario, params

from corral.images.probe import build_probe

BOOTS = ["multiboot", "pvh"]


def _cases() -> list:
    out = []
    for p in params("qemu"):
        sc, cpus = p.values
        for boot in BOOTS if sc.every_boot else BOOTS[:1]:
            out.append(pytest.param(sc, cpus, boot, id=f"{p.id}-{boot}", marks=p.marks))
    return out


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> dict[str, Path]:
    kernel = build_probe()
    return {
        "multiboot": kernel,
        "pvh": pvh_only_copy(kernel, tmp_path_factory.mktemp("pvh") / "probe-pvh.elf"),
    }


def disk_args(img: Path, disk: Disk) -> list[str]:
    drive = f"if=none,id=d0,file={img},format=raw" + (",readonly=on" if disk.read_only else "")
    device = "virtio-blk-pci,drive=d0,disable-legacy=on" + (f",serial={disk.serial}" if disk.serial else "")
    return ["-drive", drive, "-device", device]


def net_args(tap: str) -> list[str]:
    return [
        "-netdev",
        f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n0,disable-legacy=on",
    ]


@pytest.mark.parametrize("sc,cpus,boot", _cases())
def test_probe_scenario(sc: Scenario, cpus: int, boot: str, kernels, tmp_path):
    opts = {"kernel": kernels[boot], "timeout": sc.timeout, "memory": sc.memory or "512"}
    disk = frames = None
    if sc.disk:
        disk = patterned_image(tmp_path / "disk.img", sc.disk.sectors)
        opts["extra"] = disk_args(disk, sc.disk)
    if sc.net:
        with fresh_tap("crq", up=True) as tap:
            run = run_qemu_probe(sc.cmdline, cpus, extra=net_args(tap), **opts)
            frames = rx_packets(tap)
    else:
        run = run_qemu_probe(sc.cmdline, cpus, **opts)
    sc.verify(Outcome.of(run, cpus, disk, frames, note=f"(QEMU exit code {run.returncode})"))
    if sc.every_boot:
        assert run.results.get("boot") == boot, run.output
        assert f"probe: boot={boot}" in run.output


def test_mem_touch_same_pattern_same_checksum():
    a = run_qemu_probe("mem-touch 1M", 1)
    b = run_qemu_probe("mem-touch 1048576", 2)
    assert a.status == b.status == 0
    assert a.results["checksum"] == b.results["checksum"]


@pytest.mark.kvm
@pytest.mark.parametrize("scenario", ["hello", "smp", "timer", "pio-bench 1000"])
def test_qemu_kvm_smoke(scenario):
    """QEMU on this host's /dev/kvm (PVM: SeaBIOS and the probe's ring-0 code are emulated,
    so a boot takes seconds rather than milliseconds)."""
    run = run_qemu_probe(scenario, 2, accel="kvm", timeout=120)
    assert run.status == 0, run.output
    assert run.results["boot"] == "multiboot"
