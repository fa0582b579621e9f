"""Bootable GPT disks for guests that start through UEFI (`--firmware ovmf`), built without root.

The disk is what a UEFI installer leaves: a protective MBR, the primary GPT (header at LBA 1,
128 entries from LBA 2) and its backup at the end of the disk, partition 1 an EFI System
Partition (FAT32) holding \\EFI\\BOOT\\BOOTX64.EFI (the removable-media path firmware boots
when it has no boot entries), and optionally partition 2 a Linux root file system image. The
loader is GRUB EFI, made by grub-mkimage with every module it needs built in and its prefix on
the ESP, where its grub.cfg boots /vmlinuz and /initrd.img on the serial console. The tools
(grub-efi-amd64-bin, grub-common, mtools, dosfstools) come from Debian's packages into corral's
cache, as bootdisk.py does for SYSLINUX; the shared steps (tools, FAT, layout, assembly) live
there.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from uuid import UUID

from corral.errors import ConfigError, HostError
from corral.images.bootdisk import (
    MIB,
    SECTOR,
    Partition,
    Toolset,
    assemble,
    check_boot_files,
    lay_out,
    make_fat,
    mbr,
    one_line,
    parse_mbr,
    run_tool,
    tool_env,
    tools_dir,
    workdir,
)

ESP_TYPE = UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
LINUX_FS_TYPE = UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
TYPE_PROTECTIVE = 0xEE  # the MBR entry that covers a GPT disk
GRUB_TOOLS = Toolset(
    "grub-efi-tools",
    # libdevmapper: grub-mkimage links it, and hosts without LVM lack it
    ("grub-efi-amd64-bin", "grub-common", "mtools", "dosfstools", "libdevmapper1.02.1"),
    "debian-uefi",
)
GRUB_MODULES = (
    "part_gpt part_msdos fat ext2 normal linux configfile search search_fs_file search_fs_uuid "
    "search_label echo serial terminal terminfo test ls cat boot gzio sleep halt reboot efi_gop"
).split()
PREFIX = "/EFI/BOOT"  # on the device GRUB was loaded from: the ESP
LEAST_ESP_MIB = 40  # FAT32 needs 65525 clusters: 32 MiB of 512-byte ones, and its FATs
ENTRIES, ENTRY_SIZE = 128, 128
ENTRY_SECTORS = ENTRIES * ENTRY_SIZE // SECTOR  # 32
MAX_NAME = 36  # UTF-16 code units in an entry's name
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # 92 bytes: UEFI spec 5.3.2
_ENTRY = struct.Struct("<16s16sQQQ72s")
SIGNATURE, REVISION = b"EFI PART", 0x00010000
MIN_SECTORS = 2 * (2 + ENTRY_SECTORS)  # MBR, two headers, two entry arrays, one usable sector


@dataclass(frozen=True)
class GptPartition:
    start: int  # bytes, a multiple of SECTOR
    size: int  # bytes, a multiple of SECTOR
    type: UUID
    guid: UUID
    name: str = ""
    attributes: int = 0


def _name_bytes(name: str) -> bytes:
    if not re.fullmatch(r"[^\x00-\x1f\x7f]*", name):
        raise ConfigError(f"GPT partition name {name!r} has control characters: use printable ones")
    raw = name.encode("utf-16-le", errors="surrogatepass")
    if len(raw) > 2 * MAX_NAME:
        raise ConfigError(f"GPT partition name {name!r} is longer than {MAX_NAME} UTF-16 units")
    return raw.ljust(72, b"\0")


def gpt(disk_size: int, parts: list[GptPartition], disk_guid: UUID) -> list[tuple[int, bytes]]:
    """The (offset, bytes) pieces of a GPT disk of `disk_size` bytes: the protective MBR, the
    primary header and entries, the backup entries and header at the last LBA."""
    if disk_size % SECTOR or disk_size < (MIN_SECTORS) * SECTOR:
        raise ConfigError(f"a GPT disk of {disk_size} bytes is too small or not whole sectors")
    last = disk_size // SECTOR - 1
    first_usable, last_usable = 2 + ENTRY_SECTORS, last - 1 - ENTRY_SECTORS
    if len(parts) > ENTRIES:
        raise ConfigError(f"a GPT holds {ENTRIES} partitions here, not {len(parts)}")
    entries = bytearray(ENTRIES * ENTRY_SIZE)
    end = first_usable
    for i, p in enumerate(parts):
        lo, n = p.start // SECTOR, p.size // SECTOR
        if p.start % SECTOR or p.size % SECTOR or n <= 0 or lo < end or lo + n - 1 > last_usable:
            raise ConfigError(
                f"GPT partition {i + 1} is not sector-aligned, empty, overlaps or is off the disk"
            )
        _ENTRY.pack_into(
            entries,
            i * ENTRY_SIZE,
            p.type.bytes_le,
            p.guid.bytes_le,
            lo,
            lo + n - 1,
            p.attributes,
            _name_bytes(p.name),
        )
        end = lo + n
    ecrc = zlib.crc32(entries)

    def header(mine: int, alt: int, entries_lba: int) -> bytes:
        fields = [SIGNATURE, REVISION, _HEADER.size, 0, 0, mine, alt, first_usable, last_usable]
        tail = [disk_guid.bytes_le, entries_lba, ENTRIES, ENTRY_SIZE, ecrc]
        crc = zlib.crc32(_HEADER.pack(*fields, *tail))
        fields[3] = crc
        return _HEADER.pack(*fields, *tail).ljust(SECTOR, b"\0")

    protective = mbr(b"", [Partition(SECTOR, min(last, 0xFFFFFFFE) * SECTOR, TYPE_PROTECTIVE)])
    return [
        (0, protective),
        (SECTOR, header(1, last, 2)),
        (2 * SECTOR, bytes(entries)),
        ((last - ENTRY_SECTORS) * SECTOR, bytes(entries)),
        (last * SECTOR, header(last, 1, last - ENTRY_SECTORS)),
    ]


def _bad(what: str) -> ConfigError:
    return ConfigError(f"not a valid GPT disk: {what}")


def _read(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise _bad(f"it ends before byte {offset + size}")
    return data


def _header(f: BinaryIO, lba: int, disk_sectors: int) -> tuple[tuple, bytes]:
    raw = _read(f, lba * SECTOR, _HEADER.size)
    h = _HEADER.unpack(raw)
    sig, _rev, hsize, crc, _res, mine, _alt, first, last_usable, _g, elba, count, esize, _ecrc = h
    if sig != SIGNATURE or hsize != _HEADER.size:
        raise _bad(f"no EFI PART header of {_HEADER.size} bytes at LBA {lba}")
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:]) != crc:
        raise _bad(f"the header at LBA {lba} fails its CRC32")
    if mine != lba or esize != ENTRY_SIZE or not 0 < count <= 4 * ENTRIES:
        raise _bad(f"the header at LBA {lba} names LBA {mine}, {count} entries of {esize} bytes")
    if not first <= last_usable < disk_sectors or elba >= disk_sectors:
        raise _bad(f"the header at LBA {lba} points past the disk's {disk_sectors} sectors")
    entries = _read(f, elba * SECTOR, count * esize)
    if zlib.crc32(entries) != h[13]:
        raise _bad(f"the partition entries of the header at LBA {lba} fail their CRC32")
    return h, entries


def parse_gpt(f: BinaryIO) -> tuple[UUID, list[GptPartition]]:
    """The disk GUID and the partitions of the GPT disk open in `f`, as firmware checks them:
    a protective MBR, the primary header and its backup at the last LBA, every CRC32 right."""
    size = f.seek(0, 2)
    sectors = size // SECTOR
    if sectors < MIN_SECTORS:
        raise _bad(f"{size} bytes is too small")
    pm = parse_mbr(_read(f, 0, SECTOR))
    if [p.type for p in pm] != [TYPE_PROTECTIVE] or pm[0].start != SECTOR:
        raise _bad("sector 0 is not a protective MBR (one 0xEE entry from LBA 1)")
    primary, entries = _header(f, 1, sectors)
    if primary[6] != sectors - 1:
        raise _bad(f"the backup header is at LBA {primary[6]}, not the last LBA {sectors - 1}")
    backup, backup_entries = _header(f, sectors - 1, sectors)
    if backup[6] != 1 or backup[7:10] != primary[7:10] or backup_entries != entries:
        raise _bad("the backup header or entries differ from the primary ones")
    parts = []
    for i in range(primary[11]):
        t, g, lo, hi, attrs, name = _ENTRY.unpack_from(entries, i * ENTRY_SIZE)
        if t == bytes(16):
            continue
        if not primary[7] <= lo <= hi <= primary[8]:
            raise _bad(f"entry {i + 1} spans LBA {lo}-{hi}, outside the usable {primary[7]}-{primary[8]}")
        text = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        parts.append(
            GptPartition(lo * SECTOR, (hi - lo + 1) * SECTOR, UUID(bytes_le=t), UUID(bytes_le=g), text, attrs)
        )
    return UUID(bytes_le=primary[9]), parts


def grub_cfg(append: str, initrd: bool, title: str = "Debian GNU/Linux (corral)") -> str:
    """A grub.cfg that shows its menu on the serial line and the screen for a second, then boots
    /vmlinuz (+ /initrd.img) from the ESP with `append`. Each word is single-quoted, so GRUB's
    script parser takes $ ; { } literally; quotes and backslashes are refused, as GRUB's linux
    command hands them to the kernel backslash-escaped (measured under OVMF)."""
    one_line(append + title, "grub.cfg")
    if re.search(r"['\"\\]", append + title):
        raise ConfigError("a kernel command line or title for grub.cfg cannot hold quotes or backslashes")
    args = " ".join(f"'{w}'" for w in append.split())
    lines = [
        "serial --unit=0 --speed=115200",
        "terminal_input serial console",
        "terminal_output serial console",
        "set timeout=1",
        "set default=0",
        f"menuentry '{title}' {{",
        "  echo 'Loading /vmlinuz ...'",
        f"  linux /vmlinuz {args}",
        *(["  initrd /initrd.img"] if initrd else []),
        "}",
    ]
    return "\n".join(lines) + "\n"


def check_libraries(tools: Path, exe: str) -> None:
    """The shared libraries `exe` (from the tools) needs are all found: ldd, with the tools'
    own library directories first; else one line naming what is missing."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise HostError("ldd not found: corral's disk images need a glibc host (Debian's libc-bin)")
    env = dict(os.environ, LD_LIBRARY_PATH=tool_env(tools)["LD_LIBRARY_PATH"], LC_ALL="C")
    path = tools / "root" / "usr" / "bin" / exe
    res = subprocess.run([ldd, str(path)], env=env, capture_output=True, text=True, timeout=60)
    missing = sorted({ln.split()[0] for ln in res.stdout.splitlines() if "not found" in ln})
    if res.returncode or missing:
        raise ConfigError(
            f"{exe} cannot run on this host: it needs {', '.join(missing) or res.stderr.strip()}: "
            "install the Debian packages that hold them"
        )


def make_grub_efi(tools: Path, out: Path) -> None:
    """BOOTX64.EFI: GRUB for x86_64 UEFI with GRUB_MODULES built in and its prefix on the ESP."""
    check_libraries(tools, "grub-mkimage")
    moddir = tools / "root" / "usr" / "lib" / "grub" / "x86_64-efi"
    args = ["grub-mkimage", "-O", "x86_64-efi", "-d", str(moddir), "-p", PREFIX, "-o", str(out)]
    run_tool(tools, [*args, *GRUB_MODULES], "grub-mkimage")


def build_uefi_disk(
    out: Path,
    kernel: Path,
    initrd: Path | None,
    append: str,
    *,
    root: Path | None = None,
    esp_mib: int = 64,
    tools: Path | None = None,
    disk_guid: UUID | None = None,
) -> list[GptPartition]:
    """Write a UEFI-bootable GPT disk to `out` (replaced only once it is whole): partition 1 the
    ESP with GRUB EFI booting `kernel` (+ `initrd`) with `append`; partition 2 the file system
    image `root`, if given (the kernel finds it as /dev/vda2). Returns the partition entries."""
    check_boot_files(kernel, initrd, esp_mib, LEAST_ESP_MIB)
    cfg = grub_cfg(append, initrd is not None)
    spans = lay_out(esp_mib, root)
    parts = [GptPartition(*spans[0], ESP_TYPE, uuid.uuid4(), "EFI System Partition")]
    parts += [GptPartition(*span, LINUX_FS_TYPE, uuid.uuid4(), "root") for span in spans[1:]]
    size = spans[-1][0] + spans[-1][1] + MIB  # the backup GPT in the last MiB
    tables = gpt(size, parts, disk_guid or uuid.uuid4())
    tools = tools or tools_dir(toolset=GRUB_TOOLS)
    with workdir(out) as work:
        make_grub_efi(tools, work / "BOOTX64.EFI")
        (work / "grub.cfg").write_text(cfg)
        files = {"EFI/BOOT/BOOTX64.EFI": work / "BOOTX64.EFI", "EFI/BOOT/grub.cfg": work / "grub.cfg"}
        files["vmlinuz"] = kernel
        if initrd is not None:
            files["initrd.img"] = initrd
        esp = work / "esp.fat"
        make_fat(tools, esp, esp_mib, 32, "CORRALESP", files)
        images = [(parts[0].start, esp)] + ([(parts[1].start, root)] if root is not None else [])
        assemble(out, work, size, tables, images)
    return parts
