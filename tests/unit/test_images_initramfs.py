"""The newc cpio writer, the kernel-module dependency resolver and the initramfs builder."""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import struct
import subprocess

import pytest

from corral.errors import ConfigError
from corral.images.initramfs import (
    CpioWriter,
    ModuleIndex,
    build_initramfs,
    modinfo,
    module_name,
    parse_cpio,
    parse_modules_dep,
    resolve_modules,
    scan_modules,
)

# --- cpio ----------------------------------------------------------------------------------------


def _sample() -> CpioWriter:
    w = CpioWriter()
    w.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    w.add_file("/bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    w.add_symlink("bin/sh", "/bin/busybox")
    w.add_device("dev/console", "c", 5, 1)
    w.add_file("etc/odd", b"abc")  # length not a multiple of 4
    w.add_file("lib/modules/6.1.0-x/kernel/a/b.ko", b"k" * 5)
    return w


def test_cpio_round_trip():
    entries = {e.name: e for e in parse_cpio(_sample().to_bytes())}
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert stat.S_ISREG(entries["init"].mode) and entries["init"].mode & 0o777 == 0o755
    assert entries["bin/busybox"].data.startswith(b"\x7fELF")
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].data == b"/bin/busybox"
    con = entries["dev/console"]
    assert stat.S_ISCHR(con.mode) and (con.rdevmajor, con.rdevminor) == (5, 1)
    assert entries["etc/odd"].data == b"abc"
    # Parents were added on demand, as directories, before their contents.
    names = [e.name for e in parse_cpio(_sample().to_bytes())]
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "lib/modules/6.1.0-x/kernel/a"):
        assert entries[d].is_dir
    assert names.index("lib/modules/6.1.0-x/kernel/a") < names.index("lib/modules/6.1.0-x/kernel/a/b.ko")
    # Unique inode numbers, fixed timestamps, root ownership.
    assert len({e.ino for e in entries.values()}) == len(entries)
    assert all(e.mtime == 0 and e.uid == 0 and e.gid == 0 for e in entries.values())


def test_cpio_layout_is_newc():
    data = _sample().to_bytes()
    assert data.startswith(b"070701")
    assert len(data) % 512 == 0
    assert b"TRAILER!!!\0" in data
    # Every header starts 4-byte aligned: walk the archive by hand.
    pos = 0
    while True:
        assert pos % 4 == 0 and data[pos : pos + 6] == b"070701"
        size = int(data[pos + 54 : pos + 62], 16)
        namesize = int(data[pos + 94 : pos + 102], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1]
        pos += 110 + namesize
        pos += -pos % 4
        pos += size + (-size % 4)
        if name == b"TRAILER!!!":
            break


def test_cpio_is_reproducible():
    assert _sample().to_bytes() == _sample().to_bytes()


def test_cpio_rejects_duplicates_and_bad_paths():
    w = CpioWriter()
    w.add_file("a", b"")
    with pytest.raises(ValueError):
        w.add_file("/a", b"")
    with pytest.raises(ValueError):
        w.add_file("../etc/passwd", b"")
    with pytest.raises(ValueError):
        w.add_file("/", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_tool_reads_it(tmp_path):
    res = subprocess.run(
        ["cpio", "-t", "--quiet"], input=_sample().to_bytes(), capture_output=True, check=True
    )
    listed = res.stdout.decode().split()
    assert "init" in listed and "bin/busybox" in listed and "dev/console" in listed


# --- kernel modules ------------------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
"""


def test_modules_dep_parse_and_names():
    idx = parse_modules_dep(MODULES_DEP)
    assert idx.paths["virtio_rng"] == "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
    assert idx.deps["virtio_net"] == ["net_failover", "failover", "virtio_ring", "virtio"]
    assert module_name("a/b/vmw_vsock-virtio.ko.xz") == "vmw_vsock_virtio"


def test_resolver_orders_dependencies_first_and_skips_builtins():
    idx = parse_modules_dep(MODULES_DEP)
    order, skipped = resolve_modules(idx, ["virtio_net", "virtio_pci", "virtio-rng", "ext4", "virtio"])
    assert skipped == ["ext4"]  # built into this kernel: not an error
    assert len(order) == len(set(order))
    assert set(order) == {
        "virtio",
        "virtio_ring",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_rng",
    }
    for name in order:
        for dep in idx.deps[name]:
            assert order.index(dep) < order.index(name), (dep, name)


def test_resolver_reports_cycles():
    idx = ModuleIndex(paths={"a": "a.ko", "b": "b.ko"}, deps={"a": ["b"], "b": ["a"]})
    with pytest.raises(ConfigError, match="cycle"):
        resolve_modules(idx, ["a"])


def make_ko(depends: str, name: str = "m") -> bytes:
    """A minimal ELF64 relocatable with a .modinfo section, like a kernel module."""
    shstr = b"\0.shstrtab\0.modinfo\0"
    info = f"license=GPL\0depends={depends}\0retpoline=Y\0name={name}\0".encode()
    body_off = 64
    shstr_off, info_off = body_off, body_off + len(shstr)
    shoff = info_off + len(info)
    shoff += -shoff % 8
    hdr = bytearray(64)
    hdr[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 1)
    sections = bytes(64)
    sections += struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    sections += struct.pack("<IIQQQQIIQQ", 11, 1, 2, 0, info_off, len(info), 0, 0, 1, 0)
    blob = bytes(hdr) + shstr + info
    blob += bytes(shoff - len(blob))
    return blob + sections


def test_modinfo_reads_depends():
    info = modinfo(make_ko("virtio_ring,virtio"))
    assert info["depends"] == "virtio_ring,virtio" and info["license"] == "GPL"
    assert modinfo(make_ko(""))["depends"] == ""


def fake_kernel_tree(root):
    """lib/modules/<ver> as Debian ships it: no modules.dep, deps only in each .ko."""
    moddir = root / "lib" / "modules" / "6.1.0-99-cloud-amd64"
    mods = {
        "kernel/drivers/virtio/virtio.ko": "",
        "kernel/drivers/virtio/virtio_ring.ko": "",
        "kernel/drivers/virtio/virtio_pci.ko": "virtio_ring,virtio",
        "kernel/drivers/char/hw_random/virtio-rng.ko.xz": "virtio_ring,virtio",
        "kernel/net/vmw_vsock/vsock.ko": "",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko": "vsock",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": "vmw_vsock_virtio_transport_common,virtio,virtio_ring,vsock",
        "kernel/sound/unrelated.ko": "",
    }
    for rel, deps in mods.items():
        p = moddir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        ko = make_ko(deps, module_name(rel))
        p.write_bytes(lzma.compress(ko) if rel.endswith(".xz") else ko)
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    busybox = root / "busybox"
    busybox.write_text("#!/bin/sh\nprintf 'bin/sh\\nsbin/insmod\\nusr/bin/setsid\\nbin/cttyhack\\n'\n")
    busybox.chmod(0o755)
    return moddir, busybox


def test_scan_modules_reads_modinfo_when_no_modules_dep(tmp_path):
    moddir, _ = fake_kernel_tree(tmp_path)
    idx = scan_modules(moddir, ["vmw_vsock_virtio_transport", "virtio_rng"])
    assert idx.deps["vmw_vsock_virtio_transport"] == [
        "vmw_vsock_virtio_transport_common",
        "virtio",
        "virtio_ring",
        "vsock",
    ]
    assert idx.deps["virtio_rng"] == ["virtio_ring", "virtio"]  # read through xz
    assert "unrelated" not in idx.deps  # only the closure of what was asked is opened


def test_build_initramfs(tmp_path):
    moddir, busybox = fake_kernel_tree(tmp_path)
    out = tmp_path / "initrd.img"
    info = build_initramfs(
        moddir, busybox, out, wanted=["virtio_pci", "virtio_rng", "vmw_vsock_virtio_transport", "ext4"]
    )
    assert info.kernel_version == "6.1.0-99-cloud-amd64"
    assert info.skipped == ["ext4"]
    raw = out.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    entries = {e.name: e for e in parse_cpio(raw)}
    assert entries["init"].mode & 0o111 and entries["init"].data.startswith(b"#!/bin/sh")
    assert b"poweroff -f" in entries["init"].data and b"cttyhack" in entries["init"].data
    assert entries["bin/busybox"].mode & 0o111
    assert entries["sbin/insmod"].data == b"/bin/busybox"
    assert entries["bin/sh"].data == b"/bin/busybox"
    kdir = "lib/modules/6.1.0-99-cloud-amd64/"
    # The .ko.xz was decompressed at build time and is loaded under its plain name.
    assert entries[kdir + "kernel/drivers/char/hw_random/virtio-rng.ko"].data.startswith(b"\x7fELF")
    assert kdir + "kernel/sound/unrelated.ko" not in entries
    load = entries["etc/corral/modules"].data.decode().split()
    names = [module_name(m) for m in load]
    assert (
        names.index("vsock")
        < names.index("vmw_vsock_virtio_transport_common")
        < names.index("vmw_vsock_virtio_transport")
    )
    assert names.index("virtio_ring") < names.index("virtio_pci")
    # Reproducible: the same inputs give the same bytes.
    out2 = tmp_path / "again.img"
    build_initramfs(
        moddir, busybox, out2, wanted=["virtio_pci", "virtio_rng", "vmw_vsock_virtio_transport", "ext4"]
    )
    assert out2.read_bytes() == raw
    assert gzip.decompress(raw)[:6] == b"070701"
