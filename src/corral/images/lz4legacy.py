"""LZ4 "legacy frame" decompression, and pulling the vmlinux ELF out of a bzImage.

The Debian cloud kernel's bzImage payload is LZ4 in the legacy frame format that the kernel's
build uses (`lz4 -l`): the magic 0x184C2102, then blocks of at most 8 MiB of output, each a 4-byte
little-endian compressed length followed by one raw LZ4 block. The kernel build appends the
4-byte uncompressed size after the last block.

The `lz4` package is used when it is installed; otherwise a pure-Python block decoder does the
work (a few seconds for a ~40 MB vmlinux, done once per fetch).
"""

from __future__ import annotations

import struct

from corral.errors import KernelFormatError

LEGACY_MAGIC = 0x184C2102
BLOCK_SIZE = 8 << 20


def decompress_block(src: bytes | memoryview, max_size: int = BLOCK_SIZE) -> bytes:
    """Decode one raw LZ4 block (no frame). Raises KernelFormatError on malformed input."""
    try:
        import lz4.block  # optional: the pure-Python decoder below is the fallback
    except ImportError:
        return _decompress_block_py(bytes(src), max_size)
    try:
        return lz4.block.decompress(bytes(src), uncompressed_size=max_size)
    except Exception as exc:  # noqa: BLE001 - lz4.block.LZ4BlockError, or ValueError in older lz4
        raise KernelFormatError(f"corrupt LZ4 block: {exc}") from None


def _decompress_block_py(src: bytes, max_size: int) -> bytes:
    out = bytearray()
    i, n = 0, len(src)
    try:
        while i < n:
            token = src[i]
            i += 1
            lit = token >> 4
            if lit == 15:
                lit, i = _extended_length(src, i, lit)
            if lit:
                out += src[i : i + lit]
                i += lit
            if i >= n:
                break  # the last sequence has literals only
            offset = src[i] | (src[i + 1] << 8)
            i += 2
            if offset == 0 or offset > len(out):
                raise KernelFormatError("corrupt LZ4 block: bad match offset")
            mlen = token & 15
            if mlen == 15:
                mlen, i = _extended_length(src, i, mlen)
            mlen += 4
            start = len(out) - offset
            if mlen <= offset:
                out += out[start : start + mlen]
            else:  # overlapping copy: repeat the last `offset` bytes
                chunk = bytes(out[start:])
                reps, rest = divmod(mlen, offset)
                out += chunk * reps + chunk[:rest]
            if len(out) > max_size:
                raise KernelFormatError("corrupt LZ4 block: output larger than the block size")
    except IndexError:
        raise KernelFormatError("corrupt LZ4 block: truncated") from None
    return bytes(out)


def _extended_length(src: bytes, i: int, length: int) -> tuple[int, int]:
    """Add the length bytes at src[i:] (each 255 means another follows) to `length`:
    (the full length, the index after them)."""
    while True:
        b = src[i]
        i += 1
        length += b
        if b != 255:
            return length, i


def decompress_legacy(data: bytes) -> bytes:
    """Decode an LZ4 legacy-frame stream (trailing bytes shorter than a block are ignored)."""
    if len(data) < 4 or struct.unpack_from("<I", data, 0)[0] != LEGACY_MAGIC:
        raise KernelFormatError("not an LZ4 legacy frame (bad magic)")
    view = memoryview(data)
    pos, parts = 4, []
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        if size == LEGACY_MAGIC:  # concatenated frames
            pos += 4
            continue
        if size == 0 or pos + 4 + size > len(data):
            break  # the kernel build's appended uncompressed size, or padding
        parts.append(decompress_block(view[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    if not parts:
        raise KernelFormatError("LZ4 legacy frame holds no blocks")
    return b"".join(parts)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF vmlinux inside an LZ4-compressed bzImage (boot protocol >= 2.08)."""
    if len(bzimage) < 0x260 or bzimage[0x202:0x206] != b"HdrS":
        raise KernelFormatError("not a bzImage (no HdrS signature)")
    version = struct.unpack_from("<H", bzimage, 0x206)[0]
    if version < 0x208:
        raise KernelFormatError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF} has no payload fields"
        )
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload[:4] != struct.pack("<I", LEGACY_MAGIC):
        raise KernelFormatError(f"bzImage payload is not LZ4 legacy (starts {payload[:4].hex()})")
    vmlinux = decompress_legacy(payload)
    if vmlinux[:4] != b"\x7fELF":
        raise KernelFormatError("decompressed bzImage payload is not an ELF file")
    return vmlinux
