"""A disk as an installer leaves it (bootdisk.py: SYSLINUX's MBR code, an active FAT16 partition
with SYSLINUX installed by Debian's own tools, no root needed) boots through SeaBIOS under corral:
the BIOS reads the MBR from virtio-blk, the MBR code chains to the partition's boot record, which
loads ldlinux.sys, which prints its banner on the serial line. On this PVM host the next step
(SYSLINUX switching modes to load the kernel) meets an instruction PVM's ring-0 emulator cannot
run, so the kernel boot itself is tested in the lab (tests/lab/test_lab_bios_disk.py)."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import cli_env, corral, one_clear_line

from corral.boot import firmware
from corral.errors import ConfigError
from corral.images.bootdisk import TYPE_FAT16_LBA, TYPE_LINUX, build_bios_disk, parse_mbr, tools_dir

SEABIOS = next((Path(p) for p in firmware.KNOWN["seabios"] if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(SEABIOS is None, reason="Debian's seabios package is not installed")


@pytest.fixture(scope="module")
def tools():
    try:
        return tools_dir(progress=False)
    except ConfigError as exc:  # no Debian archive here: nothing to build the disk with
        pytest.skip(f"Debian's syslinux/mtools/dosfstools packages cannot be fetched: {exc}")


def test_a_syslinux_mbr_disk_boots_through_seabios(tools, tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(64 << 10))  # never reached here: SYSLINUX's banner comes first
    root = tmp_path / "root.img"
    root.write_bytes(b"ROOT" * 1024)
    disk = tmp_path / "disk.img"
    parts = build_bios_disk(disk, kernel, None, "console=ttyS0", root=root, boot_mib=16, tools=tools)
    with open(disk, "rb") as f:
        assert parse_mbr(f.read(512)) == parts
        assert [(p.type, p.active) for p in parts] == [(TYPE_FAT16_LBA, True), (TYPE_LINUX, False)]
        f.seek(parts[1].start)
        assert f.read(4096) == b"ROOT" * 1024  # the root image sits where the kernel finds /dev/vda2
    cmd = ["run", "--firmware", "seabios", "--disk", f"{disk},ro", "--memory", "128M"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", *cmd],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env(),
    )  # fmt: skip
    out = b""
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while b"H. Peter Anvin" not in out and time.monotonic() < deadline:  # the whole banner
            if sel.select(timeout=1):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out += chunk
    finally:
        proc.kill()
        proc.wait()
    text = out.decode(errors="replace")
    assert "SeaBIOS" in text and "Booting from Hard Disk" in text, text
    assert "SYSLINUX 6.04" in text, text  # MBR -> partition boot record -> ldlinux.sys ran


def test_a_multiline_append_and_a_tiny_boot_partition_are_refused(tools, tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    with pytest.raises(ConfigError, match="one line"):
        build_bios_disk(tmp_path / "d.img", kernel, None, "a\nb", tools=tools)
    with pytest.raises(ConfigError, match="16 to 2048 MiB"):
        build_bios_disk(tmp_path / "d.img", kernel, None, "quiet", boot_mib=8, tools=tools)
    assert not (tmp_path / "d.img").exists()


def test_a_disk_image_on_pvm_says_it_needs_hardware_virtualization():
    r = corral("run", "--image", "debian-disk")
    if r.returncode == 0 or "hardware virtualization" not in r.stderr:
        pytest.skip("this host has hardware virtualization")  # then the image boots: the lab tests it
    assert "needs hardware virtualization" in one_clear_line(r)
