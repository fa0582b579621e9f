"""Kernel format detection and the entry points the VMM calls.

bzImage ("HdrS" at 0x202) boots with the Linux 64-bit protocol, or the 32-bit one when the
kernel has no 64-bit entry (an i386/686 kernel) or `prefer="linux32"`; an ELF with a PVH note boots
with PVH; otherwise a Multiboot header boots with Multiboot (v1). An ELF that has both a PVH note
and a Multiboot header boots with PVH unless `prefer="multiboot"`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from corral.boot._common import BootInfo
from corral.boot.elf import is_elf, load_pvh, parse_elf
from corral.errors import ConfigError, FieldError, KernelFormatError
from corral.memory import GuestMemory

__all__ = ["PROTOCOLS", "BootInfo", "load_kernel", "load_kernel_file", "read_boot_file"]

PROTOCOLS = ("linux64", "pvh", "multiboot", "linux32")


class _LoadArgs(TypedDict):
    """The keyword arguments every protocol's loader takes."""

    cmdline: str
    initrd: bytes | None
    rsdp_addr: int
    name: str


def load_kernel(
    mem: GuestMemory,
    kernel: bytes,
    *,
    cmdline: str = "",
    initrd: bytes | None = None,
    rsdp_addr: int = 0,
    prefer: str | None = None,
    name: str = "kernel",
    argv0: str = "",
    initrd_name: str = "initrd",
    modules: Sequence[tuple[bytes, str]] = (),
) -> BootInfo:
    """Load `kernel` (and `initrd`) into guest memory; return the protocol and boot CPU state.

    `name` describes the kernel in error messages (load_kernel_file passes the path). For a
    Multiboot kernel `argv0` starts its command line, `initrd_name` is the initrd module's
    string and `modules` are further (data, string) modules; other protocols take no modules.
    """
    if prefer is not None and prefer not in PROTOCOLS:
        raise ConfigError(f"unknown boot protocol {prefer!r}: choose one of {', '.join(PROTOCOLS)}")
    kernel = bytes(kernel)
    if not kernel:
        raise KernelFormatError(f"{name}: the kernel image is empty")
    if initrd is not None:
        initrd = bytes(initrd)
    args: _LoadArgs = {"cmdline": cmdline, "initrd": initrd, "rsdp_addr": rsdp_addr, "name": name}
    mb = {"argv0": argv0, "initrd_name": initrd_name, "modules": modules}

    def no_modules(protocol: str) -> None:
        if modules:
            raise FieldError(
                "modules", f"{name} boots with {protocol}: only a Multiboot kernel takes modules"
            )

    if is_elf(kernel):
        elf = parse_elf(kernel, name)
        pvh = elf.pvh_entry() is not None
        if prefer == "multiboot" or not pvh:
            # each other protocol's module is imported once its format is seen: a launch loads one
            from corral.boot.multiboot import find_header, load_multiboot

            header = find_header(kernel, name)
            if header is not None:
                return load_multiboot(mem, kernel, header, elf=elf, **args, **mb)  # type: ignore[arg-type]
        if pvh:
            no_modules("PVH")
            return load_pvh(mem, kernel, elf, **args)
        raise KernelFormatError(
            f"{name}: an ELF file with neither a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) nor a "
            f"Multiboot header: build Linux with CONFIG_PVH=y, or boot its bzImage"
        )
    from corral.boot.bzimage import is_bzimage, load_bzimage

    if is_bzimage(kernel):
        no_modules("the Linux boot protocol")
        return load_bzimage(mem, kernel, **args, prefer=prefer if prefer in ("linux64", "linux32") else None)
    from corral.boot.multiboot import find_header, load_multiboot

    header = find_header(kernel, name)
    if header is not None:
        return load_multiboot(mem, kernel, header, **args, **mb)  # type: ignore[arg-type]
    raise KernelFormatError(f"{name}: not a bzImage, an ELF with a PVH entry note, or a Multiboot kernel")


def load_kernel_file(
    mem: GuestMemory,
    path: str | Path,
    *,
    cmdline: str = "",
    initrd: str | Path | None = None,
    rsdp_addr: int = 0,
    prefer: str | None = None,
    modules: Sequence[tuple[str | Path, str]] = (),
) -> BootInfo:
    """Read the kernel (and initrd) files and load them; file problems become ConfigError.
    `modules`: (path, arguments) of Multiboot modules; each module's string is "PATH ARGS"."""
    kernel = _read_file(mem, path, "kernel", "a path to a bzImage, vmlinux or Multiboot ELF")
    initrd_data = None
    if initrd is not None:
        initrd_data = _read_file(mem, initrd, "initrd", "a path to an initramfs")
    mods = [
        (_read_file(mem, p, f"modules[{i}]", "a path to a file"), " ".join(x for x in (str(p), args) if x))
        for i, (p, args) in enumerate(modules)
    ]
    return load_kernel(
        mem,
        kernel,
        cmdline=cmdline,
        initrd=initrd_data,
        rsdp_addr=rsdp_addr,
        prefer=prefer,
        name=f"kernel file '{path}'",
        argv0=str(path),
        initrd_name=str(initrd) if initrd is not None else "initrd",
        modules=mods,
    )


def read_boot_file(mem: GuestMemory, path: str | Path, kind: str) -> bytes:
    """The kernel or initrd file (`kind`), checked as the loader checks it (fw_cfg serves it)."""
    hint = "a path to a bzImage, vmlinux or Multiboot ELF" if kind == "kernel" else "a path to a file"
    return _read_file(mem, path, kind, hint)


def _read_file(mem: GuestMemory, path: str | Path, kind: str, hint: str) -> bytes:
    """The file for config field `kind` (kernel, initrd); errors name the field, and the CLI
    shows them with its flag. Only a regular file is read: the open is non-blocking and the
    type checked first, so a FIFO or a device cannot hang or flood the VMM."""
    label = f"{kind} file '{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FieldError(kind, f"{label} does not exist: give {hint}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {label}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FieldError(kind, f"{label} is a directory: give {hint}")
        if not stat.S_ISREG(st.st_mode):
            raise FieldError(kind, f"{label} is not a regular file: give {hint}")
        if st.st_size > mem.size:
            raise ConfigError(
                f"{label} is {st.st_size} bytes, more than the guest's {mem.size} bytes of memory: "
                f"give the guest more memory"
            )
        with open(fd, "rb", closefd=False) as f:
            data = f.read(mem.size + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {label}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not data:
        raise FieldError(kind, f"{label} is empty: give {hint}")
    if len(data) > mem.size:
        raise ConfigError(f"{label} is larger than the guest's memory: give the guest more memory")
    return data
