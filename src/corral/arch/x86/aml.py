"""A tiny AML encoder: the few ACPI Machine Language terms corral's DSDT needs.

Each function returns the encoded bytes of one term (ACPI 6.x chapter 20, "ACPI Machine Language
Specification"; resource descriptors from section 6.4), so objects compose by nesting calls:
device("COM1", name("_HID", integer(eisa_id("PNP0501"))), ...).
"""

from __future__ import annotations

import re
import struct

NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
EXT_OP, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR = 0x5C


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of `body_len` bytes; the encoded length counts its own bytes too."""
    if body_len + 1 <= 0x3F:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too large")


_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg: a letter or '_' then letters, digits or '_', padded with '_'."""
    if not _NAME_SEG.fullmatch(name):
        raise ValueError(f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """'\\_SB_' or 'COM1' or '\\_SB_.PCI0' (root-relative paths only need the prefix)."""
    root = path.startswith("\\")
    segs = [s for s in path.lstrip("\\").split(".") if s]
    if len(segs) == 1:
        body = name_seg(segs[0])
    elif len(segs) == 2:
        body = b"\x2e" + b"".join(name_seg(s) for s in segs)
    else:
        body = b"\x2f" + bytes([len(segs)]) + b"".join(name_seg(s) for s in segs)
    return (bytes([ROOT_CHAR]) if root else b"") + body


def integer(v: int) -> bytes:
    if v < 0 or v >= 1 << 64:
        raise ValueError(f"AML integer {v} out of range")
    if v == 0:
        return bytes([ZERO_OP])
    if v == 1:
        return bytes([ONE_OP])
    if v <= 0xFF:
        return bytes([BYTE_PREFIX, v])
    if v <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", v)
    if v <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


def string(s: str) -> bytes:
    if "\0" in s or not s.isascii():
        raise ValueError(f"AML strings are ASCII without NUL: {s!r}")
    return bytes([STRING_PREFIX]) + s.encode("ascii") + b"\0"


def eisa_id(pnp: str) -> int:
    """EisaId("PNP0501") -> 0x0105D041: three letters in 5 bits each, then four hex digits."""
    if not _EISA_ID.fullmatch(pnp):
        raise ValueError(f"bad EISA id {pnp!r}")
    c = [ord(ch) - 0x40 for ch in pnp[:3]]
    h = int(pnp[3:], 16)
    b = [(c[0] << 2) | (c[1] >> 3), ((c[1] & 7) << 5) | c[2], h >> 8, h & 0xFF]
    return int.from_bytes(bytes(b), "little")


def name(n: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(n) + value


def package(*elements: bytes) -> bytes:
    if len(elements) > 255:
        raise ValueError(f"a Package holds at most 255 elements, not {len(elements)}")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(n: str, *terms: bytes) -> bytes:
    body = name_string(n) + b"".join(terms)
    return bytes([EXT_OP, DEVICE_OP]) + pkg_length(len(body)) + body


# -- resource templates (ACPI 6.x section 6.4) --------------------------------------------
def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length)."""
    if not (0 <= base <= 0xFFFF and 1 <= length <= 0xFF):
        raise ValueError(f"bad I/O port range {base:#x}+{length}")
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, length)


def irq_no_flags(*irqs: int) -> bytes:
    mask = 0
    for i in irqs:
        if not 0 <= i <= 15:
            raise ValueError(f"ISA IRQ {i} out of range")
        mask |= 1 << i
    return struct.pack("<BH", 0x22, mask)


def resource_template(*descriptors: bytes) -> bytes:
    """A _CRS buffer: the descriptors, then an end tag whose zero checksum means "valid"."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


# -- what a PCI host bridge needs: methods and address-space descriptors -------------------------
METHOD_OP, RETURN_OP, ARG0_OP = 0x14, 0xA4, 0x68


def arg(n: int) -> bytes:
    """ArgN (0 to 6) of the enclosing method."""
    if not 0 <= n <= 6:
        raise ValueError(f"AML methods have Arg0 to Arg6, not Arg{n}")
    return bytes([ARG0_OP + n])


def method(n: str, nargs: int, *terms: bytes, serialized: bool = False) -> bytes:
    if not 0 <= nargs <= 7:
        raise ValueError(f"an AML method takes 0 to 7 arguments, not {nargs}")
    body = name_string(n) + bytes([nargs | (0x08 if serialized else 0)]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


def return_(term: bytes) -> bytes:
    return bytes([RETURN_OP]) + term


# Address space descriptors (ACPI 6.4 section 6.4.3.5). General flags 0x0C: a bridge window the
# device produces (bit 0 clear), positive decode, minimum and maximum fixed.
_SPACE_MEMORY, _SPACE_IO, _SPACE_BUS = 0, 1, 2
_WINDOW_FLAGS = 0x0C
MEM_NONCACHEABLE_RW = 0x01
IO_ENTIRE_RANGE = 0x03


def _address_space(width: int, space: int, type_flags: int, lo: int, hi: int) -> bytes:
    tag, fmt = {16: (0x88, "<BHBBBHHHHH"), 32: (0x87, "<BHBBBIIIII"), 64: (0x8A, "<BHBBBQQQQQ")}[width]
    if not 0 <= lo <= hi < 1 << width:
        raise ValueError(f"bad {width}-bit address range {lo:#x}-{hi:#x}")
    length = struct.calcsize(fmt) - 3
    return struct.pack(fmt, tag, length, space, _WINDOW_FLAGS, type_flags, 0, lo, hi, 0, hi - lo + 1)


def word_bus_number(lo: int, hi: int) -> bytes:
    return _address_space(16, _SPACE_BUS, 0, lo, hi)


def word_io(lo: int, hi: int) -> bytes:
    return _address_space(16, _SPACE_IO, IO_ENTIRE_RANGE, lo, hi)


def dword_memory(lo: int, hi: int) -> bytes:
    return _address_space(32, _SPACE_MEMORY, MEM_NONCACHEABLE_RW, lo, hi)


def qword_memory(lo: int, hi: int) -> bytes:
    return _address_space(64, _SPACE_MEMORY, MEM_NONCACHEABLE_RW, lo, hi)


def memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed(ReadWrite, base, length)."""
    if not (0 <= base and 0 < length and base + length <= 1 << 32):
        raise ValueError(f"bad 32-bit memory range {base:#x}+{length:#x}")
    return struct.pack("<BHBII", 0x86, 9, 1, base, length)
