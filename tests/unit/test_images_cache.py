"""corral's image cache: location, checksums, atomic entries; and the `corral image` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.cli import main
from corral.errors import ConfigError
from corral.images import cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CORRAL_CACHE", str(root))
    return root


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CORRAL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "corral"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "corral"
    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"
    assert cache.image_dir("debian") == tmp_path / "mine" / "images" / "debian"


def _fake_entry(name: str = "debian") -> Path:
    with cache.atomic_dir(cache.image_dir(name)) as tmp:
        (tmp / "vmlinuz").write_bytes(b"MZ" + b"\0" * 0x200 + b"HdrS" + bytes(1000))
        (tmp / "initrd.img").write_bytes(b"\x1f\x8b" + bytes(100))
        cache.write_manifest(tmp, name, {"kernel_version": "6.1.0-test"})
    return cache.image_dir(name)


def test_verify_catches_a_flipped_byte(cache_dir):
    d = _fake_entry()
    cache.verify(d, "debian")
    kernel = d / "vmlinuz"
    data = bytearray(kernel.read_bytes())
    data[0x203] ^= 0x01
    kernel.write_bytes(bytes(data))  # same size: only the hash can tell
    with pytest.raises(ConfigError) as exc:
        cache.verify(d, "debian")
    msg = str(exc.value)
    assert "cached kernel" in msg and "vmlinuz" in msg
    assert "is corrupt (checksum mismatch)" in msg
    assert "run `corral image fetch debian --force`" in msg
    assert "\n" not in msg


def test_verify_missing_file_and_missing_entry(cache_dir):
    d = _fake_entry()
    (d / "initrd.img").unlink()
    with pytest.raises(
        ConfigError,
        match=r"cached initramfs .*initrd.img is missing: run `corral image fetch debian --force`",
    ):
        cache.verify(d, "debian")
    with pytest.raises(
        ConfigError, match=r"image 'other' is not in the cache .*: run `corral image fetch other`"
    ):
        cache.verify(cache.image_dir("other"), "other")


def test_display_path_uses_tilde():
    assert cache.display_path(Path.home() / ".cache" / "corral" / "x") == "~/.cache/corral/x"
    assert cache.display_path(Path("/elsewhere/x")) == "/elsewhere/x"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_atomic_dir_failure_leaves_no_entry(cache_dir):
    final = cache.image_dir("debian")
    with pytest.raises(RuntimeError):
        with cache.atomic_dir(final) as tmp:
            (tmp / "vmlinuz").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not final.exists()
    assert _leftovers(final.parent) == []


def test_atomic_dir_failure_keeps_the_old_entry(cache_dir):
    d = _fake_entry()
    before = (d / "manifest.json").read_text()
    with pytest.raises(KeyboardInterrupt):
        with cache.atomic_dir(d) as tmp:
            (tmp / "vmlinuz").write_bytes(b"new")
            raise KeyboardInterrupt
    assert (d / "manifest.json").read_text() == before
    cache.verify(d, "debian")
    assert _leftovers(d.parent) == ["debian"]


def test_atomic_dir_success_replaces(cache_dir):
    d = _fake_entry()
    with cache.atomic_dir(d) as tmp:
        (tmp / "only").write_bytes(b"x")
    assert _leftovers(d) == ["only"]
    assert _leftovers(d.parent) == ["debian"]


def test_killed_writer_leftovers_are_swept(cache_dir):
    parent = cache.image_dir("debian").parent
    parent.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = parent / f".debian.tmp-{dead}-abc"
    (stale / "sub").mkdir(parents=True)
    mine = parent / f".debian.tmp-{os.getpid()}-xyz"
    mine.mkdir()
    _fake_entry()
    assert not stale.exists()
    assert mine.exists()  # a live process's temporary is not touched


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "f"
    with pytest.raises(TypeError):
        cache.atomic_write(target, object())  # type: ignore[arg-type]
    assert _leftovers(tmp_path) == []
    cache.atomic_write(target, b"ok")
    assert target.read_bytes() == b"ok" and _leftovers(tmp_path) == ["f"]


def test_debian_build_failure_leaves_no_entry(cache_dir, monkeypatch, tmp_path):
    """A failure in the middle of building the debian image leaves no cache entry."""
    from corral.images import debian_image

    def fake_extract(deb, dest):
        (dest / "boot").mkdir(parents=True)
        (dest / "boot" / "vmlinuz-6.1.0-99-cloud-amd64").write_bytes(b"bz")
        (dest / "lib" / "modules" / "6.1.0-99-cloud-amd64").mkdir(parents=True)
        (dest / "bin").mkdir()
        (dest / "bin" / "busybox").write_bytes(b"bb")
        return dest

    def broken_vmlinux(bz):
        raise ConfigError("simulated failure half-way")

    monkeypatch.setattr(debian_image, "extract_deb", fake_extract)
    monkeypatch.setattr(debian_image, "extract_vmlinux", broken_vmlinux)
    kdeb, bdeb = tmp_path / "k.deb", tmp_path / "b.deb"
    kdeb.write_bytes(b"k")
    bdeb.write_bytes(b"b")
    with pytest.raises(ConfigError, match="half-way"):
        debian_image.build(kdeb, bdeb, report=lambda m: None)
    assert not debian_image.entry_dir().exists()
    assert _leftovers(debian_image.entry_dir().parent) == []


# --- the CLI -------------------------------------------------------------------------------------


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("sub", [["path"], ["fetch"], ["build"], ["path", "--initrd"]])
def test_cli_unknown_image(sub, cache_dir):
    res = _run("image", *sub, "nosuch")
    assert res.exit_code == 2
    assert res.output.strip() == (
        "corral: error: no image named 'nosuch': "
        "choose one of debian, debian-disk, debian-pvh, debian-uefi, probe"
    )


def test_cli_path_not_fetched(cache_dir):
    res = _run("image", "path", "debian")
    assert res.exit_code == 1
    assert res.output.strip() == (
        "corral: error: image 'debian' is not fetched: run `corral image fetch debian`"
    )
    assert not cache_dir.exists() or not (cache_dir / "images" / "debian").exists()


def test_cli_path_and_corruption(cache_dir):
    d = _fake_entry()
    (d / "vmlinux").write_bytes(b"\x7fELF")
    cache.write_manifest(d, "debian")
    res = _run("image", "path", "debian")
    assert res.exit_code == 0, res.output
    assert res.output.split() == [str(d / "vmlinuz"), str(d / "initrd.img")]
    assert _run("image", "path", "debian", "--initrd").output.split() == [str(d / "initrd.img")]
    assert _run("image", "path", "debian", "--vmlinux").output.split() == [str(d / "vmlinux")]
    assert _run("image", "path", "debian-pvh").output.split() == [str(d / "vmlinux"), str(d / "initrd.img")]
    (d / "vmlinuz").write_bytes(b"corrupted!")
    res = _run("image", "path", "debian")
    assert res.exit_code == 1
    assert "is corrupt (checksum mismatch): run `corral image fetch debian --force`" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_cli_list(cache_dir):
    res = _run("image", "list")
    assert res.exit_code == 0, res.output
    assert "debian" in res.output and "probe" in res.output and "no" in res.output
    _fake_entry()
    res = _run("image", "list")
    assert "yes" in res.output and "MiB" in res.output
