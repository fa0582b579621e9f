"""Single files out of pinned Debian packages: firmware (SeaBIOS, OVMF) when the host has none
installed, and guest programs the tests boot (memtest86+).

Why not `dpkg-deb -x`: these files are read by the VMM itself (a BIOS image, a flash bank), so
they are taken from a package whose bytes are pinned by SHA-256 (apt's signatures then do not
matter: the checksum is the trust), and only the one file wanted is written, by a reader that
bounds everything a crafted package could inflate: the .deb's size, its ar members, the number
of tar entries, the member's size. A member that is a link, an absolute path or a path with
`..` is refused, never followed.

    deb = fetch_pinned(SEABIOS)                        # <cache>/debs/seabios_1.16.2-1_all.deb
    data = read_member(deb, "usr/share/seabios/bios-256k.bin", 256 << 10)
    path = extracted(SEABIOS, "usr/share/seabios/bios-256k.bin")   # cached, checksummed
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import quote

from corral.errors import ConfigError
from corral.images import cache
from corral.images.debian import fetch_debs

MAX_DEB = 64 << 20  # the largest package we take apart (OVMF's is 7.5 MiB)
MAX_MEMBER = 32 << 20  # the largest file we take out of one
MAX_ENTRIES = 20_000  # tar entries looked at before giving up
AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60
DATA_MODES: dict[str, Literal["r|xz", "r|gz", "r|bz2", "r|"]] = {
    "data.tar.xz": "r|xz",
    "data.tar.gz": "r|gz",
    "data.tar.bz2": "r|bz2",
    "data.tar": "r|",
}


@dataclass(frozen=True)
class PinnedDeb:
    """One version of one Debian package, known by its SHA-256 (from the archive's Packages
    list), and the files corral takes from it with their size limits."""

    package: str
    version: str
    arch: str
    sha256: str
    files: tuple[tuple[str, int], ...]  # (path in the package, most bytes it may have)

    @property
    def spec(self) -> str:
        return f"{self.package}={self.version}"

    @property
    def filename(self) -> str:
        """The name `apt-get download` gives the .deb (the epoch's ':' quoted as %3a)."""
        return f"{self.package}_{quote(self.version, safe='+~.-')}_{self.arch}.deb"

    @property
    def entry(self) -> str:
        """Its directory under the cache's images/."""
        return f"deb-{self.package}-{self.version.replace(':', '_')}"


# Debian bookworm's builds, as `apt-cache show` lists them (Version, SHA256).
SEABIOS = PinnedDeb(
    "seabios",
    "1.16.2-1",
    "all",
    "08e5b3f761379f17a6051731cafa03e97686049e2cc1b8bdccc5a910646e2d8e",
    (("usr/share/seabios/bios-256k.bin", 256 << 10),),
)
OVMF = PinnedDeb(
    "ovmf",
    "2022.11-6+deb12u2",
    "all",
    "e73d3d1a8799f7f6fc16b73501d913edcdd86237556fbff30693e747e6dc262e",
    (("usr/share/OVMF/OVMF_CODE_4M.fd", 8 << 20), ("usr/share/OVMF/OVMF_VARS_4M.fd", 1 << 20)),
)
MEMTEST86 = PinnedDeb(
    "memtest86+",
    "6.10-4",
    "amd64",
    "76a2939452a8b7dba642c97a63e42b985b76eba51ea1330038957239d4a47154",
    (("boot/memtest86+x64.bin", 1 << 20),),
)
PACKAGES = {p.package: p for p in (SEABIOS, OVMF, MEMTEST86)}


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    with open(fd, "rb", closefd=False) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_deb(path: Path, pin: PinnedDeb) -> None:
    """Raise ConfigError unless `path` is a regular file (no symlink followed) of at most
    MAX_DEB bytes whose SHA-256 is the pinned one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{pin.filename} cannot be opened ({exc.strerror}): delete {path}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_DEB:
            raise ConfigError(f"{path} is not a package file of at most {MAX_DEB} bytes: delete it")
        digest = _sha256_fd(fd)
    finally:
        os.close(fd)
    if digest != pin.sha256:
        raise ConfigError(
            f"{path} is not Debian's {pin.spec} (SHA-256 {digest[:16]}..., expected "
            f"{pin.sha256[:16]}...): delete it and fetch again"
        )


def fetch_pinned(pin: PinnedDeb, *, progress: bool = True) -> Path:
    """The pinned package's .deb in the cache's debs/, downloaded with apt the first time and
    checked against its SHA-256 every time (a mismatching download is removed)."""
    path = cache.debs_dir() / pin.filename
    if not os.path.lexists(path):
        path = fetch_debs([pin.spec], cache.debs_dir(), progress=progress)[pin.spec]
    try:
        check_deb(path, pin)
    except ConfigError:
        if not path.is_symlink() and path.is_file():
            path.unlink()  # a later call fetches it again
        raise
    return path


# --- the bounded reader ---------------------------------------------------------------------------


def _ar_members(blob: bytes, name: str) -> dict[str, tuple[int, int]]:
    """{member name: (offset, size)} of a .deb's ar archive, every header checked."""
    if not blob.startswith(AR_MAGIC):
        raise ConfigError(f"{name} is not a Debian package (no ar header): delete it and fetch again")
    out: dict[str, tuple[int, int]] = {}
    pos = len(AR_MAGIC)
    while pos < len(blob) and len(out) < 16:
        header = blob[pos : pos + AR_HEADER]
        if len(header) < AR_HEADER or header[58:60] != b"`\n":
            raise ConfigError(f"{name} is truncated or damaged (ar header at {pos}): fetch it again")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{name}: ar member size at {pos} is not a number: fetch it again") from None
        start = pos + AR_HEADER
        if size < 0 or start + size > len(blob):
            raise ConfigError(f"{name} is truncated (an ar member runs past its end): fetch it again")
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        out[member] = (start, size)
        pos = start + size + (size & 1)
    return out


def _member_name(raw: str, deb: str) -> str:
    """A tar entry's path without its leading "./"; absolute paths and `..` are refused."""
    path = PurePosixPath(raw)
    if path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{deb} holds an entry outside its root ({raw!r}): refused")
    return "/".join(p for p in path.parts if p != ".")


def read_member(deb: Path, member: str, limit: int) -> bytes:
    """The contents of the regular file `member` (a path like usr/share/x) in the package's
    data archive, read within the bounds above."""
    name = deb.name
    try:
        fd = os.open(deb, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{deb} cannot be opened ({exc.strerror})") from None
    with open(fd, "rb") as f:
        blob = f.read(MAX_DEB + 1)
    if len(blob) > MAX_DEB:
        raise ConfigError(f"{name} is larger than {MAX_DEB} bytes: refused")
    members = _ar_members(blob, name)
    data = next((m for m in DATA_MODES if m in members), None)
    if data is None:
        raise ConfigError(f"{name} has no data archive corral can read ({', '.join(DATA_MODES)})")
    start, size = members[data]
    try:
        with tarfile.open(fileobj=io.BytesIO(blob[start : start + size]), mode=DATA_MODES[data]) as tar:
            for count, entry in enumerate(tar):
                if count >= MAX_ENTRIES:
                    break
                if _member_name(entry.name, name) != member:
                    continue
                if not entry.isfile():
                    raise ConfigError(f"{name}: {member} is a link or special file, not a file: refused")
                if entry.size > limit:
                    raise ConfigError(f"{name}: {member} is {entry.size} bytes, more than {limit}: refused")
                src = tar.extractfile(entry)
                content = src.read(limit + 1) if src is not None else b""
                if len(content) != entry.size:
                    raise ConfigError(f"{name} is truncated inside {member}: fetch it again")
                return content
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # lzma.LZMAError and zlib.error are OSError/ValueError subclasses or raised as such
        raise ConfigError(f"{name}: its {data} cannot be read ({exc}): fetch it again") from None
    raise ConfigError(f"{name} has no file {member}")


def extracted(pin: PinnedDeb, member: str, *, progress: bool = True) -> Path:
    """`member` of the pinned package as a file in corral's cache (images/<pin.entry>/), taken
    out once and re-checked against its manifest on every use."""
    limits = dict(pin.files)
    if member not in limits:
        raise ValueError(f"{member} is not one of the files taken from {pin.package}")
    entry = cache.image_dir(pin.entry)
    base = PurePosixPath(member).name
    if cache.read_manifest(entry) is not None:
        try:
            cache.verify(entry, pin.entry)
            return entry / base
        except ConfigError:
            pass  # changed on disk: take the files out of the checksummed package again
    deb = fetch_pinned(pin, progress=progress)
    with cache.atomic_dir(entry) as tmp:
        for path, limit in pin.files:
            (tmp / PurePosixPath(path).name).write_bytes(read_member(deb, path, limit))
        cache.write_manifest(tmp, pin.entry, {"deb": pin.filename, "sha256": pin.sha256})
    return entry / base


__all__ = [
    "MEMTEST86",
    "OVMF",
    "PACKAGES",
    "SEABIOS",
    "PinnedDeb",
    "check_deb",
    "extracted",
    "fetch_pinned",
    "read_member",
]
