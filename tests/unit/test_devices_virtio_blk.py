"""virtio-blk (corral.devices.virtio.blk) driven from a Python driver: reads, writes, flushes,
discard and write-zeroes (within the limits the device advertises, at a memory cost that does not
grow with the request), the serial, read-only disks, and one-line errors for bad images."""

from __future__ import annotations

import os
import struct
import time

import pytest
from support.virtio_driver import BLK_SECTORS as SECTORS
from support.virtio_driver import Driver, blk_request

from corral.backends.disk import open_disk
from corral.devices.virtio.blk import (
    F_RO,
    F_UNMAP,
    MAX_DISCARD_SECTORS,
    MAX_WRITE_ZEROES_SECTORS,
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
    # unmap is a write-zeroes flag; a discard that sets it is refused (virtio 1.2 5.2.6.2)
    assert blk_request(blk, T_DISCARD, 0, payload=struct.pack("<QII", 40, 2, F_UNMAP))[0] == S_UNSUPP


def test_discard_limits_are_advertised(blk):
    # max_discard_sectors, max_discard_seg, alignment; max_write_zeroes_sectors, _seg, may unmap
    assert [blk.config(off, 4) for off in (0x24, 0x28, 0x2C, 0x30, 0x34)] == [
        MAX_DISCARD_SECTORS,
        1,
        1,
        MAX_WRITE_ZEROES_SECTORS,
        1,
    ]
    assert blk.config(0x38, 1) == 1


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
def test_more_segments_than_advertised_fail_alone(blk, blk_image, rtype):
    before = blk_image.read_bytes()
    two = struct.pack("<QII", 20, 4, 0) + struct.pack("<QII", 30, 4, 0)
    assert blk_request(blk, rtype, 0, payload=two)[0] == S_UNSUPP
    too_long = struct.pack(
        "<QII", 20, (MAX_WRITE_ZEROES_SECTORS if rtype == T_WRITE_ZEROES else MAX_DISCARD_SECTORS) + 1, 0
    )
    assert blk_request(blk, rtype, 0, payload=too_long)[0] == S_UNSUPP
    assert blk_image.read_bytes() == before  # nothing was applied
    assert blk_request(blk, T_IN, 3, read_len=512)[0] == S_OK  # the device still works


def peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak RSS exceeded its RSS before `fn` ran (the peak is reset
    through /proc/self/clear_refs, so earlier tests do not hide it)."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return status("VmHWM:") - before


def test_a_1gib_segment_list_costs_no_host_memory(blk):
    """The attack of issue 13: 64 descriptors over the same 16 MiB of guest RAM make a 1 GiB
    "segment list"; copying it took the VMM to gigabytes of RSS."""
    blk.setup(queue_size=256)  # room for a 66-descriptor chain
    hdr = blk.alloc(struct.pack("<IIQ", T_WRITE_ZEROES, 0, 0))
    status_buf = blk.alloc(1)
    bufs = [(hdr, False)] + [((0, 16 << 20), False)] * 64 + [(status_buf, True)]
    start = time.monotonic()
    grew = peak_rss_growth(lambda: blk.submit(0, bufs))
    assert blk.used(0) and blk.mem.read(status_buf[0], 1)[0] == S_UNSUPP
    assert grew < 64 << 20 and time.monotonic() - start < 1.0
    assert blk_request(blk, T_IN, 3, read_len=512)[0] == S_OK


@pytest.fixture
def big_blk(tmp_path):
    """A virtio-blk on a sparse 2 GiB image with a marker at the start of every 64 MiB."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(2 << 30)
        for off in range(0, 2 << 30, 64 << 20):
            os.pwrite(f.fileno(), b"\xee" * 4096, off)
    d = Driver(VirtioBlock(open_disk(str(path))))
    d.setup()
    yield d, path
    d.close()


@pytest.mark.parametrize(
    ("rtype", "sectors", "flags"),
    [
        (T_DISCARD, MAX_DISCARD_SECTORS, 0),  # 2 GiB: the advertised maximum
        (T_DISCARD, (1 << 30) // 512, 0),
        (T_WRITE_ZEROES, MAX_WRITE_ZEROES_SECTORS, 0),
        (T_WRITE_ZEROES, MAX_WRITE_ZEROES_SECTORS, F_UNMAP),
    ],
)
def test_the_largest_requests_zero_the_disk_without_host_memory(big_blk, rtype, sectors, flags):
    d, path = big_blk
    seg = struct.pack("<QII", 0, sectors, flags)
    result: list[int] = []
    grew = peak_rss_growth(lambda: result.append(blk_request(d, rtype, 0, payload=seg)[0]))
    assert result == [S_OK] and grew < 32 << 20
    end = sectors * 512
    with open(path, "rb") as f:
        for off in range(0, 2 << 30, 64 << 20):
            expect = bytes(4096) if off < end else b"\xee" * 4096
            assert os.pread(f.fileno(), 4096, off) == expect, off


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
