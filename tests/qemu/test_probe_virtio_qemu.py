"""The probe's virtio-blk driver against QEMU's virtio-blk-pci (modern only): the reference
that corral's device is measured against."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_probe import run_qemu_probe  # noqa: E402
from virtio_fixtures import PROBE_WRITE, patterned_image, sector  # noqa: E402

pytestmark = pytest.mark.qemu


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
