"""Firmware images (corral.boot.firmware): what `--firmware` accepts, where the ROM goes and
what the BIOS area holds at power-on."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from corral.boot import firmware
from corral.errors import ConfigError, FieldError
from corral.images import firmware_deb
from corral.memory import GuestMemory

KiB = 1024


def image(size: int) -> bytes:
    return bytes(i * 7 & 0xFF for i in range(size))


@pytest.mark.parametrize("size", [64 * KiB, 128 * KiB, 256 * KiB])
def test_images_of_a_mappable_size_are_read_whole(tmp_path: Path, size: int):
    p = tmp_path / "bios.bin"
    p.write_bytes(image(size))
    assert firmware.read_firmware(str(p)) == image(size)
    assert firmware.rom_base(image(size)) == (1 << 32) - size  # it ends at 4 GiB


@pytest.mark.parametrize("size", [0, 1000, 64 * KiB + 4096, 320 * KiB, 1 << 20])
def test_other_sizes_are_refused(tmp_path: Path, size: int):
    p = tmp_path / "bios.bin"
    p.write_bytes(b"\0" * size)
    with pytest.raises(FieldError, match=f"^firmware: firmware file '.*' is {size} bytes: give `seabios`"):
        firmware.read_firmware(str(p))


def test_a_symlink_a_fifo_a_directory_and_a_missing_file_are_refused(tmp_path: Path):
    real = tmp_path / "real.bin"
    real.write_bytes(image(64 * KiB))
    (tmp_path / "link.bin").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.bin")  # a FIFO would block a plain open: it must not
    cases = {
        "link.bin": "is a symbolic link",
        "fifo.bin": "is not a regular file",
        "missing": "does not exist",
    }
    for name, why in cases.items():
        with pytest.raises(FieldError, match=why):
            firmware.read_firmware(str(tmp_path / name))
    with pytest.raises(FieldError, match="is not a regular file"):
        firmware.read_firmware(str(tmp_path))


def _offline(*args, **kwargs):
    raise ConfigError("offline")


def test_seabios_names_the_installed_image_or_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setitem(firmware.KNOWN, "seabios", (str(tmp_path / "a.bin"), str(tmp_path / "b.bin")))
    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path / "cache"))  # nothing cached, and no archive:
    monkeypatch.setattr(firmware_deb, "fetch_debs", _offline)
    with pytest.raises(FieldError, match=r"cannot be had \(offline\): install Debian's `seabios` package"):
        firmware.resolve("seabios")
    (tmp_path / "b.bin").write_bytes(image(64 * KiB))
    assert firmware.resolve("seabios") == tmp_path / "b.bin"
    assert firmware.resolve("./my.bin") == Path("./my.bin")


@pytest.mark.parametrize("size", [64 * KiB, 256 * KiB])
def test_the_bios_area_holds_the_roms_tail_at_power_on(size: int):
    mem = GuestMemory(16 << 20)
    rom = image(size)
    firmware.load_shadow(mem, rom)
    tail = min(size, 128 * KiB)
    assert mem.read(0x100000 - tail, tail) == rom[-tail:]
    # the reset vector's bytes are the same through both windows
    assert mem.read(0xFFFF0, 16) == rom[-16:]
    if tail < 128 * KiB:
        assert mem.read(0xE0000, 16) == bytes(16)  # nothing below a small ROM


def bzimage(version: int = 0x20C, loadflags: int = 1, setup_sects: int = 1, payload: int = 4096) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = version.to_bytes(2, "little")
    head[0x211] = loadflags
    head[0x22C:0x230] = (0x37FF_FFFF).to_bytes(4, "little")
    head[0x238:0x23C] = (64).to_bytes(4, "little")
    return bytes(head) + b"P" * payload


@pytest.fixture
def rom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> bytes:
    data = b"\x55\xaa\x03" + bytes(1533)
    (tmp_path / "linuxboot_dma.bin").write_bytes(data)
    monkeypatch.setattr(firmware, "LINUXBOOT_ROMS", (str(tmp_path / "linuxboot_dma.bin"),))
    return data


def test_a_bzimage_is_split_and_its_header_filled_in_as_a_loader_does(rom: bytes):
    k = bzimage()
    lb = firmware.linux_boot(k, b"I" * 10_000, "console=ttyS0", 64 << 20, "k")
    assert lb.rom == rom
    assert (len(lb.setup), lb.kernel) == (1024, k[1024:])
    assert lb.cmdline == b"console=ttyS0\0"
    assert (lb.setup_addr, lb.kernel_addr, lb.cmdline_addr) == (0x10000, 0x100000, 0x20000)
    h = lb.setup
    assert h[0x210] == 0xB0 and h[0x211] == 0x81  # type_of_loader, CAN_USE_HEAP
    assert int.from_bytes(h[0x228:0x22C], "little") == 0x20000  # cmd_line_ptr
    assert int.from_bytes(h[0x224:0x226], "little") == 0x20000 - 0x10000 - 0x200  # heap_end_ptr
    # the initrd: page-aligned, below the top of RAM less QEMU's 128 KiB, and in the header
    assert lb.initrd_addr % 4096 == 0 and lb.initrd_addr + 10_000 <= (64 << 20) - (128 << 10)
    assert int.from_bytes(h[0x218:0x21C], "little") == lb.initrd_addr
    assert int.from_bytes(h[0x21C:0x220], "little") == 10_000
    assert k[:0x210] == bytes(h[:0x210])  # the file's own bytes before the loader's fields


@pytest.mark.parametrize(
    "kernel,field,why",
    [
        (b"\x7fELF" + bytes(4096), "kernel", "is not a bzImage"),
        (bzimage(version=0x201), "kernel", "boot protocol 0x201 without LOADED_HIGH"),
        (bzimage(loadflags=0), "kernel", "without LOADED_HIGH"),
        (bzimage(setup_sects=40, payload=0), "kernel", "do not fit the file"),
    ],
    ids=["elf", "old-protocol", "not-loaded-high", "truncated"],
)
def test_kernels_the_option_rom_cannot_boot_are_one_line(rom: bytes, kernel: bytes, field: str, why: str):
    with pytest.raises(FieldError, match=f"^{field}: .*{why}"):
        firmware.linux_boot(kernel, None, "", 64 << 20, "k")


def test_a_long_cmdline_a_big_initrd_and_a_missing_rom_are_one_line(
    rom: bytes, monkeypatch: pytest.MonkeyPatch
):
    with pytest.raises(FieldError, match="^cmdline: 65 bytes is longer than k takes \\(64\\)"):
        firmware.linux_boot(bzimage(), None, "x" * 65, 64 << 20, "k")
    with pytest.raises(FieldError, match="^initrd: the initrd .* does not fit"):
        firmware.linux_boot(bzimage(), b"I" * (63 << 20), "", 64 << 20, "k")
    monkeypatch.setattr(firmware, "LINUXBOOT_ROMS", ("/nonexistent/linuxboot_dma.bin",))
    with pytest.raises(FieldError, match="^kernel: booting a kernel through the firmware needs"):
        firmware.linux_boot(bzimage(), None, "", 64 << 20, "k")


def _seabios_glob_prefix(glob: str, path: str) -> bool:
    """SeaBIOS's bootorder match: `glob` ('*' spans one node name) is a prefix of `path`
    ending where a path node ends."""
    pattern = "".join("[^/@]*" if c == "*" else re.escape(c) for c in glob)
    return re.match(pattern + "(/|$)", path) is not None


@pytest.mark.parametrize(
    "slot,fn,path", [(1, 0, "/pci@i0cf8/scsi@1/disk@0,0"), (0x1A, 3, "/pci@i0cf8/scsi@1a,3/disk@0,0")]
)
def test_virtio_blk_boot_paths_are_qemus_and_seabios_finds_its_slot(slot, fn, path):
    assert firmware.virtio_blk_boot_path(slot, fn) == path
    mine = f"/pci@i0cf8/*@{slot:x}" + (f",{fn:x}" if fn else "")  # SeaBIOS's own path for the disk
    assert _seabios_glob_prefix(mine, path)
    for other in range(32):  # no other device's path matches (slot 1 against "1a" included)
        if other != slot:
            assert not _seabios_glob_prefix(f"/pci@i0cf8/*@{other:x}", path)
    # OVMF takes the node names literally: PCI root, "scsi" at the slot, "disk"
    nodes = path.split("/")[1:]
    assert [n.split("@")[0] for n in nodes] == ["pci", "scsi", "disk"]


@pytest.mark.parametrize("slot,fn", [(-1, 0), (32, 0), (1, 8)])
def test_a_boot_path_for_no_device_address_is_refused(slot, fn):
    with pytest.raises(ValueError):
        firmware.virtio_blk_boot_path(slot, fn)
