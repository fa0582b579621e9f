"""virtio-blk (corral.devices.virtio.blk) driven from a Python driver: reads, writes, flushes,
discard and write-zeroes, the serial, read-only disks, and one-line errors for bad images."""

from __future__ import annotations

import struct

import pytest
from support.virtio_driver import BLK_SECTORS as SECTORS
from support.virtio_driver import Driver, blk_request

from corral.backends.disk import open_disk
from corral.devices.virtio.blk import (
    F_RO,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VirtioBlock,
)
from corral.errors import ConfigError


def test_read_write_flush(blk, blk_image):
    status, data, used = blk_request(blk, T_IN, 3, read_len=1024)
    assert status == S_OK and used == 1025
    assert data[:8] == struct.pack("<Q", 3) and data[512:520] == struct.pack("<Q", 4)
    status, _, _ = blk_request(blk, T_OUT, 10, data=b"\xab" * 512)
    assert status == S_OK
    assert blk_request(blk, T_FLUSH, 0)[0] == S_OK
    assert blk_image.read_bytes()[10 * 512 : 11 * 512] == b"\xab" * 512


def test_out_of_range_and_unknown_requests_fail_alone(blk):
    assert blk_request(blk, T_IN, SECTORS - 1, read_len=1024)[0] == S_IOERR  # runs past the end
    assert blk_request(blk, T_IN, 0, read_len=100)[0] == S_IOERR  # not whole sectors
    assert blk_request(blk, 99, 0)[0] == S_UNSUPP
    assert blk_request(blk, T_IN, 0, read_len=512)[0] == S_OK  # the device still works


def test_get_id(blk):
    status, data, _ = blk_request(blk, T_GET_ID, 0, read_len=20)
    assert status == S_OK and data.rstrip(b"\0") == b"corral-disk-7"


def test_discard_and_write_zeroes(blk, blk_image):
    seg = struct.pack("<QII", 20, 4, 0)
    assert blk_request(blk, T_WRITE_ZEROES, 0, payload=seg)[0] == S_OK
    assert blk_image.read_bytes()[20 * 512 : 24 * 512] == bytes(4 * 512)
    assert blk_request(blk, T_DISCARD, 0, payload=struct.pack("<QII", 40, 2, 0))[0] == S_OK
    bad = struct.pack("<QII", SECTORS - 1, 8, 0)
    assert blk_request(blk, T_WRITE_ZEROES, 0, payload=bad)[0] == S_IOERR


def test_read_only_disk(blk_image):
    d = Driver(VirtioBlock(open_disk(str(blk_image), read_only=True)))
    d.setup()
    try:
        assert d.device_features() & F_RO
        assert blk_request(d, T_OUT, 0, data=bytes(512))[0] == S_IOERR
        assert blk_request(d, T_IN, 0, read_len=512)[0] == S_OK
    finally:
        d.close()
    assert blk_image.read_bytes()[:8] == struct.pack("<Q", 0)


def test_image_errors_are_one_line(tmp_path, blk_image):
    with pytest.raises(ConfigError, match=r"^disks\[2\].path: .* does not exist"):
        open_disk(str(tmp_path / "missing.img"), field="disks[2]")
    with pytest.raises(ConfigError, match="directory"):
        VirtioBlock(open_disk(str(tmp_path)))
    (tmp_path / "empty.img").write_bytes(b"")
    with pytest.raises(ConfigError, match="at least one 512-byte sector"):
        VirtioBlock(open_disk(str(tmp_path / "empty.img")))
    first = VirtioBlock(open_disk(str(blk_image)))
    try:
        with pytest.raises(ConfigError, match="in use by another VM"):
            VirtioBlock(open_disk(str(blk_image)))
        with pytest.raises(ConfigError, match="in use by another VM"):
            VirtioBlock(open_disk(str(blk_image), read_only=True))
    finally:
        first.close()
    a, b = (
        VirtioBlock(open_disk(str(blk_image), read_only=True)),
        VirtioBlock(open_disk(str(blk_image), read_only=True)),
    )
    a.close(), b.close()
