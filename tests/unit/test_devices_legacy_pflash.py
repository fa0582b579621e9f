"""The CFI flash bank as OVMF drives it, and its variables file across boots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from corral.backends.flash import open_vars
from corral.boot import firmware
from corral.config import MachineConfig
from corral.devices.legacy import pflash as P
from corral.errors import FieldError

SIZE = 4 * P.BLOCK


def bank(**kw: object) -> tuple[P.Pflash, list[tuple[int, bytes]], list[bool]]:
    stored: list[tuple[int, bytes]] = []
    modes: list[bool] = []
    dev = P.Pflash(
        bytearray(b"\xa5" * SIZE), store=lambda o, d: stored.append((o, d)), on_mode=modes.append, **kw
    )  # type: ignore[arg-type]
    return dev, stored, modes


def test_reads_as_an_array_until_a_command():
    dev, _, modes = bank()
    assert dev.mmio_read(0, 4) == 0xA5A5A5A5
    dev.mmio_write(0, 1, P.READ_STATUS)
    assert dev.mmio_read(0x123, 1) == 0 and modes == [False]  # status reads 0 at power-on
    dev.mmio_write(0, 1, P.READ_ARRAY)
    assert dev.mmio_read(0x123, 2) == 0xA5A5 and modes == [False, True]


def test_ovmf_flash_probe_sees_flash():
    """OVMF's QemuFlashDetected: clear status in array mode, the byte still reads as data;
    then read status must read CLEARED_ARRAY_STATUS (0x00), neither the data nor the command."""
    dev, _, _ = bank()
    dev.mmio_write(0, 1, P.CLEAR_STATUS)
    assert dev.mmio_read(0, 1) == 0xA5
    dev.mmio_write(0, 1, P.READ_STATUS)
    assert dev.mmio_read(0, 1) == 0x00
    dev.mmio_write(0, 1, P.READ_ARRAY)
    assert dev.mmio_read(0, 1) == 0xA5


def test_program_byte_and_word_reach_the_bank_and_the_store():
    dev, stored, _ = bank()
    dev.mmio_write(0x10, 1, P.PROGRAM_ALT)
    dev.mmio_write(0x10, 1, 0x42)
    assert dev.mmio_read(0x10, 1) == P.SR_READY  # status mode after a program
    dev.mmio_write(0x20, 1, P.PROGRAM)
    dev.mmio_write(0x20, 4, 0x11223344)
    dev.mmio_write(0, 1, P.READ_ARRAY)
    assert dev.mmio_read(0x10, 1) == 0x42 and dev.mmio_read(0x20, 4) == 0x11223344
    assert stored == [(0x10, b"\x42"), (0x20, bytes.fromhex("44332211"))]


def test_block_erase_clears_one_4k_block():
    dev, stored, _ = bank()
    dev.mmio_write(P.BLOCK + 5, 1, P.BLOCK_ERASE)
    dev.mmio_write(P.BLOCK + 5, 1, P.CONFIRM)
    dev.mmio_write(0, 1, P.READ_ARRAY)
    assert dev.mmio_read(P.BLOCK - 1, 1) == 0xA5
    assert bytes(dev.data[P.BLOCK : 2 * P.BLOCK]) == b"\xff" * P.BLOCK
    assert dev.mmio_read(2 * P.BLOCK, 1) == 0xA5
    assert stored == [(P.BLOCK, b"\xff" * P.BLOCK)]


def test_erase_without_confirm_is_a_sequence_error_and_changes_nothing():
    dev, stored, _ = bank()
    dev.mmio_write(0, 1, P.BLOCK_ERASE)
    dev.mmio_write(0, 1, 0x77)
    assert dev.mmio_read(0, 1) & P.SR_SEQUENCE_ERROR == P.SR_SEQUENCE_ERROR
    dev.mmio_write(0, 1, P.CLEAR_STATUS)
    assert dev.mmio_read(0, 1) == 0
    assert stored == [] and bytes(dev.data) == b"\xa5" * SIZE


def test_unknown_command_is_refused_with_an_error_status():
    dev, _, _ = bank()
    dev.mmio_write(0, 1, 0xE8)  # write to buffer: not offered
    assert dev.mmio_read(0, 1) == P.SR_SEQUENCE_ERROR
    dev.mmio_write(0, 1, P.READ_ARRAY)
    assert bytes(dev.data) == b"\xa5" * SIZE


def test_cfi_query_and_identifier():
    dev, _, _ = bank()
    dev.mmio_write(0x55, 1, P.CFI_QUERY)
    assert bytes(dev.mmio_read(0x10 + i, 1) for i in range(3)) == b"QRY"
    assert dev.mmio_read(0x13, 2) == 0x0001  # Intel/Sharp command set
    assert dev.mmio_read(0x27, 1) == (SIZE - 1).bit_length()  # 2^n bytes
    assert dev.mmio_read(0x2D, 2) == SIZE // P.BLOCK - 1
    assert dev.mmio_read(0x2F, 2) * 256 == P.BLOCK
    dev.mmio_write(0, 1, P.READ_ID)
    assert (dev.mmio_read(0, 1), dev.mmio_read(1, 1)) == (P.MANUFACTURER, P.DEVICE)


def test_lock_commands_are_accepted_without_effect():
    dev, _, _ = bank()
    dev.mmio_write(0, 1, P.LOCK_SETUP)
    dev.mmio_write(0, 1, 0xD0)
    assert dev.mmio_read(0, 1) & P.SR_SEQUENCE_ERROR == 0
    dev.mmio_write(0, 1, P.PROGRAM)
    dev.mmio_write(0, 1, 0)
    dev.mmio_write(0, 1, P.READ_ARRAY)
    assert dev.mmio_read(0, 1) == 0


def test_read_only_bank_takes_no_command():
    modes: list[bool] = []
    dev = P.Pflash(memoryview(b"\x5a" * SIZE), readonly=True, on_mode=modes.append)
    for cmd in (P.PROGRAM, 0x00, P.BLOCK_ERASE, P.CONFIRM, P.CFI_QUERY):
        dev.mmio_write(0, 1, cmd)
    assert dev.mmio_read(0, 1) == 0x5A and dev.mode == P.ARRAY and modes == []


def test_accesses_past_the_bank_are_refused():
    dev, stored, _ = bank()
    dev.mmio_write(SIZE - 1, 1, P.PROGRAM)
    dev.mmio_write(SIZE - 1, 4, 0)  # runs past the end: dropped
    dev.mmio_write(SIZE + 8, 1, P.PROGRAM)
    assert dev.mmio_read(SIZE - 2, 4) == 0xFFFFFFFF and stored == []


def test_a_failing_store_is_a_program_error_not_a_crash():
    def fail(offset: int, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    dev = P.Pflash(bytearray(SIZE), store=fail)
    dev.mmio_write(0, 1, P.PROGRAM)
    dev.mmio_write(0, 1, 1)
    assert dev.mmio_read(0, 1) & P.SR_PROGRAM_ERROR


def test_bank_sizes():
    with pytest.raises(ValueError):
        P.Pflash(bytearray(P.BLOCK + 1))
    with pytest.raises(ValueError):
        P.Pflash(bytearray())


# -- the variables file ----------------------------------------------------------------------
def test_vars_file_is_created_from_the_template_and_persists(tmp_path: Path):
    template = bytes(range(256)) * (SIZE // 256)
    path = tmp_path / "vars.fd"
    first = open_vars(path, template)
    assert first.data == template and path.read_bytes() == template
    assert os.stat(path).st_mode & 0o777 == 0o600
    dev = P.Pflash(bytearray(first.data), store=first.store)
    dev.mmio_write(0x100, 1, P.BLOCK_ERASE)
    dev.mmio_write(0x100, 1, P.CONFIRM)
    dev.mmio_write(0x40, 1, P.PROGRAM)
    dev.mmio_write(0x40, 2, 0xBEEF)
    first.close()
    again = open_vars(path, template)  # the next boot: the file, not the template
    try:
        assert again.data[0x40:0x42] == b"\xef\xbe"
        assert again.data[0x42 : P.BLOCK] == b"\xff" * (P.BLOCK - 0x42)
        assert again.data[P.BLOCK :] == template[P.BLOCK :]
    finally:
        again.close()


def test_vars_file_refusals(tmp_path: Path):
    template = b"\0" * SIZE
    (tmp_path / "short.fd").write_bytes(b"\0" * 100)
    with pytest.raises(FieldError, match="is 100 bytes"):
        open_vars(tmp_path / "short.fd", template)
    (tmp_path / "target").write_bytes(template)
    (tmp_path / "link.fd").symlink_to(tmp_path / "target")
    with pytest.raises(FieldError, match="symbolic link"):
        open_vars(tmp_path / "link.fd", template)
    os.mkfifo(tmp_path / "fifo.fd")
    with pytest.raises(FieldError, match="regular file"):
        open_vars(tmp_path / "fifo.fd", template)
    with pytest.raises(FieldError, match="directory does not exist"):
        open_vars(tmp_path / "no" / "vars.fd", template)


# -- the firmware option ---------------------------------------------------------------------
def test_ovmf_option():
    assert firmware.is_ovmf("ovmf") and firmware.is_ovmf("ovmf,vars=/x")
    assert not firmware.is_ovmf("seabios") and not firmware.is_ovmf("/ovmf.fd") and not firmware.is_ovmf(None)
    assert MachineConfig(firmware="ovmf,vars=/tmp/v.fd").firmware == "ovmf,vars=/tmp/v.fd"
    with pytest.raises(ValueError, match="unknown key 'var'"):
        MachineConfig(firmware="ovmf,var=/tmp/v.fd")


@pytest.mark.skipif(not os.path.exists(firmware.OVMF_FILES[0][0]), reason="Debian's ovmf is not installed")
def test_read_ovmf_lays_the_pair_below_4g():
    o = firmware.read_ovmf("ovmf,vars=/tmp/x.fd")
    assert o.code_base + len(o.code) == 1 << 32
    assert o.vars_base + len(o.vars_template) == o.code_base
    assert o.vars_base >= 0xFF00_0000 and o.vars_path == Path("/tmp/x.fd")
    assert firmware.read_ovmf("ovmf").vars_path is None
    assert firmware.rom_image("ovmf") == o.code


# -- the PIIX functions OVMF looks for -------------------------------------------------------
def test_piix_functions_answer_at_00_01_0_and_00_01_3():
    from corral.arch.x86 import layout
    from corral.devices.bus import MmioBus
    from corral.devices.pci import piix
    from corral.devices.pci.root import PciRoot

    pci = PciRoot(MmioBus())
    pci.add(piix.PiixIsaBridge(), slot=piix.SLOT)
    pci.add_function(piix.PiixPm(), piix.SLOT, piix.PM_FUNCTION)
    assert pci.config_read(0, 1, 0, 0, 4) == 0x7000_8086 and pci.config_read(0, 1, 0, 0x0E, 1) & 0x80
    assert pci.config_read(0, 1, 3, 0, 4) == 0x7113_8086
    assert pci.config_read(0, 1, 2, 0, 4) == 0xFFFF_FFFF  # no function 2
    pci.config_write(0, 1, 3, piix.PMBA, 4, 0xB001)  # what OVMF would program: not taken
    assert pci.config_read(0, 1, 3, piix.PMBA, 4) == layout.PM_BASE_PORT | 1
    assert pci.config_read(0, 1, 3, piix.PMREGMISC, 1) & 1
    with pytest.raises(ValueError):
        pci.add_function(piix.PiixPm(), piix.SLOT, piix.PM_FUNCTION)
    with pytest.raises(ValueError):
        pci.add_function(piix.PiixPm(), 5, 1)  # no function 0 there
