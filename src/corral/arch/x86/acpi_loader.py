"""corral's ACPI tables for firmware: fw_cfg files plus QEMU's linker/loader script for them.

Why: with a firmware (SeaBIOS, OVMF) the VMM does not place tables in guest memory itself; the
firmware allocates memory, copies the tables there and patches their pointers. QEMU tells it
how with `etc/table-loader`, a list of commands over fw_cfg files; SeaBIOS and OVMF run it and
then install those tables instead of building their own. Facts from QEMU's
hw/acpi/bios-linker-loader.c and its header (the interface's documentation):

* each command is 128 bytes, little-endian: u32 command, then a union padded to 124 bytes;
  file names are char[56], NUL-padded (fw_cfg's name length);
* ALLOCATE (1): file, u32 align (a power of 2), u8 zone (1 HIGH: anywhere in RAM below
  4 GiB; 2 FSEG: the 0xF0000 segment, where the RSDP must be for SeaBIOS and for OSes that scan);
  the firmware copies the whole file there;
* ADD_POINTER (2): dest file, src file, u32 offset, u8 size (1, 2, 4 or 8): the little-endian
  integer of `size` bytes at `offset` in dest gets the address of src added to it (so it is
  written as an offset into src);
* ADD_CHECKSUM (3): file, u32 offset, u32 start, u32 length: the byte at offset has the sum of
  bytes [start, start + length) subtracted, so that range sums to 0 (checksum byte included).

corral's tables are laid out from address 0 (acpi.machine_acpi_tables(base=0)): every pointer
between them is then already an offset into `etc/acpi/tables` (which starts with the 64 bytes
the RSDP takes in the direct-boot layout, left zero, so the FACS stays 64-byte aligned). The
RSDP goes in its own file, `etc/acpi/rsdp`, in the FSEG zone. Pointers to fixed hardware (LAPIC,
IOAPIC, ECAM, ports) are not relocated, and zero pointers (the FADT's 32-bit FIRMWARE_CTRL, the
RSDP's RSDT) stay zero.

`run` is the firmware's side: it executes a script against the files, every command checked
(known files, fields inside them, bounded counts), so tests and the fuzzer can hold corral's
script to what a firmware does with it; a malformed script is one TableLoaderError line.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from corral.arch.x86 import acpi
from corral.errors import CorralError

ENTRY_SIZE = 128
FILE_NAME = 56
ALLOCATE, ADD_POINTER, ADD_CHECKSUM, WRITE_POINTER = 1, 2, 3, 4
ZONE_HIGH, ZONE_FSEG = 1, 2
TABLES_FILE = "etc/acpi/tables"
RSDP_FILE = "etc/acpi/rsdp"
LOADER_FILE = "etc/table-loader"
TABLES_ALIGN = 64  # the FACS must be 64-byte aligned
RSDP_ALIGN = 16
MAX_ALIGN = 1 << 20
POINTER_SIZES = (1, 2, 4, 8)

# pointer fields between tables: (offset, size) in each table that holds them
_FADT_POINTERS = ((40, 4), (132, 8), (140, 8))  # DSDT, X_FIRMWARE_CTRL, X_DSDT
_RSDP_POINTERS = ((16, 4), (24, 8))  # RsdtAddress, XsdtAddress
_RSDP_CHECKSUMS = ((8, 20), (32, 36))  # (checksum byte, length): ACPI 1.0, then extended


class TableLoaderError(CorralError):
    """A table-loader script that cannot be run (a firmware would refuse it too)."""


@dataclass(frozen=True)
class Allocate:
    file: str
    align: int
    zone: int


@dataclass(frozen=True)
class AddPointer:
    dest: str
    src: str
    offset: int
    size: int


@dataclass(frozen=True)
class AddChecksum:
    file: str
    offset: int
    start: int
    length: int


Command = Allocate | AddPointer | AddChecksum


def _name(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < FILE_NAME:
        raise ValueError(f"loader file name {name!r}: 1 to {FILE_NAME - 1} bytes")
    return raw.ljust(FILE_NAME, b"\0")


def encode(commands: list[Command]) -> bytes:
    """The `etc/table-loader` blob for `commands`."""
    out = bytearray()
    for c in commands:
        if isinstance(c, Allocate):
            body = struct.pack("<I56sIB", ALLOCATE, _name(c.file), c.align, c.zone)
        elif isinstance(c, AddPointer):
            body = struct.pack("<I56s56sIB", ADD_POINTER, _name(c.dest), _name(c.src), c.offset, c.size)
        else:
            body = struct.pack("<I56sIII", ADD_CHECKSUM, _name(c.file), c.offset, c.start, c.length)
        out += body.ljust(ENTRY_SIZE, b"\0")
    return bytes(out)


def _file(raw: bytes) -> str:
    name = raw.split(b"\0", 1)[0]
    try:
        return name.decode()
    except UnicodeDecodeError:
        raise TableLoaderError(f"table loader: file name {name!r} is not text") from None


def decode(blob: bytes) -> list[Command]:
    """The commands of a loader blob. Entries with commands this loader does not know are
    skipped, as firmware skips them; WRITE_POINTER (a guest-to-host pointer) is refused."""
    if len(blob) % ENTRY_SIZE:
        raise TableLoaderError(
            f"table loader: {len(blob)} bytes is not a whole number of {ENTRY_SIZE}-byte commands"
        )
    out: list[Command] = []
    for pos in range(0, len(blob), ENTRY_SIZE):
        (cmd,) = struct.unpack_from("<I", blob, pos)
        if cmd == ALLOCATE:
            name, align, zone = struct.unpack_from("<56sIB", blob, pos + 4)
            out.append(Allocate(_file(name), align, zone))
        elif cmd == ADD_POINTER:
            dest, src, offset, size = struct.unpack_from("<56s56sIB", blob, pos + 4)
            out.append(AddPointer(_file(dest), _file(src), offset, size))
        elif cmd == ADD_CHECKSUM:
            name, offset, start, length = struct.unpack_from("<56sIII", blob, pos + 4)
            out.append(AddChecksum(_file(name), offset, start, length))
        elif cmd == WRITE_POINTER:
            raise TableLoaderError("table loader: WRITE_POINTER is not supported (corral has no such files)")
    return out


@dataclass
class Loaded:
    """A file as a firmware placed it."""

    addr: int
    data: bytearray


Place = Callable[[str, int, int, int], int]  # (file, size, align, zone) -> guest address


def run(commands: list[Command], files: Mapping[str, bytes], place: Place) -> dict[str, Loaded]:
    """Execute `commands` over `files` as a firmware does; `place` picks each allocation's
    address. Every field is checked against its file; the patched files are returned."""
    loaded: dict[str, Loaded] = {}

    def get(name: str) -> Loaded:
        if name not in loaded:
            raise TableLoaderError(f"table loader: {name!r} is used before it is allocated")
        return loaded[name]

    for c in commands:
        if isinstance(c, Allocate):
            if c.file not in files:
                raise TableLoaderError(f"table loader: no fw_cfg file {c.file!r} to allocate")
            if c.file in loaded:
                raise TableLoaderError(f"table loader: {c.file!r} is allocated twice")
            if c.align & (c.align - 1) or not 0 < c.align <= MAX_ALIGN:
                raise TableLoaderError(
                    f"table loader: alignment {c.align} is not a power of 2 up to {MAX_ALIGN}"
                )
            if c.zone not in (ZONE_HIGH, ZONE_FSEG):
                raise TableLoaderError(f"table loader: unknown zone {c.zone} for {c.file!r}")
            data = bytearray(files[c.file])
            loaded[c.file] = Loaded(place(c.file, len(data), c.align, c.zone), data)
        elif isinstance(c, AddPointer):
            dest, src = get(c.dest), get(c.src)
            if c.size not in POINTER_SIZES or c.offset + c.size > len(dest.data):
                raise TableLoaderError(
                    f"table loader: a {c.size}-byte pointer at {c.offset} is outside {c.dest!r}"
                )
            field = slice(c.offset, c.offset + c.size)
            value = (int.from_bytes(dest.data[field], "little") + src.addr) % (1 << (8 * c.size))
            dest.data[field] = value.to_bytes(c.size, "little")
        else:
            f = get(c.file)
            if c.offset >= len(f.data) or c.start + c.length > len(f.data):
                raise TableLoaderError(f"table loader: a checksum outside {c.file!r}")
            f.data[c.offset] = (f.data[c.offset] - sum(f.data[c.start : c.start + c.length])) & 0xFF
    return loaded


@dataclass(frozen=True)
class FirmwareAcpi:
    """The fw_cfg files that hand corral's ACPI tables to a firmware."""

    tables: bytes
    rsdp: bytes
    loader: bytes

    def files(self) -> dict[str, bytes]:
        return {TABLES_FILE: self.tables, RSDP_FILE: self.rsdp, LOADER_FILE: self.loader}


def firmware_acpi(num_cpus: int, mem_size: int) -> FirmwareAcpi:
    """corral's machine tables (acpi.machine_acpi_tables) as a loader script and its files."""
    t = acpi.machine_acpi_tables(num_cpus, mem_size, base=0)
    rsdp = t.table(b"RSD ")
    others = [(addr, data) for addr, data in t.blobs if data[:4] != b"RSD "]
    blob = bytearray(max(addr + len(data) for addr, data in others))
    commands: list[Command] = [
        Allocate(RSDP_FILE, RSDP_ALIGN, ZONE_FSEG),
        Allocate(TABLES_FILE, TABLES_ALIGN, ZONE_HIGH),
    ]
    checksums: list[Command] = []
    for addr, data in others:
        blob[addr : addr + len(data)] = data
        fields: tuple[tuple[int, int], ...] = ()
        if data[:4] == b"XSDT":
            fields = tuple((off, 8) for off in range(acpi.HEADER.size, len(data), 8))
        elif data[:4] == b"FACP":
            fields = _FADT_POINTERS
        commands += _pointers(TABLES_FILE, data, addr, fields)
        if data[:4] != b"FACS":  # the FACS has no checksum
            checksums.append(AddChecksum(TABLES_FILE, addr + 9, addr, len(data)))
    commands += _pointers(RSDP_FILE, rsdp, 0, _RSDP_POINTERS)
    commands += checksums
    commands += [AddChecksum(RSDP_FILE, off, 0, n) for off, n in _RSDP_CHECKSUMS]
    return FirmwareAcpi(bytes(blob), rsdp, encode(commands))


def _pointers(dest: str, data: bytes, at: int, fields: tuple[tuple[int, int], ...]) -> list[Command]:
    """ADD_POINTER for each non-zero field: it holds an offset into the tables file."""
    return [
        AddPointer(dest, TABLES_FILE, at + off, size)
        for off, size in fields
        if int.from_bytes(data[off : off + size], "little")
    ]


__all__ = [
    "LOADER_FILE",
    "RSDP_FILE",
    "TABLES_FILE",
    "AddChecksum",
    "AddPointer",
    "Allocate",
    "FirmwareAcpi",
    "Loaded",
    "TableLoaderError",
    "decode",
    "encode",
    "firmware_acpi",
    "run",
]
