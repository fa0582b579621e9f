"""Debian packages: apt error classification, apt-get download/dpkg-deb helpers, and (marked
`net`) a real end-to-end fetch and build of the debian image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from corral.errors import ConfigError
from corral.images import debian

HAVE_APT = shutil.which("apt-get") is not None and shutil.which("apt-cache") is not None
needs_apt = pytest.mark.skipif(not HAVE_APT, reason="not a Debian host (no apt-get)")

# Captured from apt-get 2.6 on Debian 12.
APT_CONNECT = """\
Ign:1 http://deb.debian.org/debian bookworm/main amd64 busybox-static amd64 1:1.35.0-4+deb12u1+b1
Err:1 http://deb.debian.org/debian bookworm/main amd64 busybox-static amd64 1:1.35.0-4+deb12u1+b1
  Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)
E: Failed to fetch http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb  Could not connect to 127.0.0.1:9 (127.0.0.1). - connect (111: Connection refused)
"""
APT_DNS = """\
Err:1 http://deb.debian.org/debian bookworm/main amd64 busybox-static amd64 1:1.35.0-4+deb12u1+b1
  Temporary failure resolving 'deb.debian.org'
E: Failed to fetch http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb  Temporary failure resolving 'deb.debian.org'
"""
APT_404 = """\
Err:1 http://deb.debian.org/debian bookworm/main amd64 busybox-static amd64 1:1.35.0-4
  404  Not Found [IP: 151.101.2.132 80]
E: Failed to fetch http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4_amd64.deb  404  Not Found [IP: 151.101.2.132 80]
"""
APT_UNKNOWN = "E: Unable to locate package nosuch-pkg\n"


def test_classify_apt_errors():
    assert debian.classify_apt_error(APT_CONNECT) == "network"
    assert debian.classify_apt_error(APT_DNS) == "network"
    assert debian.classify_apt_error(APT_404) == "stale"
    assert debian.classify_apt_error(APT_UNKNOWN) == "unknown-package"
    assert debian.classify_apt_error("E: No packages found\n") == "unknown-package"
    assert debian.classify_apt_error("E: something else\n") == "other"


def test_network_error_message():
    err = debian.apt_error(APT_DNS, ["busybox-static"])
    assert str(err) == (
        "cannot reach the Debian package archive (Temporary failure resolving "
        "'deb.debian.org'): check the network or apt sources"
    )
    err = debian.apt_error(APT_CONNECT, ["busybox-static"])
    assert str(err) == (
        "cannot reach the Debian package archive (Could not connect to 127.0.0.1:9 "
        "(127.0.0.1)): check the network or apt sources"
    )
    assert "nosuch-pkg" in str(debian.apt_error(APT_UNKNOWN, ["nosuch-pkg"]))
    assert "apt-get update" in str(debian.apt_error(APT_404, ["busybox-static"]))


@needs_apt
def test_fetch_debs_unreachable_archive(tmp_path, monkeypatch):
    """A real connection failure (apt pointed at a dead proxy): one clear line, nothing left."""
    conf = tmp_path / "apt.conf"
    conf.write_text(
        'Acquire::http::Proxy "http://127.0.0.1:9";\nAcquire::https::Proxy "http://127.0.0.1:9";\n'
        'Acquire::Retries "0";\n'
    )
    monkeypatch.setenv("APT_CONFIG", str(conf))
    if subprocess.run(["apt-cache", "show", "busybox-static"], capture_output=True).returncode != 0:
        pytest.skip("apt's package lists do not know busybox-static")
    dest = tmp_path / "debs"
    with pytest.raises(ConfigError) as exc:
        debian.fetch_debs(["busybox-static"], dest, progress=False)
    assert str(exc.value).startswith("cannot reach the Debian package archive (")
    assert str(exc.value).endswith("): check the network or apt sources")
    assert list(dest.iterdir()) == []


@needs_apt
def test_resolve_kernel_package():
    if subprocess.run(["apt-cache", "show", "linux-image-cloud-amd64"], capture_output=True).returncode:
        pytest.skip("apt's package lists do not know linux-image-cloud-amd64")
    cloud = debian.resolve_kernel_package("cloud")
    assert re.fullmatch(r"linux-image-\d+\.\d+\.\d+-\d+-cloud-amd64", cloud), cloud
    generic = debian.resolve_kernel_package("generic")
    assert re.fullmatch(r"linux-image-\d+\.\d+\.\d+-\d+-amd64", generic), generic
    assert debian.resolve_kernel_package(cloud) == cloud
    with pytest.raises(ConfigError, match="unknown kernel flavour 'rt'"):
        debian.resolve_kernel_package("rt")


def _make_deb(tmp_path, name: str, files: dict[str, bytes]):
    root = tmp_path / f"src-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test\n"
    )
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    deb = tmp_path / f"{name}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True
    )
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="no dpkg-deb")
def test_extract_deb_new_and_merge(tmp_path):
    a = _make_deb(tmp_path, "pkg-a", {"usr/bin/a": b"A", "etc/shared": b"from a"})
    b = _make_deb(tmp_path, "pkg-b", {"usr/bin/b": b"B", "etc/shared": b"from b"})
    root = tmp_path / "root"
    assert debian.extract_deb(a, root) == root
    assert (root / "usr/bin/a").read_bytes() == b"A"
    debian.extract_deb(b, root)  # merges, like dpkg-deb -x
    assert (root / "usr/bin/a").read_bytes() == b"A" and (root / "usr/bin/b").read_bytes() == b"B"
    assert (root / "etc/shared").read_bytes() == b"from b"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"not a deb")
    with pytest.raises(ConfigError, match="cannot unpack bad.deb"):
        debian.extract_deb(bad, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# --- the real thing --------------------------------------------------------------------------------


@pytest.mark.net
@needs_apt
def test_fetch_and_build_debian_image(tmp_path, monkeypatch):
    """Fetch Debian's cloud kernel and busybox-static for real and build the image."""
    from corral.images import cache, debian_image
    from corral.images.initramfs import parse_cpio

    monkeypatch.setenv("CORRAL_CACHE", str(tmp_path / "cache"))
    if subprocess.run(
        ["apt-cache", "show", "linux-image-cloud-amd64", "busybox-static"], capture_output=True
    ).returncode:
        pytest.skip("apt's package lists do not know linux-image-cloud-amd64 / busybox-static")
    try:
        manifest = debian_image.fetch(progress=False, report=lambda m: None)
    except ConfigError as exc:
        if "cannot reach" in str(exc):
            pytest.skip(str(exc))
        raise
    d = debian_image.entry_dir()
    assert set(manifest["files"]) == {"vmlinuz", "vmlinux", "initrd.img"}
    bz = (d / "vmlinuz").read_bytes()
    assert bz[0x202:0x206] == b"HdrS"
    assert (d / "vmlinux").read_bytes()[:4] == b"\x7fELF"
    entries = {e.name: e for e in parse_cpio((d / "initrd.img").read_bytes())}
    assert "init" in entries and "bin/busybox" in entries
    assert entries["bin/busybox"].data[:4] == b"\x7fELF"
    kver = manifest["meta"]["kernel_version"]
    for mod in ("virtio_pci", "virtio_net", "virtio_blk", "vsock", "vmw_vsock_virtio_transport"):
        assert mod in manifest["meta"]["modules"]
    load = entries["etc/corral/modules"].data.decode().split()
    assert all(f"lib/modules/{kver}/{m}" in entries for m in load)
    cache.verify(d, "debian")
    # Rebuilding from the cached .debs is reproducible.
    first = manifest["files"]["initrd.img"]["sha256"]
    again = debian_image.build(report=lambda m: None)
    assert again["files"]["initrd.img"]["sha256"] == first
    assert sorted(p.name for p in d.parent.iterdir()) == ["debian"]
    assert not [p for p in cache.debs_dir().iterdir() if p.name.startswith(".")]
    assert os.access(d / "initrd.img", os.R_OK)
