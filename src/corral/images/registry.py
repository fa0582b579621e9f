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


IMAGES: dict[str, Image] = {
    "probe": Image("probe", "corral's freestanding test kernel (PVH + Multiboot)", "hello", False, _probe),
}


def get_image(name: str) -> Image:
    try:
        return IMAGES[name]
    except KeyError:
        known = ", ".join(sorted(IMAGES))
        raise ConfigError(f"no image named '{name}': choose one of {known}") from None
