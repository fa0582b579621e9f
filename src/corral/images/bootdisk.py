"""Bootable disk images for guests that start through a BIOS (`--firmware seabios`), built
without root, and the pieces every boot disk shares (uefidisk.py builds the GPT/UEFI one from
them): the tools' cache entry, a FAT built from files, the partition layout, the assembly.

The disk is what an installer leaves: an MBR whose boot code (SYSLINUX's mbr.bin) chains to the
active partition, partition 1 a FAT16 file system with SYSLINUX installed in it and a kernel, an
initramfs and a syslinux.cfg, and optionally partition 2 holding a given root file system image
(an ext4 made with `mkfs.ext4 -d`, as tests/lab builds one). Nothing is mounted: mkfs.fat, mcopy
and `syslinux --install` work on image files, and they come from Debian's packages (syslinux,
syslinux-common, mtools, dosfstools), fetched into corral's cache and run from there, so the host
needs none of them installed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
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
MAX_ROOT_GIB = 1024  # a root image up to 1 TiB: the disk stays inside an MBR's 2 TiB
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


@dataclass(frozen=True)
class Toolset:
    """Host tools a disk build runs, from Debian's packages unpacked into one cache entry."""

    entry: str  # cache entry under images/
    packages: tuple[str, ...]
    image: str  # the image whose `corral image fetch NAME --force` fetches them again


SYSLINUX_TOOLS = Toolset("syslinux-tools", tuple(TOOL_PACKAGES), "debian-disk")
_TOOLSETS: dict[str, Toolset] = {SYSLINUX_TOOLS.entry: SYSLINUX_TOOLS}


def tools_dir(progress: bool = True, toolset: Toolset = SYSLINUX_TOOLS, force: bool = False) -> Path:
    """The toolset's packages (SYSLINUX, mtools and dosfstools by default) unpacked in corral's
    cache (fetched the first time or when `force`; the .debs stay in the cache's debs/ like the
    kernel's)."""
    _TOOLSETS.setdefault(toolset.entry, toolset)
    entry = cache.image_dir(toolset.entry)
    if not force and cache.read_manifest(entry) is not None:
        cache.verify(entry, toolset.image)
        return entry
    debs = fetch_debs(list(toolset.packages), cache.debs_dir(), progress=progress)
    with cache.atomic_dir(entry) as tmp:
        for pkg in toolset.packages:
            extract_deb(debs[pkg], tmp / "root")
        cache.write_manifest(tmp, toolset.entry, {"debs": sorted(p.name for p in debs.values())})
    return entry


def _fix(tools: Path) -> str:
    ts = _TOOLSETS.get(tools.name)
    return f"run `corral image fetch {ts.image} --force`" if ts else f"delete {tools} and build again"


def tool_env(tools: Path) -> dict[str, str]:
    """The environment a tool from `tools` runs in: its own bin directories and libraries only."""
    root = tools / "root"
    return {
        "PATH": os.pathsep.join(str(root / d) for d in ("usr/bin", "sbin", "usr/sbin", "bin")),
        "LD_LIBRARY_PATH": os.pathsep.join(str(root / d) for d in _LIB_DIRS),
        "MTOOLS_SKIP_CHECK": "1",  # an image file has no drive geometry to check
        "LC_ALL": "C",
    }


_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


def run_tool(tools: Path, args: list[str], what: str) -> None:
    """Run `args[0]` from `tools` on image files; its failure is one ConfigError line."""
    env = tool_env(tools)
    exe = shutil.which(args[0], path=env["PATH"])
    if exe is None:
        raise ConfigError(f"{args[0]} is missing from {tools / 'root'}: {_fix(tools)}")
    res = subprocess.run([exe, *args[1:]], env=env, capture_output=True, text=True, timeout=300)
    if res.returncode:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise ConfigError(f"{what} failed: {detail[-1] if detail else f'exit {res.returncode}'}")


def one_line(append: str, where: str) -> str:
    """A kernel command line as a boot loader's configuration takes it: one line."""
    if "\n" in append or "\r" in append:
        raise ConfigError(f"a kernel command line for {where} must be one line")
    return append


def check_boot_files(kernel: Path, initrd: Path | None, boot_mib: int, least_mib: int = 16) -> None:
    """The boot partition's size is sane and holds the kernel and initramfs with room to spare."""
    if not least_mib <= boot_mib <= MAX_BOOT_MIB:
        raise ConfigError(f"the boot partition must be {least_mib} to {MAX_BOOT_MIB} MiB, not {boot_mib}")
    needed = kernel.stat().st_size + (initrd.stat().st_size if initrd else 0)
    if needed > (boot_mib - 2) * MIB:
        raise ConfigError(
            f"kernel and initramfs ({needed >> 20} MiB) do not fit a {boot_mib} MiB boot partition"
        )


def lay_out(boot_mib: int, root: Path | None) -> list[tuple[int, int]]:
    """(start, size) in bytes of the boot partition at 1 MiB and, after it, one for `root`
    (rounded up to whole MiB, at most MAX_ROOT_GIB)."""
    spans = [(BOOT_START, boot_mib * MIB)]
    if root is not None:
        size = root.stat().st_size
        if not 0 < size <= MAX_ROOT_GIB << 30:
            raise ConfigError(
                f"the root image {root} is {size >> 20} MiB: give a file system image of "
                f"1 byte to {MAX_ROOT_GIB} GiB"
            )
        spans.append((BOOT_START + boot_mib * MIB, -(-size // MIB) * MIB))
    return spans


def make_fat(tools: Path, fat: Path, mib: int, bits: int, label: str, files: dict[str, Path]) -> None:
    """A FAT`bits` file system image of `mib` MiB at `fat` holding `files` ({path on the FAT:
    source}, directories made as needed), built with mkfs.fat, mmd and mcopy: nothing mounted."""
    with open(fat, "wb") as f:
        f.truncate(mib * MIB)
    run_tool(tools, ["mkfs.fat", "-F", str(bits), "-n", label, str(fat)], "mkfs.fat")
    made: set[str] = set()
    for dest in files:
        parts = dest.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in made:
                run_tool(tools, ["mmd", "-i", str(fat), f"::/{d}"], f"making {d} on the FAT")
                made.add(d)
    for dest, src in files.items():
        run_tool(tools, ["mcopy", "-i", str(fat), str(src), f"::/{dest}"], f"copying {dest} onto the FAT")


@contextlib.contextmanager
def workdir(out: Path) -> Iterator[Path]:
    """A scratch directory beside `out` (the disk is renamed into place from it), removed after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bootdisk-", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def assemble(
    out: Path, work: Path, size: int, blobs: list[tuple[int, bytes]], images: list[tuple[int, Path]]
) -> None:
    """Write a `size`-byte disk: `blobs` (partition tables) and file system `images` at their
    byte offsets, the rest holes; it replaces `out` only once it is whole."""
    disk = work / "disk.img"
    with open(disk, "wb") as d:
        d.truncate(size)
        for offset, data in blobs:
            d.seek(offset)
            d.write(data)
        for offset, src in images:
            _copy_sparse(src, d, offset)
    os.replace(disk, out)


def syslinux_cfg(append: str, initrd: bool, serial: str = "0 115200") -> str:
    """A configuration that boots /vmlinuz at once, its console on the first serial port."""
    one_line(append, "syslinux.cfg")
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
    check_boot_files(kernel, initrd, boot_mib)
    one_line(append, "syslinux.cfg")
    tools = tools or tools_dir()
    syslinux = tools / "root" / "usr" / "lib" / "syslinux"
    spans = lay_out(boot_mib, root)
    parts = [Partition(*spans[0], TYPE_FAT16_LBA, active=True)]
    parts += [Partition(*span, TYPE_LINUX) for span in spans[1:]]
    with workdir(out) as work:
        fat = work / "boot.fat"
        (work / "syslinux.cfg").write_text(syslinux_cfg(append, initrd is not None))
        files = {"syslinux.cfg": work / "syslinux.cfg", "vmlinuz": kernel}
        if initrd is not None:
            files["initrd.img"] = initrd
        files["ldlinux.c32"] = syslinux / "modules" / "bios" / "ldlinux.c32"
        make_fat(tools, fat, boot_mib, 16, "CORRALBOOT", files)
        run_tool(tools, ["syslinux", "--install", str(fat)], "syslinux --install")
        code = (syslinux / "mbr" / "mbr.bin").read_bytes()[:MBR_CODE]
        end = parts[-1].start + parts[-1].size
        images = [(parts[0].start, fat)] + ([(parts[1].start, root)] if root is not None else [])
        assemble(out, work, end, [(0, mbr(code, parts))], images)
    return parts


def _copy_sparse(src: Path, dst: BinaryIO, offset: int) -> None:
    """Copy `src` into the open file `dst` at `offset`, only its data: holes (SEEK_DATA) and
    runs of zeroes stay holes, so a large sparse root image costs what it holds."""
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(f.fileno(), pos, os.SEEK_DATA)
                hole = os.lseek(f.fileno(), pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    return
                hole = size  # a file system without SEEK_DATA: read it all
            f.seek(pos)
            while pos < hole:
                data = f.read(min(MIB, hole - pos))
                if not data:
                    return
                if data.count(0) != len(data):
                    dst.seek(offset + pos)
                    dst.write(data)
                pos += len(data)
