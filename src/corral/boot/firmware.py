"""Firmware boot: a PC BIOS image (SeaBIOS) instead of corral's direct kernel boot.

Why: disk images made by installers, boot loaders and old systems start from the BIOS, not
from a kernel handed over by the VMM. The PC does it this way, and so does QEMU:

* the image is mapped read-only so that it ends at 4 GiB (the CPU's reset vector, 0xFFFFFFF0,
  is its last 16 bytes); the vCPU starts there, in real mode with CS base 0xFFFF0000 and IP
  0xFFF0, which is the state KVM gives a new vCPU;
* its last 128 KiB also appear at 0xE0000-0xFFFFF (the "isa-bios" alias). On a real chipset
  the PAM registers decide whether that range reads the ROM or shadow RAM; corral keeps it RAM
  and copies the ROM's tail there at power-on, so the guest reads the same bytes, and SeaBIOS,
  which copies itself from the 4 GiB alias into shadow RAM and then locks it through the i440FX
  PAM registers, finds RAM to write (see devices/pci/i440fx.py);
* everything else SeaBIOS learns from fw_cfg (RAM, CPUs, e820, boot order, sercon port) and the
  CMOS memory-size registers.

The image is a file from the operator (`--firmware PATH`) or `seabios`, Debian's build; it is
opened like a kernel (no symlink followed, no FIFO, a regular file) and its size is bounded.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from corral.arch.x86 import layout
from corral.errors import FieldError
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


def resolve(spec: str) -> Path:
    """The image file `spec` names: a known firmware's file on this host, or a path."""
    if spec in KNOWN:
        for candidate in KNOWN[spec]:
            if os.path.exists(candidate):
                return Path(candidate)
        raise FieldError(
            "firmware",
            f"{spec}: none of {', '.join(KNOWN[spec])} exists: install Debian's `{spec}` package, "
            f"or give the image's path",
        )
    return Path(spec)


def read_firmware(spec: str) -> bytes:
    """The BIOS image `spec` names, checked: a regular file (not followed through a symlink,
    never a FIFO or a device) of a size a PC can map below 4 GiB."""
    path = resolve(spec)
    label = f"firmware file '{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FieldError("firmware", f"{label} does not exist: {HINT}") from None
    except OSError as exc:
        why = "is a symbolic link" if os.path.islink(path) else f"cannot be read ({exc.strerror})"
        raise FieldError("firmware", f"{label} {why}: {HINT}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FieldError("firmware", f"{label} is not a regular file: {HINT}")
        if not MIN_SIZE <= st.st_size <= MAX_SIZE or st.st_size % ROM_ALIGN:
            raise FieldError("firmware", f"{label} is {st.st_size} bytes: {HINT}")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise FieldError("firmware", f"{label} cannot be read ({exc.strerror}): {HINT}") from None
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise FieldError("firmware", f"{label} changed while it was read: {HINT}")
    return data


def rom_base(image: bytes) -> int:
    """Where the image starts: it ends at 4 GiB."""
    return layout.MMIO_HOLE_END - len(image)


def load_shadow(memory: GuestMemory, image: bytes) -> None:
    """Power-on contents of 0xE0000-0xFFFFF: the image's last 128 KiB (or all of a smaller
    one, ending at 1 MiB), as the isa-bios alias shows them before the BIOS unlocks PAM."""
    tail = image[-ISA_BIOS_SIZE:]
    memory.write(ISA_BIOS_END - len(tail), tail)


__all__ = ["KNOWN", "load_shadow", "read_firmware", "resolve", "rom_base"]
