"""The LZ4 legacy frame decoder (corral.images.lz4legacy) Debian's kernels are compressed with."""

import struct

import pytest

from corral.errors import KernelFormatError
from corral.images.lz4legacy import LEGACY_MAGIC, _decompress_block_py, decompress_legacy


def test_lz4_block_decoder():
    # token 0x40: 4 literals "abcd", no match (last sequence).
    assert _decompress_block_py(b"\x40abcd", 100) == b"abcd"
    # "ab" then a match at offset 2, length 4+6=10 (overlapping copy), then literal "Z".
    block = b"\x26ab\x02\x00" + b"\x10Z"
    assert _decompress_block_py(block, 100) == b"ab" + b"abababababab"[:10] + b"Z"
    # Long literal run (15 + 255 + 10).
    lit = bytes(range(256)) + b"x" * 24
    assert _decompress_block_py(b"\xf0\xff\x0a" + lit, 1000) == lit
    with pytest.raises(KernelFormatError):
        _decompress_block_py(b"\x11a\x05\x00", 100)  # offset beyond output
    with pytest.raises(KernelFormatError):
        _decompress_block_py(b"\xf0", 100)  # truncated


def test_lz4_legacy_frame():
    b1, b2 = b"\x40abcd", b"\x30xyz"
    frame = (
        struct.pack("<I", LEGACY_MAGIC)
        + struct.pack("<I", len(b1))
        + b1
        + struct.pack("<I", len(b2))
        + b2
        + struct.pack("<I", 7)
    )  # kernel's appended size
    assert decompress_legacy(frame) == b"abcdxyz"
    with pytest.raises(KernelFormatError):
        decompress_legacy(b"\x04\x22\x4d\x18rest")
