"""Firmware boot: a PC BIOS image (SeaBIOS) instead of corral's direct kernel boot.

Why: disk images made by installers, boot loaders and old systems start from the BIOS, not
from a kernel handed over by the VMM. The PC does it this way, and so does QEMU:

* the image is mapped read-only so that it ends at 4 GiB (the CPU's reset vector, 0xFFFFFFF0,
  is its last 16 bytes); the vCPU starts there, in real mode with CS base 0xFFFF0000 and IP
  0xFFF0, which is the state KVM gives a new vCPU;
* its last 128 KiB also appear at 0xE0000-0xFFFFF (the "isa-bios" alias). On a real chipset
  the PAM registers decide whether that range reads the ROM or shadow RAM; corral keeps it RAM
  and copies the ROM's tail there at power-on, so the guest reads the same bytes, and SeaBIOS,
  which unlocks it through the i440FX PAM registers, copies itself there from the 4 GiB alias
  and locks it again, finds RAM that takes writes only while PAM allows them
  (devices/pci/i440fx.py: each segment a KVM slot, read-only while locked);
* everything else SeaBIOS learns from fw_cfg (RAM, CPUs, e820, boot order, sercon port, corral's
  ACPI tables with their loader script and its SMBIOS tables) and the CMOS memory-size registers.

The image is a file from the operator (`--firmware PATH`) or `seabios`, Debian's build; it is
opened like a kernel (no symlink followed, no FIFO, a regular file) and its size is bounded.
`seabios` and `ovmf` are the host's installed files when it has them; otherwise the files come
out of Debian's package, pinned by version and SHA-256 (corral.images.firmware_deb), fetched
into corral's cache on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from corral.arch.x86 import layout
from corral.config import OVMF
from corral.errors import ConfigError, FieldError
from corral.files import Refused, open_checked
from corral.memory import GuestMemory

# what `--firmware NAME` means: the first file of each list that exists
KNOWN: dict[str, tuple[str, ...]] = {
    "seabios": ("/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/bios-256k.bin"),
}
ISA_BIOS_SIZE = 128 * layout.KiB  # the ROM's tail seen below 1 MiB
ISA_BIOS_END = 0x10_0000
MIN_SIZE = 64 * layout.KiB
# the ROM ends at 4 GiB and must stay clear of KVM's real-mode TSS and identity map below it
MAX_SIZE = 256 * layout.KiB
ROM_ALIGN = 64 * layout.KiB
HINT = "give `seabios` or a BIOS image (64 KiB to 256 KiB, a multiple of 64 KiB)"


def from_debian(name: str, index: int = 0) -> Path:
    """File `index` of those corral takes from Debian's pinned `name` package (seabios, ovmf),
    from corral's cache (fetched the first time); FieldError naming both ways out when it cannot
    be had. (Imported here: a launch with installed firmware never loads the package reader.)"""
    from corral.images import firmware_deb

    pin = firmware_deb.PACKAGES[name]
    try:
        return firmware_deb.extracted(pin, pin.files[index][0])
    except ConfigError as exc:
        raise FieldError(
            "firmware",
            f"{name} is not installed here and Debian's {pin.spec} cannot be had ({exc}): install "
            f"Debian's `{name}` package, or give the image's path",
        ) from None


def resolve(spec: str) -> Path:
    """The image file `spec` names: a known firmware's file on this host (else Debian's, from
    corral's cache), or a path."""
    if spec in KNOWN:
        for candidate in KNOWN[spec]:
            if os.path.exists(candidate):
                return Path(candidate)
        return from_debian(spec)
    return Path(spec)


def source(name: str) -> str:
    """Where `--firmware name` (seabios, ovmf) takes its files from now: for `corral doctor`."""
    if name in KNOWN:
        found = next((c for c in KNOWN[name] if os.path.exists(c)), None)
    else:
        found = next((c for c, v in OVMF_FILES if os.path.exists(c) and os.path.exists(v)), None)
    if found is not None:
        return f"{found} (installed)"
    from corral.images import cache, firmware_deb

    pin = firmware_deb.PACKAGES[name]
    entry = cache.image_dir(pin.entry)
    where = "cached in" if cache.read_manifest(entry) is not None else "fetched on first use into"
    return f"Debian's {pin.spec} ({where} {cache.display_path(entry)})"


def read_firmware(spec: str) -> bytes:
    """The BIOS image `spec` names, checked: a regular file (not followed through a symlink,
    never a FIFO or a device) of a size a PC can map below 4 GiB."""
    return _read_checked(resolve(spec), "firmware", MIN_SIZE, MAX_SIZE, ROM_ALIGN, "firmware")


def _read_checked(path: Path, field: str, low: int, high: int, align: int, what: str) -> bytes:
    label = f"{what} file '{path}'"
    hint = HINT if field == "firmware" else f"it must be {low} to {high} bytes, a multiple of {align}"
    try:
        fd = open_checked(path)
    except Refused as exc:
        raise FieldError(field, f"{what} file {exc}: {hint}") from None
    try:
        st = os.fstat(fd)
        if not low <= st.st_size <= high or st.st_size % align:
            raise FieldError(field, f"{label} is {st.st_size} bytes: {hint}")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(high + 1)
    except OSError as exc:
        raise FieldError(field, f"{label} cannot be read ({exc.strerror}): {hint}") from None
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise FieldError(field, f"{label} changed while it was read: {hint}")
    return data


def rom_base(image: bytes) -> int:
    """Where the image starts: it ends at 4 GiB."""
    return layout.MMIO_HOLE_END - len(image)


def load_shadow(memory: GuestMemory, image: bytes) -> None:
    """Power-on contents of 0xE0000-0xFFFFF: the image's last 128 KiB (or all of a smaller
    one, ending at 1 MiB), as the isa-bios alias shows them before the BIOS unlocks PAM."""
    tail = image[-ISA_BIOS_SIZE:]
    memory.write(ISA_BIOS_END - len(tail), tail)


# --- boot order ---------------------------------------------------------------------------------
# `bootorder` (fw_cfg) lists OpenFirmware device paths, one a line, as QEMU writes them. A
# virtio-blk disk is /pci@i0cf8/scsi@SLOT[,FUNCTION]/disk@0,0 (QEMU names the function by its
# PCI class, SCSI storage, and the disk "disk@0,0"). SeaBIOS matches its own glob,
# /pci@i0cf8/*@SLOT[,FUNCTION], as a prefix that must end at a '/' (slot 1 never matches 0x10);
# OVMF reads the "scsi" and "disk" node names literally. Numbers are hex, function 0 omitted.
PCI_ROOT_PATH = "/pci@i0cf8"


def virtio_blk_boot_path(slot: int, function: int = 0) -> str:
    """The bootorder line of a virtio-blk disk at 00:slot.function."""
    if not (0 <= slot < 32 and 0 <= function < 8):
        raise ValueError(f"PCI 00:{slot:x}.{function:x} is not a device address")
    fn = f",{function:x}" if function else ""
    return f"{PCI_ROOT_PATH}/scsi@{slot:x}{fn}/disk@0,0"


# --- a kernel booted by the firmware (QEMU's -kernel with a BIOS) --------------------------------
# SeaBIOS runs the option ROMs fw_cfg lists under genroms/; QEMU's linuxboot_dma.bin reads the
# kernel's real-mode setup, its protected-mode part, the command line and the initrd from fw_cfg
# into the addresses fw_cfg gives and enters the setup code in real mode, as a boot loader would.
LINUXBOOT_ROMS = ("/usr/share/qemu/linuxboot_dma.bin", "/usr/share/seabios/linuxboot_dma.bin")
LINUXBOOT_NAME = "genroms/linuxboot_dma.bin"
OPTION_ROM_MAX = 64 * layout.KiB
REAL_ADDR, CMDLINE_ADDR, PROT_ADDR = 0x10000, 0x20000, 0x100000  # QEMU's, for protocol >= 2.02
LOADER_TYPE = 0xB0  # type_of_loader QEMU writes
ACPI_RESERVE = 128 * layout.KiB  # QEMU keeps the initrd below this much at the top of low RAM


@dataclass(frozen=True)
class LinuxBoot:
    """What fw_cfg serves the linuxboot option ROM: each part and where it goes."""

    rom: bytes
    setup: bytes  # the real-mode part with its header filled in, as a boot loader fills it
    kernel: bytes  # the protected-mode part
    cmdline: bytes  # NUL-terminated
    initrd: bytes
    setup_addr: int = REAL_ADDR
    kernel_addr: int = PROT_ADDR
    cmdline_addr: int = CMDLINE_ADDR
    initrd_addr: int = 0


def linuxboot_rom() -> bytes:
    """QEMU's linuxboot_dma.bin from this host, checked like a firmware file."""
    for candidate in LINUXBOOT_ROMS:
        if os.path.exists(candidate):
            return _read_checked(
                Path(candidate), "kernel", 512, OPTION_ROM_MAX, 512, "the linuxboot option ROM"
            )
    raise FieldError(
        "kernel",
        f"booting a kernel through the firmware needs QEMU's linuxboot_dma.bin ({LINUXBOOT_ROMS[0]}): "
        "install Debian's qemu-system-data package, or boot the kernel without --firmware",
    )


def linux_boot(kernel: bytes, initrd: bytes | None, cmdline: str, mem_size: int, name: str) -> LinuxBoot:
    """A bzImage split and its header filled in as QEMU does for firmware boot; other kernels
    (PVH, Multiboot) are refused with one line."""
    hint = "with --firmware, give a bzImage (or boot this kernel without --firmware)"
    if len(kernel) < 0x240 or kernel[0x202:0x206] != b"HdrS":
        raise FieldError("kernel", f"{name} is not a bzImage: {hint}")
    version = int.from_bytes(kernel[0x206:0x208], "little")
    if version < 0x202 or not kernel[0x211] & 1:
        raise FieldError("kernel", f"{name} uses boot protocol {version:#x} without LOADED_HIGH: {hint}")
    setup_len = ((kernel[0x1F1] or 4) + 1) * 512
    if setup_len >= len(kernel) or setup_len > CMDLINE_ADDR - REAL_ADDR:
        raise FieldError("kernel", f"{name}: its setup_sects ({kernel[0x1F1]}) do not fit the file: {hint}")
    cmd = cmdline.encode() + b"\0"
    cmd_max = int.from_bytes(kernel[0x238:0x23C], "little") if version >= 0x206 else 255
    if len(cmd) - 1 > cmd_max or len(cmd) > layout.CMDLINE_MAX:
        raise FieldError("cmdline", f"{len(cmd) - 1} bytes is longer than {name} takes ({cmd_max})")
    setup = bytearray(kernel[:setup_len])
    prot = kernel[setup_len:]
    below_4g = min(mem_size, layout.MMIO_HOLE_START)
    if PROT_ADDR + len(prot) > below_4g:
        raise FieldError("kernel", f"{name} does not fit in the guest's memory: give it more memory")
    setup[0x210] = LOADER_TYPE
    setup[0x211] |= 0x80  # CAN_USE_HEAP
    setup[0x224:0x226] = (CMDLINE_ADDR - REAL_ADDR - 0x200).to_bytes(2, "little")  # heap_end_ptr
    setup[0x228:0x22C] = CMDLINE_ADDR.to_bytes(4, "little")  # cmd_line_ptr
    rd = initrd or b""
    initrd_addr = 0
    if rd:
        rd_max = int.from_bytes(kernel[0x22C:0x230], "little") if version >= 0x203 else 0x37FF_FFFF
        top = min(rd_max, below_4g - ACPI_RESERVE - 1)
        initrd_addr = (top - len(rd)) & ~0xFFF
        if initrd_addr < PROT_ADDR + len(prot):
            raise FieldError(
                "initrd", f"the initrd ({len(rd)} bytes) does not fit below {top:#x}: give more memory"
            )
        setup[0x218:0x21C] = initrd_addr.to_bytes(4, "little")
        setup[0x21C:0x220] = len(rd).to_bytes(4, "little")
    return LinuxBoot(linuxboot_rom(), bytes(setup), prot, cmd, rd, initrd_addr=initrd_addr)


# --- OVMF (UEFI): a CFI flash pair instead of one ROM ------------------------------------------
# As QEMU maps OVMF's split build: the code bank (OVMF_CODE, read-only) ends at 4 GiB, the
# variables bank (a copy of OVMF_VARS, writable) lies right below it, and OVMF finds its variable
# store at the start of the pair (devices/legacy/pflash.py). Its code's last 128 KiB also show at
# 0xE0000 as SeaBIOS's do. Debian's `ovmf` package has the 4 MiB pair.
OVMF_FILES: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/qemu/OVMF_CODE_4M.fd", "/usr/share/qemu/OVMF_VARS_4M.fd"),
)
FLASH_BLOCK = 4 * layout.KiB
OVMF_CODE_MAX = 8 * layout.MiB - 64 * layout.KiB
OVMF_VARS_MAX = 1 * layout.MiB
FLASH_PAIR_MAX = 8 * layout.MiB  # the pair stays above the LAPIC page (0xFEE00000)


@dataclass(frozen=True)
class Ovmf:
    """OVMF's two banks and where each starts: `vars_path` None keeps the variables in memory
    only (a fresh copy of the template each boot)."""

    code: bytes
    vars_template: bytes
    vars_path: Path | None

    @property
    def code_base(self) -> int:
        return layout.MMIO_HOLE_END - len(self.code)

    @property
    def vars_base(self) -> int:
        return self.code_base - len(self.vars_template)


def is_ovmf(spec: str | None) -> bool:
    """Whether `--firmware spec` asks for OVMF (`ovmf` or `ovmf,vars=PATH`)."""
    return spec is not None and (spec == "ovmf" or spec.startswith("ovmf,"))


def read_ovmf(spec: str) -> Ovmf:
    """OVMF's code and variables template from this host, checked like a firmware file, with
    the variables file `spec` names (`ovmf,vars=PATH`)."""
    vars_text = OVMF.parse(spec)["vars"] if "," in spec else None
    for code_path, vars_path in OVMF_FILES:
        if os.path.exists(code_path) and os.path.exists(vars_path):
            break
    else:  # not installed: Debian's pinned package, from corral's cache
        code_path, vars_path = str(from_debian("ovmf", 0)), str(from_debian("ovmf", 1))
    code = _read_checked(
        Path(code_path), "firmware", 64 * layout.KiB, OVMF_CODE_MAX, FLASH_BLOCK, "OVMF code"
    )
    template = _read_checked(
        Path(vars_path), "firmware", FLASH_BLOCK, OVMF_VARS_MAX, FLASH_BLOCK, "OVMF vars"
    )
    if len(code) + len(template) > FLASH_PAIR_MAX:
        raise FieldError(
            "firmware", f"OVMF's code and variables are more than {FLASH_PAIR_MAX} bytes together"
        )
    return Ovmf(code, template, Path(vars_text) if isinstance(vars_text, str) else None)


def rom_image(spec: str) -> bytes:
    """The image whose tail shows at 0xE0000: the BIOS, or OVMF's code bank."""
    return read_ovmf(spec).code if is_ovmf(spec) else read_firmware(spec)


__all__ = [
    "KNOWN",
    "LINUXBOOT_NAME",
    "OVMF_FILES",
    "LinuxBoot",
    "Ovmf",
    "from_debian",
    "is_ovmf",
    "linux_boot",
    "load_shadow",
    "read_firmware",
    "read_ovmf",
    "resolve",
    "rom_base",
    "rom_image",
    "source",
    "virtio_blk_boot_path",
]
