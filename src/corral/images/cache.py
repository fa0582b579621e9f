"""corral's on-disk cache of guest images and the packages they are built from.

Layout (root: $CORRAL_CACHE, else $XDG_CACHE_HOME/corral, else ~/.cache/corral):

    debs/                   .deb files as `apt-get download` names them
    images/<name>/          one directory per built image, replaced as a whole
        manifest.json       sha256 + size of every file below, and how it was built
        vmlinuz, initrd.img, vmlinux, ...

Every entry appears atomically: it is built in a hidden temporary sibling (".<name>.tmp-<pid>-...")
and renamed into place, so an interrupted fetch or build leaves either the old entry or none.
Temporaries left by a killed process are swept on the next write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from corral.cachedir import cache_root as cache_root  # (where it lived before)
from corral.errors import ConfigError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_TMP_MARK = ".tmp-"

# What the error message calls each file.
FILE_LABELS = {"vmlinuz": "kernel", "vmlinux": "kernel", "initrd.img": "initramfs"}


def debs_dir() -> Path:
    return cache_root() / "debs"


def image_dir(name: str) -> Path:
    return cache_root() / "images" / name


def display_path(path: Path) -> str:
    """The path with the home directory shown as ~ (for messages)."""
    try:
        return "~/" + str(Path(path).relative_to(Path.home()))
    except ValueError:
        return str(path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tmp_name(final: Path) -> str:
    return f".{final.name}{_TMP_MARK}{os.getpid()}-"


def sweep_stale(parent: Path) -> None:
    """Remove temporaries in `parent` left behind by processes that no longer exist."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        if not name.startswith(".") or _TMP_MARK not in name:
            continue
        pid_text = name.split(_TMP_MARK, 1)[1].split("-", 1)[0]
        try:
            pid = int(pid_text)
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `final` if the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary is removed and `final` is left
    as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(final), dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_name(final), dir=final.parent))
            os.rename(final, old / "old")
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old / "old", final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _temp_file_beside(path: Path) -> Iterator[tuple[int, str]]:
    """(fd, name) of a new temporary file in `path`'s directory; removed if the block raises."""
    fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path), dir=path.parent)
    try:
        yield fd, tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temp_file_beside(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)


def atomic_move(src: Path, dest: Path) -> None:
    """Move a file into place atomically (copying first when src is on another filesystem)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError:
        with _temp_file_beside(dest) as (fd, tmp):
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        os.unlink(src)


# --- manifests -----------------------------------------------------------------------------------


def write_manifest(directory: Path, image: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every regular file in `directory` (but the manifest) and write manifest.json."""
    files = {}
    for p in sorted(Path(directory).iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "image": image, "files": files, "meta": meta or {}}
    atomic_write(Path(directory) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest, or None when the entry does not exist (or has an unreadable manifest)."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or "files" not in data:
        return None
    return data


def _fix(image: str) -> str:
    return f"run `corral image fetch {image} --force`"


def verify(directory: Path, image: str | None = None) -> dict[str, Any]:
    """Re-hash every file the manifest names; raise ConfigError naming the fix on any mismatch."""
    directory = Path(directory)
    image = image or directory.name
    manifest = read_manifest(directory)
    if manifest is None:
        raise ConfigError(
            f"image '{image}' is not in the cache ({display_path(directory)}): "
            f"run `corral image fetch {image}`"
        )
    for fname, info in manifest["files"].items():
        path = directory / fname
        label = FILE_LABELS.get(fname, "file")
        if not path.is_file():
            raise ConfigError(f"cached {label} {display_path(path)} is missing: {_fix(image)}")
        if path.stat().st_size != info.get("size") or sha256_file(path) != info.get("sha256"):
            raise ConfigError(
                f"cached {label} {display_path(path)} is corrupt (checksum mismatch): {_fix(image)}"
            )
    return manifest


def entry_size(directory: Path) -> int:
    manifest = read_manifest(directory)
    if manifest is None:
        return 0
    return sum(int(info.get("size", 0)) for info in manifest["files"].values())
