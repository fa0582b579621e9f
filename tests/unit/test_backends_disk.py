"""Copy-on-write overlays: the guest's writes land in the overlay, the base never changes, and
what the guest reads back is what a plain disk would hold (checked against a model)."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.hostile import fifo, umask
from support.virtio_driver import Driver, blk_request

from corral.backends.disk import CLUSTER, ZERO_CHUNK, open_disk, write_zeroes, zero_range
from corral.devices.virtio.blk import S_OK, T_DISCARD, T_IN, T_OUT, T_WRITE_ZEROES, VirtioBlock
from corral.errors import ConfigError

SIZE = 4 * CLUSTER + 8192  # not a whole number of clusters


def base_image(path: Path) -> bytes:
    data = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(SIZE))
    path.write_bytes(data)
    return data


def mv(b: bytearray) -> list[memoryview]:
    return [memoryview(b)]


@pytest.fixture
def disks(tmp_path):
    base = tmp_path / "base.img"
    return base, base_image(base), tmp_path / "vm.cow"


def test_reads_come_from_the_base_until_written(disks):
    base, data, ov = disks
    img = open_disk(str(base), read_only=False, overlay=str(ov))
    try:
        buf = bytearray(SIZE)
        assert img.readv(mv(buf), 0) == SIZE and bytes(buf) == data
        img.writev([memoryview(b"X" * 1000)], CLUSTER + 100)  # partial: copy-up first
        out = bytearray(CLUSTER)
        img.readv(mv(out), CLUSTER)
        assert bytes(out) == data[CLUSTER : CLUSTER + 100] + b"X" * 1000 + data[CLUSTER + 1100 : 2 * CLUSTER]
    finally:
        img.close()
    assert base.read_bytes() == data  # the base never changes
    # reopened: the overlay remembers what it holds
    img = open_disk(str(base), read_only=False, overlay=str(ov))
    try:
        out = bytearray(1000)
        img.readv(mv(out), CLUSTER + 100)
        assert bytes(out) == b"X" * 1000
    finally:
        img.close()


def test_overlay_is_sparse(disks):
    base, _, ov = disks
    img = open_disk(str(base), read_only=False, overlay=str(ov))
    img.writev([memoryview(b"Y" * 4096)], 0)
    img.flush()
    img.close()
    assert os.stat(ov).st_blocks * 512 <= 2 * CLUSTER + 8192


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["w", "z"]),
            st.integers(0, SIZE - 1),
            st.integers(1, 3 * CLUSTER),
            st.integers(0, 255),
        ),
        max_size=12,
    )
)
def test_overlay_behaves_like_a_plain_disk(tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("cow")
    base = d / "base.img"
    model = bytearray(base_image(base))
    img = open_disk(str(base), read_only=False, overlay=str(d / "o.cow"))
    try:
        for kind, off, n, byte in ops:
            n = min(n, SIZE - off)
            if kind == "w":
                img.writev([memoryview(bytes([byte]) * n)], off)
                model[off : off + n] = bytes([byte]) * n
            else:
                img.discard(off, n, zeroes=True, unmap=True)
                model[off : off + n] = bytes(n)
            out = bytearray(SIZE)
            assert img.readv(mv(out), 0) == SIZE
            assert out == model
    finally:
        img.close()


def test_two_vms_share_one_base(disks, tmp_path):
    base, data, ov = disks
    a = open_disk(str(base), read_only=False, overlay=str(ov))
    b = open_disk(str(base), read_only=False, overlay=str(tmp_path / "vm2.cow"))
    try:
        a.writev([memoryview(b"A" * 10)], 0)
        b.writev([memoryview(b"B" * 10)], 0)
        ra, rb = bytearray(12), bytearray(12)
        a.readv(mv(ra), 0)
        b.readv(mv(rb), 0)
        assert bytes(ra) == b"A" * 10 + data[10:12] and bytes(rb) == b"B" * 10 + data[10:12]
    finally:
        a.close()
        b.close()


def test_overlay_errors(disks, tmp_path):
    base, _, ov = disks
    with pytest.raises(ConfigError, match="unset read_only or the overlay"):
        open_disk(str(base), read_only=True, overlay=str(ov))
    img = open_disk(str(base), read_only=False, overlay=str(ov))
    with pytest.raises(ConfigError, match="in use by another VM"):
        open_disk(str(base), read_only=False, overlay=str(ov))  # one writer per overlay
    img.close()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SIZE * 2))
    with pytest.raises(ConfigError, match="was made on"):
        open_disk(str(other), read_only=False, overlay=str(ov))
    junk = tmp_path / "junk.cow"
    junk.write_bytes(b"not an overlay" * 100)
    with pytest.raises(ConfigError, match="not a corral overlay"):
        open_disk(str(base), read_only=False, overlay=str(junk))
    with pytest.raises(ConfigError, match="another file than its base"):
        open_disk(str(base), read_only=False, overlay=str(base))
    # the base stays usable read-only by others while an overlay writes on it
    img = open_disk(str(base), read_only=False, overlay=str(ov))
    ro = open_disk(str(base), read_only=True)
    ro.close()
    img.close()


def test_virtio_blk_on_an_overlay(disks):
    base, data, ov = disks
    d = Driver(VirtioBlock(open_disk(str(base), overlay=str(ov))))
    try:
        d.setup()

        assert blk_request(d, T_OUT, 3, data=b"W" * 512)[0] == S_OK
        status, got, _ = blk_request(d, T_IN, 2, read_len=1536)
        assert status == S_OK and got == data[1024:1536] + b"W" * 512 + data[2048:2560]
        assert blk_request(d, T_WRITE_ZEROES, 0, payload=struct.pack("<QII", 200, 8, 0))[0] == S_OK
        assert blk_request(d, T_DISCARD, 0, payload=struct.pack("<QII", 300, 8, 0))[0] == S_OK
        assert blk_request(d, T_IN, 200, read_len=4096)[1] == bytes(4096)
        assert blk_request(d, T_IN, 300, read_len=4096)[1] == bytes(4096)
    finally:
        d.close()
    assert base.read_bytes() == data


# -- zeroing a range: by the file system where it can, from one bounded buffer where it cannot ----
def _file(path: Path, n: int) -> int:
    path.write_bytes(b"\xee" * n)
    return os.open(path, os.O_RDWR)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a tmpfs at /dev/shm")
@pytest.mark.parametrize("unmap", [False, True])
def test_zero_range_on_tmpfs_punches_and_keeps_blocks_unless_unmap(unmap):
    # tmpfs has no ZERO_RANGE: the hole is punched, then allocated again when unmap is not allowed
    path = Path(f"/dev/shm/corral-test-{os.getpid()}.img")
    fd = _file(path, 8 << 20)
    try:
        blocks = os.fstat(fd).st_blocks
        zero_range(fd, (1 << 20) + 4096, 3 << 20, unmap=unmap)
        data = os.pread(fd, 8 << 20, 0)
        assert data == b"\xee" * ((1 << 20) + 4096) + bytes(3 << 20) + b"\xee" * ((4 << 20) - 4096)
        freed = blocks - os.fstat(fd).st_blocks
        assert freed == ((3 << 20) // 512 if unmap else 0)
    finally:
        os.close(fd)
        path.unlink()


def test_write_zeroes_writes_any_length_from_a_bounded_buffer(tmp_path):
    n = 3 * ZERO_CHUNK + 1234  # several chunks and a piece
    fd = _file(tmp_path / "z.img", n + 2000)
    try:
        write_zeroes(fd, 1000, n)
        assert os.pread(fd, n + 2000, 0) == b"\xee" * 1000 + bytes(n) + b"\xee" * 1000
    finally:
        os.close(fd)


# -- files from outside: never destroyed, never followed, never hung on -------------------------


def test_a_file_that_is_not_an_overlay_is_refused_and_left_as_it_was(disks, tmp_path):
    """Its first 4 KiB being zero does not make a file a new overlay: only a new or empty file
    is made into one."""
    base, _, _ = disks
    victim = tmp_path / "data.img"
    content = bytes(4096) + bytes(i & 0xFF for i in range((1 << 20) - 4096))
    victim.write_bytes(content)
    with pytest.raises(
        ConfigError, match=r"^disk\.overlay: .* is not a corral overlay \(it is left as it is\): give a new"
    ):
        open_disk(str(base), overlay=str(victim))
    assert victim.read_bytes() == content


def test_an_empty_file_becomes_an_overlay(disks, tmp_path):
    base, data, _ = disks
    ov = tmp_path / "empty.cow"
    ov.touch()
    img = open_disk(str(base), overlay=str(ov))
    try:
        buf = bytearray(SIZE)
        assert img.readv(mv(buf), 0) == SIZE and bytes(buf) == data
    finally:
        img.close()
    assert ov.read_bytes().startswith(b"CORRALCOW1")


def test_a_new_overlay_is_0600_whatever_the_umask(disks):
    base, _, ov = disks
    with umask(0):
        img = open_disk(str(base), overlay=str(ov))
    img.close()
    assert stat.S_IMODE(os.stat(ov).st_mode) == 0o600


@pytest.mark.parametrize("target_exists", [True, False])
def test_an_overlay_path_that_is_a_symlink_is_refused(disks, tmp_path, target_exists):
    base, _, _ = disks
    target = tmp_path / "elsewhere"
    if target_exists:
        target.write_bytes(b"precious")
    link = tmp_path / "vm.cow"
    link.symlink_to(target)
    with pytest.raises(ConfigError) as exc:
        open_disk(str(base), overlay=str(link))
    assert str(exc.value) == f"disk.overlay: overlay {link} is a symbolic link: give the overlay file itself"
    if target_exists:
        assert target.read_bytes() == b"precious"
    else:
        assert not target.exists()


def test_fifos_and_devices_are_refused_without_hanging(disks, tmp_path):
    base, _, _ = disks
    with fifo(tmp_path / "pipe") as pipe:
        for ro in (True, False):
            with pytest.raises(ConfigError) as exc:
                open_disk(str(pipe), read_only=ro)
            assert str(exc.value) == f"disk.path: disk image {pipe} is not a regular file or a block device"
        with pytest.raises(ConfigError) as exc:
            open_disk(str(base), overlay=str(pipe))
        assert str(exc.value) == f"disk.overlay: overlay {pipe} is not a regular file"
    with pytest.raises(ConfigError, match="is not a regular file or a block device"):
        open_disk("/dev/zero", read_only=True)
    # the base's lock went with the refusal: it opens read-write again
    open_disk(str(base)).close()
