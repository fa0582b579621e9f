"""The GPT disk uefidisk.py writes is what UEFI firmware reads back: a protective MBR, both GPT
headers with their CRC32s (the backup at the last LBA), the ESP holding a PE32+ GRUB at
\\EFI\\BOOT\\BOOTX64.EFI and a serial-console grub.cfg (read back with mtools), the root image
at its entry's LBA. Damaged tables and hostile inputs are refused with one line."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.cli import corral, one_clear_line

from corral.errors import ConfigError
from corral.images.bootdisk import MAX_ROOT_GIB, MIB, SECTOR, tool_env, tools_dir
from corral.images.uefidisk import (
    ESP_TYPE,
    GRUB_TOOLS,
    LINUX_FS_TYPE,
    GptPartition,
    build_uefi_disk,
    gpt,
    grub_cfg,
    parse_gpt,
)


def _write(path: Path, size: int, pieces) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return path


@st.composite
def layouts(draw):
    parts, lba = [], 34 + draw(st.integers(0, 2048))
    for _ in range(draw(st.integers(0, 5))):
        n = draw(st.integers(1, 512))
        name = draw(st.text(st.sampled_from("aZ09 -_é€\U0001d11e"), max_size=18))  # <= 36 UTF-16 units
        kind = draw(st.sampled_from([ESP_TYPE, LINUX_FS_TYPE]))
        guid = uuid.UUID(int=draw(st.integers(1, 2**128 - 1)))
        parts.append(
            GptPartition(lba * SECTOR, n * SECTOR, kind, guid, name, draw(st.integers(0, 2**64 - 1)))
        )
        lba += n + draw(st.integers(0, 64))
    return parts, (max(lba, 35) + 33 + draw(st.integers(0, 100))) * SECTOR


@given(layouts())
def test_a_gpt_reads_back_as_written(layout):
    parts, size = layout
    guid = uuid.uuid4()
    disk = bytearray(size)
    for off, data in gpt(size, parts, guid):
        disk[off : off + len(data)] = data
    assert parse_gpt(io.BytesIO(disk)) == (guid, parts)


def test_every_header_field_is_where_the_spec_puts_it(tmp_path):
    size = 8 * MIB
    part = GptPartition(MIB, 4 * MIB, ESP_TYPE, uuid.uuid4(), "EFI System Partition")
    raw = _write(tmp_path / "d.img", size, gpt(size, [part], uuid.uuid4())).read_bytes()
    last = size // SECTOR - 1
    assert raw[510:512] == b"\x55\xaa" and raw[446 + 4] == 0xEE  # the protective entry
    assert struct.unpack_from("<II", raw, 446 + 8) == (1, last)
    for lba, alt, entries_lba in ((1, last, 2), (last, 1, last - 32)):
        h = raw[lba * SECTOR : lba * SECTOR + 92]
        assert h[:8] == b"EFI PART" and struct.unpack_from("<II", h, 8) == (0x10000, 92)
        assert struct.unpack_from("<I", h, 16)[0] == zlib.crc32(h[:16] + bytes(4) + h[20:])
        assert struct.unpack_from("<QQQQ", h, 24) == (lba, alt, 34, last - 33)
        assert struct.unpack_from("<QIII", h, 72)[:3] == (entries_lba, 128, 128)
        table = raw[entries_lba * SECTOR : (entries_lba + 32) * SECTOR]
        assert struct.unpack_from("<I", h, 88)[0] == zlib.crc32(table)
        assert table[:16] == bytes.fromhex("2873 2ac1 1ff8 d211 ba4b 00a0c93ec93b".replace(" ", ""))
        assert struct.unpack_from("<QQ", table, 32) == (MIB // SECTOR, 5 * MIB // SECTOR - 1)
        assert table[56 : 56 + 40].decode("utf-16-le") == "EFI System Partition"


@pytest.mark.parametrize(
    "offset, why",
    [
        (SECTOR + 30, "header at LBA 1 fails its CRC32"),  # a header byte
        (2 * SECTOR + 40, "entries of the header at LBA 1 fail"),  # an entry byte
        (510, "not an MBR"),
        (-SECTOR + 3, "no EFI PART header"),  # the backup's signature
        (-33 * SECTOR + 5, "entries of the header at LBA 16383 fail"),  # a backup entry byte
    ],
)
def test_a_damaged_gpt_is_refused(tmp_path, offset, why):
    size = 8 * MIB
    part = GptPartition(MIB, MIB, LINUX_FS_TYPE, uuid.uuid4(), "root")
    disk = _write(tmp_path / "d.img", size, gpt(size, [part], uuid.uuid4()))
    with open(disk, "r+b") as f:
        f.seek(offset % size)
        b = f.read(1)
        f.seek(offset % size)
        f.write(bytes([b[0] ^ 0x5A]))
    with open(disk, "rb") as f, pytest.raises(ConfigError, match=why):
        parse_gpt(f)


def test_a_backup_header_not_at_the_last_lba_is_refused(tmp_path):
    size = 8 * MIB
    disk = _write(tmp_path / "d.img", size + MIB, gpt(size, [], uuid.uuid4()))  # grown after
    with open(disk, "rb") as f, pytest.raises(ConfigError, match="not the last LBA"):
        parse_gpt(f)


def test_bad_partitions_and_names_are_refused():
    g = uuid.uuid4()
    with pytest.raises(ConfigError, match="longer than 36"):
        gpt(8 * MIB, [GptPartition(MIB, MIB, ESP_TYPE, g, "x" * 37)], g)
    with pytest.raises(ConfigError, match="control characters"):
        gpt(8 * MIB, [GptPartition(MIB, MIB, ESP_TYPE, g, "root\nevil")], g)
    with pytest.raises(ConfigError, match="overlaps or is off the disk"):
        gpt(8 * MIB, [GptPartition(MIB, 8 * MIB, ESP_TYPE, g)], g)
    with pytest.raises(ConfigError, match="overlaps or is off the disk"):
        gpt(8 * MIB, [GptPartition(SECTOR, MIB, ESP_TYPE, g)], g)  # over the primary entries


def test_grub_cfg_boots_on_the_serial_console_and_quotes_every_word():
    cfg = grub_cfg("console=ttyS0 root=/dev/vda2 x=$y;reboot", initrd=True)
    assert cfg.startswith("serial --unit=0 --speed=115200\n")
    assert "terminal_output serial console\n" in cfg and "terminal_input serial console\n" in cfg
    assert "  linux /vmlinuz 'console=ttyS0' 'root=/dev/vda2' 'x=$y;reboot'\n" in cfg
    assert "  initrd /initrd.img\n" in cfg and "initrd" not in grub_cfg("quiet", initrd=False)
    with pytest.raises(ConfigError, match="one line"):
        grub_cfg("quiet\n}\nmenuentry evil {", initrd=False)
    with pytest.raises(ConfigError, match="quotes or backslashes"):
        grub_cfg("quiet' ; reboot '", initrd=False)


# --- a whole disk, built with Debian's GRUB and mtools -----------------------------------------------


@pytest.fixture(scope="module")
def tools():
    try:
        return tools_dir(progress=False, toolset=GRUB_TOOLS)
    except ConfigError as exc:  # no Debian archive here: nothing to build the disk with
        pytest.skip(f"Debian's grub-efi/mtools/dosfstools packages cannot be fetched: {exc}")


def _mtools(tools: Path, *args: str) -> bytes:
    env = tool_env(tools)
    exe = shutil.which(args[0], path=env["PATH"])
    assert exe is not None
    return subprocess.run([exe, *args[1:]], env=env, capture_output=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def disk(tools, tmp_path_factory):
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    d = tmp_path_factory.mktemp("uefi")
    (d / "tree" / "etc").mkdir(parents=True)
    (d / "tree" / "etc" / "hostname").write_text("uefi-guest\n")
    root = d / "root.ext4"
    with open(root, "wb") as f:
        f.truncate(24 * MIB)
    subprocess.run([mkfs, "-q", "-F", "-d", str(d / "tree"), str(root)], check=True, timeout=60)
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    kernel.write_bytes(os.urandom(3 * MIB + 17))
    initrd.write_bytes(os.urandom(MIB))
    out = d / "disk.img"
    parts = build_uefi_disk(
        out, kernel, initrd, "console=ttyS0 root=/dev/vda2", root=root, esp_mib=40, tools=tools
    )
    return out, parts, kernel, root


def test_the_disk_has_a_valid_gpt_with_an_esp_and_a_root(disk):
    out, parts, _kernel, _root = disk
    with open(out, "rb") as f:
        _guid, found = parse_gpt(f)
    assert found == parts
    assert [(p.type, p.name) for p in parts] == [(ESP_TYPE, "EFI System Partition"), (LINUX_FS_TYPE, "root")]
    assert parts[0].start == MIB and parts[0].size == 40 * MIB and parts[1].start == 41 * MIB
    assert out.stat().st_size == parts[1].start + parts[1].size + MIB


def test_the_root_image_sits_at_its_entrys_lba(disk):
    out, parts, _kernel, root = disk
    with open(out, "rb") as f:
        f.seek(parts[1].start + 1080)
        assert f.read(2) == b"\x53\xef"  # the ext4 superblock's magic
        f.seek(parts[1].start)
        assert f.read(root.stat().st_size) == root.read_bytes()


def test_the_esp_holds_a_pe32_plus_grub_a_grub_cfg_and_the_kernel(disk, tools, tmp_path):
    out, parts, kernel, _root = disk
    esp = f"{out}@@{parts[0].start}"
    listing = _mtools(tools, "mdir", "-i", esp, "-b", "::/EFI/BOOT").decode()
    assert "::/EFI/BOOT/BOOTX64.EFI" in listing and "::/EFI/BOOT/grub.cfg" in listing, listing
    _mtools(tools, "mcopy", "-i", esp, "::/EFI/BOOT/BOOTX64.EFI", str(tmp_path / "grub.efi"))
    pe = (tmp_path / "grub.efi").read_bytes()
    at = struct.unpack_from("<I", pe, 0x3C)[0]
    assert pe[:2] == b"MZ" and pe[at : at + 4] == b"PE\0\0"
    assert struct.unpack_from("<H", pe, at + 4)[0] == 0x8664  # x86-64
    assert struct.unpack_from("<H", pe, at + 24)[0] == 0x20B  # PE32+
    assert struct.unpack_from("<H", pe, at + 24 + 68)[0] == 10  # subsystem: an EFI application
    cfg = _mtools(tools, "mtype", "-i", esp, "::/EFI/BOOT/grub.cfg").decode()
    assert "serial --unit=0" in cfg and "linux /vmlinuz 'console=ttyS0' 'root=/dev/vda2'" in cfg
    _mtools(tools, "mcopy", "-i", esp, "::/vmlinuz", str(tmp_path / "k"))
    assert (tmp_path / "k").read_bytes() == kernel.read_bytes()
    assert b"mkfs.fat" in Path(out).read_bytes()[parts[0].start : parts[0].start + 512]  # boot sector


def test_hostile_inputs_are_refused_with_one_line(tools, tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    huge = tmp_path / "huge.ext4"
    with open(huge, "wb") as f:
        f.truncate((MAX_ROOT_GIB << 30) + 1)  # sparse: costs nothing
    out = tmp_path / "d.img"
    with pytest.raises(ConfigError, match=f"1 byte to {MAX_ROOT_GIB} GiB"):
        build_uefi_disk(out, kernel, None, "quiet", root=huge, tools=tools)
    (tmp_path / "empty").touch()
    with pytest.raises(ConfigError, match="1 byte to"):
        build_uefi_disk(out, kernel, None, "quiet", root=tmp_path / "empty", tools=tools)
    with pytest.raises(ConfigError, match="40 to 2048 MiB"):
        build_uefi_disk(out, kernel, None, "quiet", esp_mib=16, tools=tools)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(40 * MIB)
    with pytest.raises(ConfigError, match="do not fit a 40 MiB boot partition"):
        build_uefi_disk(out, big, None, "quiet", esp_mib=40, tools=tools)
    with pytest.raises(ConfigError, match="one line"):
        build_uefi_disk(out, kernel, None, "a\nb", tools=tools)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_cli_knows_debian_uefi_and_refuses_bad_names(tmp_path):
    env = {"CORRAL_CACHE": str(tmp_path / "cache")}
    r = corral("image", "path", "debian-uefi", env=env)
    assert (
        one_clear_line(r)
        == "corral: error: image 'debian-uefi' is not fetched: run `corral image fetch debian-uefi`"
    )
    r = corral("image", "fetch", "debian-uefi/../x", env=env)
    assert "no image named 'debian-uefi/../x'" in one_clear_line(r)
    assert not (tmp_path / "cache").exists()


def test_corral_image_build_debian_uefi_caches_a_verified_disk(tools, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from corral.cli import main
    from corral.images import cache, debian_image
    from corral.images.registry import DebianUefiImage, get_image

    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(DebianUefiImage, "_tools", lambda self, force: tools)  # no network
    with cache.atomic_dir(debian_image.entry_dir()) as tmp:  # a stand-in for the debian image
        (tmp / "vmlinuz").write_bytes(os.urandom(MIB))
        (tmp / "vmlinux").write_bytes(b"\x7fELF")
        (tmp / "initrd.img").write_bytes(os.urandom(MIB))
        cache.write_manifest(tmp, "debian")
    img = get_image("debian-uefi")
    assert img.boots_from_disk and img.firmware == "ovmf" and get_image("debian-disk").firmware == "seabios"
    res = CliRunner().invoke(main, ["image", "build", "debian-uefi"])
    assert res.exit_code == 0, res.output
    path = Path(res.output.strip())
    assert path == tmp_path / "cache" / "images" / "debian-uefi" / "disk.img"
    with open(path, "rb") as f:
        assert [p.type for p in parse_gpt(f)[1]] == [ESP_TYPE]
    assert cache.read_manifest(path.parent)["meta"] == {"from": "debian", "loader": "grub-efi"}
    with open(path, "r+b") as f:  # damage it: the checksum catches it
        f.seek(MIB + 4096)
        f.write(b"x")
    res = CliRunner().invoke(main, ["image", "path", "debian-uefi"])
    assert (
        res.exit_code == 1
        and "corrupt (checksum mismatch): run `corral image fetch debian-uefi --force`" in res.output
    )
