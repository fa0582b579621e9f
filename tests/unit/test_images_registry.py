"""Every image answers status/fetch/paths itself; `corral image` only loops over the registry."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from corral.cli import main
from corral.errors import ConfigError
from corral.images import cache, debian_image
from corral.images.registry import IMAGES, DebianImage, ImagePaths, ImageStatus, ProbeImage, get_image


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path / "cache"))

    def no_network(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(debian_image, "fetch_debs", no_network)
    monkeypatch.setattr(debian_image, "resolve_kernel_package", no_network)
    return tmp_path / "cache"


def fake_debian_entry():
    with cache.atomic_dir(debian_image.entry_dir()) as tmp:
        (tmp / "vmlinuz").write_bytes(b"bz" * 1000)
        (tmp / "vmlinux").write_bytes(b"\x7fELF" + bytes(3000))
        (tmp / "initrd.img").write_bytes(b"\x1f\x8b" + bytes(100))
        cache.write_manifest(tmp, "debian")
    return debian_image.entry_dir()


def test_kinds():
    assert isinstance(get_image("probe"), ProbeImage)
    assert isinstance(get_image("debian"), DebianImage) and isinstance(get_image("debian-pvh"), DebianImage)
    assert {img.name for img in IMAGES.values()} == set(IMAGES)


def test_status_before_and_after_fetch(cache_dir):
    assert get_image("probe").status() == ImageStatus(cached=None)
    assert get_image("debian").status() == ImageStatus(cached=False)
    d = fake_debian_entry()
    size = 2000 + 3004 + 102
    assert cache.entry_size(d) == size
    assert get_image("debian").status() == ImageStatus(cached=True, size=size)
    assert get_image("debian-pvh").status() == ImageStatus(cached=True, size=size)  # one shared entry


def test_paths_of_the_debian_images(cache_dir):
    for name in ("debian", "debian-pvh"):
        with pytest.raises(
            ConfigError, match=f"image '{name}' is not fetched: run `corral image fetch {name}`"
        ):
            get_image(name).paths()
    d = fake_debian_entry()
    assert get_image("debian").paths() == ImagePaths(d / "vmlinuz", d / "initrd.img", d / "vmlinux")
    assert get_image("debian-pvh").paths().kernel == d / "vmlinux"
    assert get_image("debian-pvh").resolve() == (d / "vmlinux", d / "initrd.img")
    (d / "initrd.img").write_bytes(b"changed")
    with pytest.raises(ConfigError, match="corrupt .*`corral image fetch debian-pvh --force`"):
        get_image("debian-pvh").paths()


def test_fetch_keeps_a_verified_entry(cache_dir):
    d = fake_debian_entry()
    assert get_image("debian").fetch() is True  # kept, no network
    res = CliRunner().invoke(main, ["image", "fetch", "debian"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [
        "corral: image 'debian' is already cached (verified); --force fetches it again",
        str(d / "vmlinuz"),
        str(d / "initrd.img"),
    ]


def test_fetch_failure_is_one_line(cache_dir, monkeypatch):
    def offline(*a, **k):
        raise ConfigError(
            "cannot reach the Debian package archive (offline): check the network or apt sources"
        )

    monkeypatch.setattr(debian_image, "resolve_kernel_package", offline)
    res = CliRunner().invoke(main, ["image", "fetch", "debian-pvh"])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        "corral: error: cannot reach the Debian package archive (offline): check the network or apt sources"
    ]
    assert get_image("debian-pvh").status() == ImageStatus(cached=False)
