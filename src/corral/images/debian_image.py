"""The `debian` image: Debian's cloud kernel plus a busybox initramfs that corral builds.

Cache entry images/debian/ (see cache.py) holds:
    vmlinuz      the cloud kernel's bzImage, as Debian ships it
    vmlinux      the ELF inside it (PVH entry note), for `debian-pvh`
    initrd.img   gzip newc: busybox, /init, the virtio/vsock modules (initramfs.py)
    manifest.json
The .deb files stay in debs/ so `corral image build debian` can rebuild offline.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.errors import ConfigError
from corral.images import cache
from corral.images.debian import extract_deb, fetch_debs, resolve_kernel_package
from corral.images.initramfs import build_initramfs
from corral.images.lz4legacy import extract_vmlinux

ENTRY = "debian"  # cache entry shared by `debian` and `debian-pvh`
FLAVOUR = "cloud"
BUSYBOX_PACKAGE = "busybox-static"

Report = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"corral: {msg}", file=sys.stderr, flush=True)


def entry_dir() -> Path:
    return cache.image_dir(ENTRY)


def is_cached() -> bool:
    return cache.read_manifest(entry_dir()) is not None


def cached_size() -> int | None:
    """Bytes the cache entry holds, or None when the image is not fetched."""
    return cache.entry_size(entry_dir()) if is_cached() else None


def ready_dir(image: str = ENTRY) -> Path:
    """The verified cache entry, without fetching: ConfigError naming the fix when it is absent
    or damaged (`image` is the name the fix names: debian or debian-pvh)."""
    if not is_cached():
        raise ConfigError(f"image '{image}' is not fetched: run `corral image fetch {image}`")
    cache.verify(entry_dir(), image)
    return entry_dir()


def ensure(progress: bool = True, report: Report = _stderr) -> Path:
    """The verified cache entry, fetched and built first if it is not there yet."""
    if not is_cached():
        report("fetching the debian image (first use): Debian's cloud kernel and busybox-static")
        fetch(progress=progress, report=report)
    cache.verify(entry_dir(), ENTRY)
    return entry_dir()


def fetch(force: bool = False, progress: bool = True, report: Report = _stderr) -> dict[str, Any]:
    """Download the packages and build the image; a no-op when a verified entry exists."""
    if not force and is_cached():
        return cache.verify(entry_dir(), ENTRY)  # a corrupt entry's error names --force
    kernel_pkg = resolve_kernel_package(FLAVOUR)
    debs = fetch_debs([kernel_pkg, BUSYBOX_PACKAGE], cache.debs_dir(), progress=progress)
    return build(debs[kernel_pkg], debs[BUSYBOX_PACKAGE], report=report)


def cached_debs() -> tuple[Path, Path]:
    """The kernel and busybox .debs the current entry was built from (or the newest in debs/)."""
    manifest = cache.read_manifest(entry_dir())
    ddir = cache.debs_dir()
    if manifest is not None:
        meta = manifest.get("meta", {})
        k, b = ddir / meta.get("kernel_deb", "-"), ddir / meta.get("busybox_deb", "-")
        if k.is_file() and b.is_file():
            return k, b
    kernels = sorted(ddir.glob("linux-image-*-cloud-amd64_*.deb")) if ddir.is_dir() else []
    busyboxes = sorted(ddir.glob(f"{BUSYBOX_PACKAGE}_*.deb")) if ddir.is_dir() else []
    if not kernels or not busyboxes:
        raise ConfigError(
            f"the debian image's packages are not in the cache ({cache.display_path(ddir)}): "
            "run `corral image fetch debian`"
        )
    return kernels[-1], busyboxes[-1]


def build(
    kernel_deb: Path | None = None, busybox_deb: Path | None = None, report: Report = _stderr
) -> dict[str, Any]:
    """(Re)build images/debian/ from the two .debs; the entry is replaced atomically."""
    if kernel_deb is None or busybox_deb is None:
        kernel_deb, busybox_deb = cached_debs()
    work = Path(tempfile.mkdtemp(prefix="corral-build-"))
    try:
        kroot = extract_deb(kernel_deb, work / "kernel")
        broot = extract_deb(busybox_deb, work / "busybox")
        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        moddirs = sorted((kroot / "lib" / "modules").glob("*"))
        busybox = broot / "bin" / "busybox"
        if not vmlinuz or not moddirs or not busybox.is_file():
            raise ConfigError(
                f"{kernel_deb.name} / {busybox_deb.name} do not look like a Debian "
                "kernel and busybox-static: run `corral image fetch debian --force`"
            )
        with cache.atomic_dir(entry_dir()) as tmp:
            shutil.copyfile(vmlinuz[-1], tmp / "vmlinuz")
            bz = (tmp / "vmlinuz").read_bytes()
            (tmp / "vmlinux").write_bytes(extract_vmlinux(bz))
            info = build_initramfs(moddirs[-1], busybox, tmp / "initrd.img")
            meta = {
                "kernel_package": kernel_deb.name.split("_")[0],
                "kernel_deb": kernel_deb.name,
                "kernel_deb_sha256": cache.sha256_file(kernel_deb),
                "busybox_deb": busybox_deb.name,
                "busybox_deb_sha256": cache.sha256_file(busybox_deb),
                "kernel_version": info.kernel_version,
                "modules": info.modules,
                "not_modular": info.skipped,
            }
            manifest = cache.write_manifest(tmp, ENTRY, meta)
        report(
            f"built the debian image: kernel {info.kernel_version}, {len(info.modules)} modules, "
            f"in {cache.display_path(entry_dir())}"
        )
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_bzimage() -> tuple[Path, Path | None]:
    d = ensure()
    return d / "vmlinuz", d / "initrd.img"


def resolve_pvh() -> tuple[Path, Path | None]:
    d = ensure()
    return d / "vmlinux", d / "initrd.img"
