"""Files out of pinned Debian packages (corral.images.firmware_deb) and the firmware fallback
that uses them (corral.boot.firmware): crafted .debs, good and hostile, built here (ar + tar.xz,
as dpkg-deb writes them); no network."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from corral.boot import firmware
from corral.errors import ConfigError, FieldError
from corral.images import cache, firmware_deb
from corral.images.firmware_deb import PinnedDeb, check_deb, extracted, fetch_pinned, read_member

BIOS = bytes(range(256)) * 256  # 64 KiB: a size a BIOS image may have
MEMBER = "usr/share/seabios/bios-256k.bin"


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:xz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:  # type: ignore[call-overload]
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tar.addfile(info, io.BytesIO(e[1]))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def deb(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    return _ar(
        [
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", _tar([("./control", b"Package: x\n")])),
            ("data.tar.xz", _tar([tarfile.TarInfo("./usr"), *entries])),
        ]
    )


def pin_for(data: bytes, files: tuple[tuple[str, int], ...] = ((MEMBER, 256 << 10),)) -> PinnedDeb:
    return PinnedDeb("seabios", "1.0-1", "all", hashlib.sha256(data).hexdigest(), files)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_a_good_package_gives_exactly_its_file(tmp_path: Path):
    p = tmp_path / "good.deb"
    p.write_bytes(deb([("./usr/share/seabios/other.bin", b"x" * 10), (f"./{MEMBER}", BIOS)]))
    assert read_member(p, MEMBER, 256 << 10) == BIOS
    with pytest.raises(ConfigError, match="has no file usr/share/nothing"):
        read_member(p, "usr/share/nothing", 10)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (_link(f"./{MEMBER}", "/etc/shadow"), "is a link or special file"),
        (_link(f"./{MEMBER}", "./usr/share/x", tarfile.LNKTYPE), "is a link or special file"),
        (("./usr/../../etc/evil", b"x"), "entry outside its root"),
        (("/usr/share/seabios/bios-256k.bin", BIOS), "entry outside its root"),
    ],
)
def test_links_and_escaping_entries_are_refused(tmp_path: Path, entry, why: str):
    p = tmp_path / "bad.deb"
    p.write_bytes(deb([entry, (f"./{MEMBER}", BIOS)]))
    with pytest.raises(ConfigError, match=why):
        read_member(p, MEMBER, 256 << 10)


def test_an_oversize_member_is_refused_before_it_is_read(tmp_path: Path):
    p = tmp_path / "big.deb"
    p.write_bytes(deb([(f"./{MEMBER}", BIOS)]))
    with pytest.raises(ConfigError, match=f"is {len(BIOS)} bytes, more than 4096: refused"):
        read_member(p, MEMBER, 4096)


@pytest.mark.parametrize("cut", [4, 70, 200, -300])
def test_a_truncated_package_fails_with_one_line(tmp_path: Path, cut: int):
    whole = deb([(f"./{MEMBER}", BIOS)])
    p = tmp_path / "cut.deb"
    p.write_bytes(whole[:cut])
    with pytest.raises(ConfigError, match="fetch it again|not a Debian package") as info:
        read_member(p, MEMBER, 256 << 10)
    assert "\n" not in str(info.value)


def test_damaged_ar_headers_and_foreign_files_are_refused(tmp_path: Path):
    p = tmp_path / "x.deb"
    p.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(ConfigError, match="not a Debian package"):
        read_member(p, MEMBER, 10)
    whole = bytearray(deb([(f"./{MEMBER}", BIOS)]))
    whole[8 + 48 : 8 + 58] = b"-5        "  # debian-binary's size field
    p.write_bytes(bytes(whole))
    with pytest.raises(ConfigError, match="truncated|not a number"):
        read_member(p, MEMBER, 10)
    p.write_bytes(_ar([("debian-binary", b"2.0\n"), ("data.tar.zst", b"\x28\xb5\x2f\xfd")]))
    with pytest.raises(ConfigError, match="no data archive corral can read"):
        read_member(p, MEMBER, 10)
    p.write_bytes(_ar([("data.tar.xz", b"\xfd7zXZ\x00 not really")]))
    with pytest.raises(ConfigError, match="data.tar.xz cannot be read"):
        read_member(p, MEMBER, 10)


def test_the_checksum_decides_and_a_wrong_download_is_removed(cache_dir: Path, monkeypatch):
    data = deb([(f"./{MEMBER}", BIOS)])
    pin = pin_for(data)
    cached = cache.debs_dir() / pin.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data + b"tampered")
    fetched: list[list[str]] = []

    def fake_fetch(specs, dest, progress=True):  # the archive: apt-get download
        fetched.append(specs)
        (dest / pin.filename).write_bytes(data)
        return {specs[0]: dest / pin.filename}

    monkeypatch.setattr(firmware_deb, "fetch_debs", fake_fetch)
    with pytest.raises(ConfigError, match=r"is not Debian's seabios=1.0-1 \(SHA-256"):
        fetch_pinned(pin)
    assert not cached.exists() and fetched == []  # removed, so the next call fetches
    assert fetch_pinned(pin) == cached and fetched == [["seabios=1.0-1"]]
    check_deb(cached, pin)
    cached.unlink()
    cached.symlink_to(tmp := cache_dir / "elsewhere.deb")
    tmp.write_bytes(data)
    with pytest.raises(ConfigError, match="cannot be opened"):
        check_deb(cached, pin)  # a symlink in the cache is never followed


def test_extracted_files_are_cached_and_rechecked(cache_dir: Path, monkeypatch):
    data = deb([(f"./{MEMBER}", BIOS)])
    pin = pin_for(data)
    (cache.debs_dir()).mkdir(parents=True)
    (cache.debs_dir() / pin.filename).write_bytes(data)
    path = extracted(pin, MEMBER)
    assert path.read_bytes() == BIOS and path.parent == cache.image_dir(pin.entry)
    path.write_bytes(b"changed")  # damaged on disk: taken out again from the checked package
    assert extracted(pin, MEMBER).read_bytes() == BIOS
    with pytest.raises(ValueError):
        extracted(pin, "etc/passwd")


def test_seabios_falls_back_to_debians_package_when_not_installed(cache_dir: Path, monkeypatch, tmp_path):
    data = deb([(f"./{MEMBER}", BIOS)])
    pin = pin_for(data)
    monkeypatch.setitem(firmware_deb.PACKAGES, "seabios", pin)
    monkeypatch.setitem(firmware.KNOWN, "seabios", (str(tmp_path / "none.bin"),))
    offline = ConfigError("cannot reach the Debian package archive (Temporary failure resolving)")

    def no_network(specs, dest, progress=True):
        raise offline

    monkeypatch.setattr(firmware_deb, "fetch_debs", no_network)
    assert "fetched on first use" in firmware.source("seabios")
    with pytest.raises(
        FieldError, match="^firmware: seabios is not installed here and Debian's seabios=1.0-1 cannot"
    ):
        firmware.read_firmware("seabios")
    cache.debs_dir().mkdir(parents=True)
    (cache.debs_dir() / pin.filename).write_bytes(data)  # as a download leaves it
    assert firmware.read_firmware("seabios") == BIOS
    assert firmware.source("seabios").startswith("Debian's seabios=1.0-1 (cached in")
    (tmp_path / "none.bin").write_bytes(BIOS)
    assert firmware.source("seabios") == f"{tmp_path / 'none.bin'} (installed)"


def test_the_pins_name_real_files():
    for pin in firmware_deb.PACKAGES.values():
        assert len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0
        assert pin.filename.startswith(pin.package + "_") and pin.filename.endswith(f"_{pin.arch}.deb")
        assert all(not f.startswith("/") and ".." not in f for f, _ in pin.files)
