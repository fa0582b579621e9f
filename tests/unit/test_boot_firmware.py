"""Firmware images (corral.boot.firmware): what `--firmware` accepts, where the ROM goes and
what the BIOS area holds at power-on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.boot import firmware
from corral.errors import FieldError
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


def test_seabios_names_the_installed_image_or_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setitem(firmware.KNOWN, "seabios", (str(tmp_path / "a.bin"), str(tmp_path / "b.bin")))
    with pytest.raises(FieldError, match="install Debian's `seabios` package"):
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
