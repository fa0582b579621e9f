"""The probe guest builds into one ELF32 with a Multiboot v1 header and a PVH entry note."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.images import probe

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gcc", "ld", "objcopy")), reason="needs gcc and binutils"
)

MB_MAGIC = 0x1BADB002
XEN_ELFNOTE_PHYS32_ENTRY = 18
EM_386 = 3
PT_LOAD, PT_NOTE = 1, 4


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CORRAL_GUEST_SRC", raising=False)
    return tmp_path / "xdg"


@pytest.fixture
def built(cache_home) -> Path:
    return probe.build_probe()


def _phdrs(data: bytes):
    (e_phoff,) = struct.unpack_from("<I", data, 28)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    for i in range(e_phnum):
        yield struct.unpack_from("<IIIIIIII", data, e_phoff + i * e_phentsize)


def _notes(data: bytes, off: int, size: int):
    pos, end = off, off + size
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_off = pos + 12
        desc_off = name_off + (namesz + 3) // 4 * 4
        yield data[name_off : name_off + namesz].rstrip(b"\0"), ntype, data[desc_off : desc_off + descsz]
        pos = desc_off + (descsz + 3) // 4 * 4


def test_output_is_elf32_i386_loaded_at_1mib(built):
    data = built.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 1, "ELFCLASS32 (QEMU's multiboot loader refuses ELF64)"
    assert data[5] == 1, "little endian"
    assert struct.unpack_from("<H", data, 18)[0] == EM_386
    loads = [p for p in _phdrs(data) if p[0] == PT_LOAD]
    assert loads
    assert min(p[3] for p in loads) >= 0x100000  # p_paddr
    (entry,) = struct.unpack_from("<I", data, 24)
    assert any(p[3] <= entry < p[3] + p[5] for p in loads)


def test_multiboot_header_in_first_8k_with_valid_checksum(built):
    data = built.read_bytes()
    for off in range(0, min(len(data), 8192) - 12 + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MB_MAGIC:
            assert (magic + flags + checksum) & 0xFFFFFFFF == 0
            assert not flags & (1 << 16), "ELF layout: no address fields"
            assert not flags & (1 << 2), "no video mode request"
            return
    pytest.fail("no Multiboot header in the first 8 KiB")


def test_pvh_note_names_an_entry_inside_the_image(built):
    data = built.read_bytes()
    phdrs = list(_phdrs(data))
    loads = [p for p in phdrs if p[0] == PT_LOAD]
    entries = [
        int.from_bytes(desc, "little")
        for p in phdrs
        if p[0] == PT_NOTE
        for name, ntype, desc in _notes(data, p[1], p[4])
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY
    ]
    assert len(entries) == 1
    assert any(p[3] <= entries[0] < p[3] + p[5] for p in loads)


def test_corral_elf_parser_accepts_it(built):
    from corral.boot.elf import parse_elf

    elf = parse_elf(built.read_bytes(), "probe")
    assert elf.pvh_entry() is not None


def test_cached_rebuild_returns_same_path_without_rebuilding(built):
    mtime = built.stat().st_mtime_ns
    again = probe.build_probe()
    assert again == built
    assert again.stat().st_mtime_ns == mtime
    assert built.parent.name == probe.source_digest()
    assert built.parent.parent == probe.probe_cache_dir()
    assert not [p for p in built.parent.parent.iterdir() if p.name.startswith(".")]


def test_force_rebuilds_in_place(built):
    again = probe.build_probe(force=True)
    assert again == built and again.is_file()


def test_changed_source_gets_a_new_cache_entry(cache_home, tmp_path, monkeypatch):
    src = tmp_path / "guest"
    shutil.copytree(probe.probe_source_dir(), src, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setenv("CORRAL_GUEST_SRC", str(src))
    first = probe.build_probe()
    with open(src / "main.c", "a") as f:
        f.write("\n/* changed */\n")
    second = probe.build_probe()
    assert first != second and first.is_file() and second.is_file()


def test_compiler_error_is_a_config_error_with_the_message(cache_home, tmp_path, monkeypatch):
    src = tmp_path / "guest"
    shutil.copytree(probe.probe_source_dir(), src, ignore=shutil.ignore_patterns("build"))
    (src / "main.c").write_text("this is not C;\n")
    monkeypatch.setenv("CORRAL_GUEST_SRC", str(src))
    with pytest.raises(ConfigError, match="main.c"):
        probe.build_probe()
    # nothing half-built is left behind
    assert not any(probe.probe_cache_dir().glob("*/probe.elf"))
    assert not [p for p in probe.probe_cache_dir().iterdir() if p.name.startswith(".")]


def test_missing_sources_are_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRAL_GUEST_SRC", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="CORRAL_GUEST_SRC"):
        probe.probe_source_dir()


def test_missing_gcc_is_a_config_error(cache_home, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="gcc"):
        probe.build_probe(force=True)
