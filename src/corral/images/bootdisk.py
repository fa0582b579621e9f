"""Bootable disk images for guests that start through a BIOS (`--firmware seabios`), built
without root.

The disk is what an installer leaves: an MBR whose boot code (SYSLINUX's mbr.bin) chains to the
active partition, partition 1 a FAT16 file system with SYSLINUX installed in it and a kernel, an
initramfs and a syslinux.cfg, and optionally partition 2 holding a given root file system image
(an ext4 made with `mkfs.ext4 -d`, as tests/lab builds one). Nothing is mounted: mkfs.fat, mcopy
and `syslinux --install` work on image files, and they come from Debian's packages (syslinux,
syslinux-common, mtools, dosfstools), fetched into corral's cache and run from there, so the host
needs none of them installed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from corral.errors import ConfigError
from corral.images import cache
from corral.images.debian import extract_deb, fetch_debs

TOOLS_ENTRY = "syslinux-tools"
TOOL_PACKAGES = ["syslinux", "syslinux-common", "mtools", "dosfstools"]
SECTOR = 512
MIB = 1 << 20
BOOT_START = MIB  # partition 1 at 1 MiB, as fdisk aligns
MBR_CODE = 440  # the boot code ends where the disk signature begins
TYPE_FAT16_LBA, TYPE_LINUX = 0x0E, 0x83
MAX_BOOT_MIB = 2048  # FAT16 with 32 KiB clusters holds at most 2 GiB
_ENTRY = struct.Struct("<B3sB3sII")
_CHS_LBA = b"\xfe\xff\xff"  # "use the LBA fields": what every modern partitioner writes


@dataclass(frozen=True)
class Partition:
    start: int  # bytes, a multiple of SECTOR
    size: int  # bytes, a multiple of SECTOR
    type: int
    active: bool = False


def mbr(boot_code: bytes, partitions: list[Partition]) -> bytes:
    """Sector 0 of a disk: `boot_code` (at most 440 bytes), up to four primary partitions and the
    0x55AA signature. Partitions must be sector-aligned, in order and within 2 TiB (32-bit LBA)."""
    if len(boot_code) > MBR_CODE:
        raise ConfigError(f"MBR boot code is {len(boot_code)} bytes: at most {MBR_CODE} fit")
    if len(partitions) > 4:
        raise ConfigError("an MBR holds at most four primary partitions")
    sector = bytearray(SECTOR)
    sector[: len(boot_code)] = boot_code
    end = SECTOR
    for i, p in enumerate(partitions):
        if p.start % SECTOR or p.size % SECTOR or p.size <= 0 or p.start < end:
            raise ConfigError(f"partition {i + 1} is not sector-aligned, empty or overlaps the one before")
        lba, count = p.start // SECTOR, p.size // SECTOR
        if lba + count > 0xFFFFFFFF:
            raise ConfigError(f"partition {i + 1} ends past 2 TiB: an MBR cannot address it")
        entry = _ENTRY.pack(0x80 if p.active else 0, _CHS_LBA, p.type, _CHS_LBA, lba, count)
        sector[446 + 16 * i : 462 + 16 * i] = entry
        end = p.start + p.size
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def parse_mbr(sector: bytes) -> list[Partition]:
    """The partitions an MBR lists (empty entries left out): what a BIOS boot loader sees."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        raise ConfigError("not an MBR: sector 0 does not end in 0x55AA")
    out = []
    for i in range(4):
        flag, _chs, ptype, _chs_end, lba, count = _ENTRY.unpack_from(sector, 446 + 16 * i)
        if ptype and count:
            out.append(Partition(lba * SECTOR, count * SECTOR, ptype, flag == 0x80))
    return out


def tools_dir(progress: bool = True) -> Path:
    """SYSLINUX, mtools and dosfstools from Debian's packages, unpacked in corral's cache
    (fetched the first time; the .debs stay in the cache's debs/ like the kernel's)."""
    entry = cache.image_dir(TOOLS_ENTRY)
    if cache.read_manifest(entry) is not None:
        cache.verify(entry, TOOLS_ENTRY)
        return entry
    debs = fetch_debs(TOOL_PACKAGES, cache.debs_dir(), progress=progress)
    with cache.atomic_dir(entry) as tmp:
        for pkg in TOOL_PACKAGES:
            extract_deb(debs[pkg], tmp / "root")
        cache.write_manifest(tmp, TOOLS_ENTRY, {"debs": sorted(p.name for p in debs.values())})
    return entry


def _run(tools: Path, args: list[str], what: str) -> None:
    root = tools / "root"
    env = {
        "PATH": os.pathsep.join(str(root / d) for d in ("usr/bin", "sbin", "usr/sbin", "bin")),
        "MTOOLS_SKIP_CHECK": "1",  # an image file has no drive geometry to check
        "LC_ALL": "C",
    }
    exe = shutil.which(args[0], path=env["PATH"])
    if exe is None:
        raise ConfigError(f"{args[0]} is missing from {root}: run `corral image fetch debian-disk --force`")
    res = subprocess.run([exe, *args[1:]], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise ConfigError(f"{what} failed: {detail[-1] if detail else f'exit {res.returncode}'}")


def syslinux_cfg(append: str, initrd: bool, serial: str = "0 115200") -> str:
    """A configuration that boots /vmlinuz at once, its console on the first serial port."""
    if "\n" in append or "\r" in append:
        raise ConfigError("a kernel command line for syslinux.cfg must be one line")
    lines = [
        f"SERIAL {serial}",
        "PROMPT 0",
        "TIMEOUT 0",
        "DEFAULT linux",
        "LABEL linux",
        "  KERNEL /vmlinuz",
        *(["  INITRD /initrd.img"] if initrd else []),
        f"  APPEND {append}",
    ]
    return "\n".join(lines) + "\n"


def build_bios_disk(
    out: Path,
    kernel: Path,
    initrd: Path | None,
    append: str,
    *,
    root: Path | None = None,
    boot_mib: int = 64,
    tools: Path | None = None,
) -> list[Partition]:
    """Write a BIOS-bootable MBR disk to `out` (replaced only once it is whole): partition 1
    FAT16 with SYSLINUX booting `kernel` (+ `initrd`) with `append`; partition 2 the file system
    image `root`, if given (the kernel finds it as /dev/vda2). Returns the partition table."""
    if not 16 <= boot_mib <= MAX_BOOT_MIB:
        raise ConfigError(f"the boot partition must be 16 to {MAX_BOOT_MIB} MiB, not {boot_mib}")
    needed = kernel.stat().st_size + (initrd.stat().st_size if initrd else 0)
    if needed > (boot_mib - 2) * MIB:
        raise ConfigError(
            f"kernel and initramfs ({needed >> 20} MiB) do not fit a {boot_mib} MiB boot partition"
        )
    tools = tools or tools_dir()
    syslinux = tools / "root" / "usr" / "lib" / "syslinux"
    parts = [Partition(BOOT_START, boot_mib * MIB, TYPE_FAT16_LBA, active=True)]
    if root is not None:
        size = -(-root.stat().st_size // MIB) * MIB
        parts.append(Partition(BOOT_START + boot_mib * MIB, size, TYPE_LINUX))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bootdisk-", dir=out.parent))
    try:
        fat = work / "boot.fat"
        with open(fat, "wb") as f:
            f.truncate(boot_mib * MIB)
        _run(tools, ["mkfs.fat", "-F", "16", "-n", "CORRALBOOT", str(fat)], "mkfs.fat")
        (work / "syslinux.cfg").write_text(syslinux_cfg(append, initrd is not None))
        shutil.copyfile(kernel, work / "vmlinuz")
        files = [work / "syslinux.cfg", work / "vmlinuz"]
        if initrd is not None:
            shutil.copyfile(initrd, work / "initrd.img")
            files.append(work / "initrd.img")
        files.append(syslinux / "modules" / "bios" / "ldlinux.c32")
        _run(tools, ["mcopy", "-i", str(fat), *map(str, files), "::/"], "copying the kernel onto the FAT")
        _run(tools, ["syslinux", "--install", str(fat)], "syslinux --install")
        disk = work / "disk.img"
        end = parts[-1].start + parts[-1].size
        with open(disk, "wb") as d:
            d.truncate(end)
            d.write(mbr((syslinux / "mbr" / "mbr.bin").read_bytes()[:MBR_CODE], parts))
            _copy_sparse(fat, d, parts[0].start)
            if root is not None:
                _copy_sparse(root, d, parts[1].start)
        os.replace(disk, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return parts


def _copy_sparse(src: Path, dst: BinaryIO, offset: int) -> None:
    """Copy `src` into the open file `dst` at `offset`, leaving runs of zeroes as holes."""
    chunk = MIB
    with open(src, "rb") as f:
        pos = 0
        while data := f.read(chunk):
            if data.count(0) != len(data):
                dst.seek(offset + pos)
                dst.write(data)
            pos += len(data)
