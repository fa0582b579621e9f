"""SMBIOS tables for firmware: what `dmidecode` and the guest's DMI code read about the machine.

Why: SeaBIOS and OVMF take their SMBIOS tables from fw_cfg (`etc/smbios/smbios-tables`, the
structures, and `etc/smbios/smbios-anchor`, the entry point) when QEMU offers them, and place
them in guest memory, fixing the entry point's table address and checksums. A guest then reads
the vendor, the product, the CPU and the memory layout (Linux's /sys/class/dmi/id, dmidecode,
installers) as on QEMU. Facts from DMTF's SMBIOS specification (DSP0134, 2.8 layouts):

* the 2.1 (32-bit) entry point: "_SM_", checksum, length 0x1F, version 2.8, the largest
  structure, revision 0, "_DMI_", its checksum over bytes 16-30, the table's length and
  address (0 here: the firmware fills it in), the number of structures, BCD revision 0x28;
* each structure: u8 type, u8 length (of the formatted part), u16 handle, fields, then its
  strings (each NUL-terminated, numbered from 1) and one more NUL (two NULs when it has none).

The structures are those QEMU gives a PC: 0 (BIOS), 1 (system, with a UUID), 4 (one
processor: one socket holding every vCPU as a core, as corral's CPUID describes it), 16 (the
memory array), 17 (one memory device per 16 GiB, as QEMU splits them), 19 (each RAM range's
mapping), 32 (boot status: no errors) and 127 (the end). Handles follow QEMU's numbering
(type << 8, plus an index).
"""

from __future__ import annotations

import struct
import uuid as uuidlib

from corral.arch.x86 import layout

TABLES_FILE = "etc/smbios/smbios-tables"
ANCHOR_FILE = "etc/smbios/smbios-anchor"
VENDOR = "corral"
PRODUCT = "corral VM"
BIOS_VERSION = "corral"
BIOS_DATE = "01/01/2026"
DIMM_MAX = 16 * layout.GiB
ANCHOR_SIZE = 31
VERSION = (2, 8)
CAPACITY_EXTENDED = 0x8000_0000  # type 16's KiB field: "see the extended field (bytes)"
KiB_MAX32 = 0xFFFF_FFFF  # a 32-bit KiB address field's "see the extended field" value


def structure(kind: int, handle: int, fields: bytes, *strings: str) -> bytes:
    """One structure: header, formatted fields, string set. A string's number is its position
    from 1; an empty string is number 0 and takes no room."""
    body = struct.pack("<BBH", kind, 4 + len(fields), handle) + fields
    text = b"".join(s.encode() + b"\0" for s in strings if s)
    return body + (text + b"\0" if text else b"\0\0")


def _str_numbers(*strings: str) -> list[int]:
    """Each string's number as `structure` numbers them (0 for an empty one)."""
    out, n = [], 0
    for s in strings:
        n += bool(s)
        out.append(n if s else 0)
    return out


def bios() -> bytes:
    """Type 0: vendor, version, segment 0xE800, date; characteristics not supported (bit 3),
    extension byte 2: targeted content distribution and virtual machine (bits 2 and 4)."""
    vendor, version, date = _str_numbers(VENDOR, BIOS_VERSION, BIOS_DATE)
    f = struct.pack("<BBHBBQBBBBBB", vendor, version, 0xE800, date, 0, 1 << 3, 0, 0x14, 0, 0, 0xFF, 0xFF)
    return structure(0, 0x0000, f, VENDOR, BIOS_VERSION, BIOS_DATE)


def system(machine_uuid: uuidlib.UUID) -> bytes:
    """Type 1: manufacturer, product, the UUID (SMBIOS byte order: the first three fields
    little-endian), woken by the power switch (6)."""
    m, p = _str_numbers(VENDOR, PRODUCT)
    f = struct.pack("<BBBB16sBBB", m, p, 0, 0, machine_uuid.bytes_le, 6, 0, 0)
    return structure(1, 0x0100, f, VENDOR, PRODUCT)


def processor(num_cpus: int) -> bytes:
    """Type 4: one central processor socket, populated and enabled, `num_cpus` cores."""
    socket, maker = _str_numbers("CPU 0", VENDOR)
    cores = min(num_cpus, 0xFF)
    f = struct.pack(
        "<BBBB8sBBHHHBBHHHBBBBBBHH",
        socket, 3, 0x01, maker, bytes(8), 0, 0, 0, 2000, 2000, 0x41, 0x01,
        0xFFFF, 0xFFFF, 0xFFFF, 0, 0, 0, cores, cores, cores, 0x02, 0x01,
    )  # fmt: skip
    return structure(4, 0x0400, f, "CPU 0", VENDOR)


def memory_array(mem_size: int, devices: int) -> bytes:
    """Type 16: system memory (3) on the board (other, 1), multi-bit ECC (6) as QEMU says."""
    kib = mem_size // layout.KiB
    big = kib >= CAPACITY_EXTENDED  # then the extended field holds the size, in bytes
    f = struct.pack(
        "<BBBIHHQ",
        0x01,
        0x03,
        0x06,
        CAPACITY_EXTENDED if big else kib,
        0xFFFE,
        devices,
        mem_size if big else 0,
    )
    return structure(16, 0x1000, f)


def memory_device(index: int, size: int) -> bytes:
    """Type 17: a DIMM of `size` bytes, RAM (7), 64 bits wide."""
    mib = size // layout.MiB
    small = mib if mib < 0x7FFF else 0x7FFF
    locator, maker = _str_numbers(f"DIMM {index}", VENDOR)
    f = struct.pack(
        "<HHHHHBBBBBHHBBBBBIHHHH",
        0x1000, 0xFFFE, 64, 64, small, 0x09, 0, locator, 0, 0x07, 0x02, 0, maker, 0, 0, 0, 0,
        mib if small == 0x7FFF else 0, 0, 0, 0, 0,
    )  # fmt: skip
    return structure(17, 0x1100 + index, f, f"DIMM {index}", VENDOR)


def mapped_range(index: int, start: int, size: int) -> bytes:
    """Type 19: RAM from `start` for `size` bytes belongs to the array (KiB, or the extended
    byte fields when the range ends above 4 TiB)."""
    lo, hi = start // layout.KiB, (start + size) // layout.KiB - 1
    if hi < KiB_MAX32:
        f = struct.pack("<IIHBQQ", lo, hi, 0x1000, 1, 0, 0)
    else:
        f = struct.pack("<IIHBQQ", KiB_MAX32, KiB_MAX32, 0x1000, 1, start, start + size - 1)
    return structure(19, 0x1300 + index, f)


def boot_status() -> bytes:
    """Type 32: no errors detected."""
    return structure(32, 0x2000, bytes(6) + b"\0")


def end() -> bytes:
    return structure(127, 0x7F00, b"")


def smbios_structures(num_cpus: int, mem_size: int, machine_uuid: uuidlib.UUID) -> list[bytes]:
    dimms = [min(DIMM_MAX, mem_size - off) for off in range(0, mem_size, DIMM_MAX)]
    return [
        bios(),
        system(machine_uuid),
        processor(num_cpus),
        memory_array(mem_size, len(dimms)),
        *(memory_device(i, size) for i, size in enumerate(dimms)),
        *(mapped_range(i, start, size) for i, (start, size) in enumerate(layout.ram_ranges(mem_size))),
        boot_status(),
        end(),
    ]


def anchor(structures: list[bytes], table_addr: int = 0) -> bytes:
    """The 2.1 entry point for `structures` laid end to end at `table_addr`."""
    length = sum(len(s) for s in structures)
    largest = max(len(s) for s in structures)
    head = struct.pack("<4sBBBBHB5s", b"_SM_", 0, ANCHOR_SIZE, *VERSION, largest, 0, b"")
    dmi = struct.pack(
        "<5sBHIHB", b"_DMI_", 0, length, table_addr, len(structures), (VERSION[0] << 4) | VERSION[1]
    )
    ep = bytearray(head + dmi)
    ep[21] = (-sum(ep[16:31])) & 0xFF  # the intermediate (_DMI_) checksum
    ep[4] = (-sum(ep)) & 0xFF
    return bytes(ep)


def firmware_smbios(
    num_cpus: int, mem_size: int, machine_uuid: uuidlib.UUID | None = None
) -> dict[str, bytes]:
    """The fw_cfg files: the structures and their entry point (table address left 0). The
    UUID is random per machine unless given."""
    structures = smbios_structures(num_cpus, mem_size, machine_uuid or uuidlib.uuid4())
    return {TABLES_FILE: b"".join(structures), ANCHOR_FILE: anchor(structures)}


__all__ = ["ANCHOR_FILE", "TABLES_FILE", "anchor", "firmware_smbios", "smbios_structures", "structure"]
