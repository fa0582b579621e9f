"""Named guest images: `corral run --image NAME` resolves here.

Every image answers for itself (status, fetch, build, resolve, paths), so `corral image
list|fetch|build|path` are plain loops over the registry: the probe is built from its sources
on use, the Debian images come from one cache entry that is fetched and verified.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from corral.errors import ConfigError
from corral.images.probe import build_probe

DEBIAN_CMDLINE = "console=ttyS0 panic=-1 reboot=acpi"


@dataclass(frozen=True)
class ImageStatus:
    cached: bool | None  # None: built on use, there is nothing to fetch
    size: int = 0  # bytes in the cache, when cached


@dataclass(frozen=True)
class ImagePaths:
    kernel: Path  # the file booted: a kernel, or a disk image's disk (Image.boots_from_disk)
    initrd: Path | None = None
    vmlinux: Path | None = None  # the PVH ELF kernel beside a bzImage, where the image has one


class Image(ABC):
    """A named guest: what it is, and how to get it ready."""

    boots_from_disk = False  # a disk for --firmware (resolve() gives it as the "kernel"), not a kernel
    firmware: str | None = None  # what boots the disk, when boots_from_disk

    def __init__(self, name: str, description: str, default_cmdline: str, needs_hardware_virt: bool) -> None:
        self.name = name
        self.description = description
        self.default_cmdline = default_cmdline
        self.needs_hardware_virt = needs_hardware_virt

    @abstractmethod
    def status(self) -> ImageStatus:
        """Whether the image is in the cache (cheap: reads no image file)."""

    @abstractmethod
    def fetch(self, force: bool = False) -> bool:
        """Get the image ready (download, build); again even if cached when `force`. True when
        a verified cached copy was kept and nothing was done."""

    @abstractmethod
    def build(self) -> None:
        """Rebuild the image from what is already here, without the network."""

    @abstractmethod
    def paths(self) -> ImagePaths:
        """The files of the ready image, without fetching: ConfigError naming the fix when it
        is not fetched."""

    def resolve(self) -> tuple[Path, Path | None]:
        """(kernel, initrd) to boot, fetched or built first if needed."""
        self.fetch()
        p = self.paths()
        return p.kernel, p.initrd


class ProbeImage(Image):
    """corral's test guest, compiled from its sources (cached by their digest) on use."""

    def status(self) -> ImageStatus:
        return ImageStatus(cached=None)

    def fetch(self, force: bool = False) -> bool:
        build_probe(force=force)
        return False

    def build(self) -> None:
        build_probe(force=True)

    def paths(self) -> ImagePaths:
        return ImagePaths(build_probe())

    def resolve(self) -> tuple[Path, Path | None]:
        return build_probe(), None


def _debian() -> ModuleType:
    # the apt and initramfs code loads only when a Debian image is asked about: start-up time
    from corral.images import debian_image

    return debian_image


class DebianImage(Image):
    """Debian's cloud kernel + corral's busybox initramfs, from the shared `debian` cache entry;
    `kernel` names the file booted (vmlinuz: bzImage, vmlinux: PVH ELF)."""

    def __init__(self, name: str, description: str, kernel: str) -> None:
        super().__init__(name, description, DEBIAN_CMDLINE, needs_hardware_virt=True)
        self.kernel = kernel

    def status(self) -> ImageStatus:
        size = _debian().cached_size()
        return ImageStatus(cached=size is not None, size=size or 0)

    def fetch(self, force: bool = False) -> bool:
        was_cached = _debian().is_cached()
        _debian().fetch(force=force)
        return was_cached and not force

    def build(self) -> None:
        _debian().build()

    def paths(self) -> ImagePaths:
        d = _debian().ready_dir(self.name)
        return ImagePaths(d / self.kernel, d / "initrd.img", d / "vmlinux")

    def resolve(self) -> tuple[Path, Path | None]:
        d = _debian().ensure()
        return d / self.kernel, d / "initrd.img"


class DebianDiskImage(Image):
    """The `debian` kernel and initramfs on a BIOS-bootable MBR disk (SYSLINUX on a FAT
    partition, bootdisk.py): what `--firmware seabios` boots. `resolve()` gives (disk, None).
    Subclasses change the loader and the firmware; the cache entry works the same."""

    boots_from_disk = True
    firmware = "seabios"
    loader = "syslinux"

    def _dir(self) -> Path:
        from corral.images import cache

        return cache.image_dir(self.name)

    def _tools(self, force: bool) -> Path:
        from corral.images import bootdisk

        return bootdisk.tools_dir(force=force)

    def _write(self, out: Path, kernel: Path, initrd: Path, tools: Path) -> None:
        from corral.images import bootdisk

        bootdisk.build_bios_disk(out, kernel, initrd, DEBIAN_CMDLINE, tools=tools)

    def status(self) -> ImageStatus:
        from corral.images import cache

        cached = cache.read_manifest(self._dir()) is not None
        return ImageStatus(cached=cached, size=cache.entry_size(self._dir()) if cached else 0)

    def fetch(self, force: bool = False) -> bool:
        if self.status().cached and not force:
            self.paths()  # verified
            return True
        if force:
            _debian().fetch(force=True)
        self._tools(force)
        self.build()
        return False

    def build(self) -> None:
        from corral.images import cache

        d = _debian().ensure()
        tools = self._tools(False)
        with cache.atomic_dir(self._dir()) as tmp:
            self._write(tmp / "disk.img", d / "vmlinuz", d / "initrd.img", tools)
            cache.write_manifest(tmp, self.name, {"from": "debian", "loader": self.loader})

    def paths(self) -> ImagePaths:
        from corral.images import cache

        if cache.read_manifest(self._dir()) is None:
            raise ConfigError(f"image '{self.name}' is not fetched: run `corral image fetch {self.name}`")
        cache.verify(self._dir(), self.name)
        return ImagePaths(self._dir() / "disk.img")

    def resolve(self) -> tuple[Path, Path | None]:
        self.fetch()
        return self.paths().kernel, None


class DebianUefiImage(DebianDiskImage):
    """The `debian` kernel and initramfs on a GPT disk whose EFI System Partition holds GRUB EFI
    (uefidisk.py): what `--firmware ovmf` boots."""

    firmware = "ovmf"
    loader = "grub-efi"

    def _tools(self, force: bool) -> Path:
        from corral.images import bootdisk, uefidisk

        return bootdisk.tools_dir(toolset=uefidisk.GRUB_TOOLS, force=force)

    def _write(self, out: Path, kernel: Path, initrd: Path, tools: Path) -> None:
        from corral.images import uefidisk

        uefidisk.build_uefi_disk(out, kernel, initrd, DEBIAN_CMDLINE, tools=tools)


IMAGES: dict[str, Image] = {
    img.name: img
    for img in (
        ProbeImage("probe", "corral's freestanding test kernel (PVH + Multiboot)", "hello", False),
        DebianImage(
            "debian", "Debian's cloud kernel (bzImage) + busybox initramfs with virtio/vsock", "vmlinuz"
        ),
        DebianImage("debian-pvh", "the same Debian cloud kernel as a PVH vmlinux (ELF)", "vmlinux"),
        DebianDiskImage(
            "debian-disk",
            "the debian image on an MBR disk with SYSLINUX, for --firmware seabios",
            DEBIAN_CMDLINE,
            needs_hardware_virt=True,
        ),
        DebianUefiImage(
            "debian-uefi",
            "the debian image on a GPT disk with GRUB EFI on its ESP, for --firmware ovmf",
            DEBIAN_CMDLINE,
            needs_hardware_virt=True,
        ),
    )
}


def get_image(name: str) -> Image:
    try:
        return IMAGES[name]
    except KeyError:
        known = ", ".join(sorted(IMAGES))
        raise ConfigError(f"no image named '{name}': choose one of {known}") from None
