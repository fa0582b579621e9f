"""Named guest images: `corral run --image NAME` resolves here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from corral.errors import ConfigError


@dataclass(frozen=True)
class Image:
    name: str
    description: str
    default_cmdline: str
    needs_hardware_virt: bool
    resolve: Callable[[], tuple[Path, Path | None]]


def _probe() -> tuple[Path, Path | None]:
    from corral.images.probe import build_probe

    return build_probe(), None


def _debian() -> tuple[Path, Path | None]:
    from corral.images.debian_image import resolve_bzimage

    return resolve_bzimage()


def _debian_pvh() -> tuple[Path, Path | None]:
    from corral.images.debian_image import resolve_pvh

    return resolve_pvh()


DEBIAN_CMDLINE = "console=ttyS0 panic=-1 reboot=acpi"

IMAGES: dict[str, Image] = {
    "probe": Image("probe", "corral's freestanding test kernel (PVH + Multiboot)", "hello", False, _probe),
    "debian": Image("debian", "Debian's cloud kernel (bzImage) + busybox initramfs with virtio/vsock",
                    DEBIAN_CMDLINE, True, _debian),
    "debian-pvh": Image("debian-pvh", "the same Debian cloud kernel as a PVH vmlinux (ELF)",
                        DEBIAN_CMDLINE, True, _debian_pvh),
}

# Images whose files live in corral's cache entry of this name (corral image list/fetch/path).
CACHED_ENTRY = {"debian": "debian", "debian-pvh": "debian"}


def get_image(name: str) -> Image:
    try:
        return IMAGES[name]
    except KeyError:
        known = ", ".join(sorted(IMAGES))
        raise ConfigError(f"no image named '{name}': choose one of {known}") from None
