"""ACPI tables for a corral machine: RSDP, XSDT, FADT (+FACS), MADT and DSDT.

They live in the BIOS area at 0xE0000, where Linux also finds the RSDP by scanning; the
loaders hand its address over explicitly too (boot_params.acpi_rsdp_addr, PVH rsdp_paddr).
Tables are a list the XSDT points at, so later devices (PCI's MCFG, ...) add entries
(`extra_tables`), and the DSDT is a list of AML objects (`extra_devices` go under \\_SB).

Layout from `base` (default 0xE0000), each table 16-byte aligned, in this order:
RSDP (36 bytes, at `base`), FACS (64-byte aligned), DSDT, FADT, MADT, extra tables, XSDT.

Choices:
* RSDP revision 2 with an XSDT only (RsdtAddress = 0): every OS that reads ACPI 2.0+ tables
  uses the XSDT, and Linux, the only guest we target, does; an RSDT would be a second list to
  keep in step for no reader we have.
* FADT revision 6, minor 3 (ACPI 6.3, like the revision 5 MADT), not hardware-reduced: the PM1
  event/control blocks and the PM timer are real ports (devices/legacy/acpi_pm.py). No SMI_CMD,
  so ACPI is always on (SCI_EN reads 1). The fixed-feature power button is present (PWRBTN in
  PM1, what AcpiPm.press_power_button() raises); there is no sleep button. Reset through
  RESET_REG = I/O 0xCF9, value 6. The FACS is given through X_FIRMWARE_CTRL only (with both
  set, Linux lists it twice).
* MADT: xAPIC entries (APIC id = ACPI processor UID = vCPU index), so 1 to 254 vCPUs; the IOAPIC
  takes id num_cpus, which no CPU uses. ISA IRQ0 -> GSI 2 (bus-default polarity/trigger, i.e.
  edge/high) and the SCI, IRQ 9 -> GSI 9 level/active-high; LINT1 is NMI on every CPU.
* DSDT: \\_S3 = {S3_SLP_TYP, ...} (suspend to RAM: the machine stops its vCPUs until the host
  wakes it, then vCPU 0 enters the FACS waking vector, see `waking_vector`) and
  \\_S5 = {S5_SLP_TYP, S5_SLP_TYP, 0, 0}; one ACPI0007 processor device per vCPU
  (_UID = the MADT processor UID); COM1 and the RTC with their ports and IRQs; fw_cfg as QEMU
  describes it (FWCF, _HID "QEMU0002", _STA 0x0B, its 12 ports), which Linux's qemu_fw_cfg
  driver binds to; and a PNP0C02 device reserving the other ports corral decodes (debug exit,
  PM block, reset). The i8042 is left out of the DSDT on purpose (see dsdt_objects); the
  FADT's 8042 flag announces it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from corral.arch.x86 import aml, layout
from corral.errors import GuestMemoryError

OEM_ID = b"CORRAL"
OEM_TABLE_ID = b"CORRALVM"
CREATOR_ID = b"CRRL"
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")

# FADT flags (ACPI 6.x table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button (we have one: left clear)
FADT_SLP_BUTTON = 1 << 5  # 1: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_8042 = 1 << 1
BOOT_VGA_NOT_PRESENT = 1 << 2
# MADT
MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
ISO_ACTIVE_HIGH, ISO_LEVEL, ISO_EDGE = 0b01, 0b11 << 2, 0b01 << 2
GAS_SYSTEM_IO = 1
CMOS_CENTURY = 0x32
# (port, length) ranges the PNP0C02 device reserves: debug exit (0x501-0x502), the probe's
# benchmark sink, the PM1/PM timer block. The reset register 0xCF9 lies inside 0xCF8-0xCFF, which
# the PCI host bridge claims.
FW_CFG_STA = 0x0B  # present, enabled, not shown in a UI: what QEMU gives FWCF
MOTHERBOARD_PORTS = [(layout.DEBUG_EXIT_PORT, 2), (layout.BENCH_SINK_PORT, 1), (layout.PM_BASE_PORT, 12)]


def checksum(data: bytes | bytearray) -> int:
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: header + body, with length and checksum filled in."""
    length = HEADER.size + len(body)
    hdr = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(hdr + body)
    table[9] = checksum(table)
    return bytes(table)


def gas(port: int, width_bits: int, access_size: int) -> bytes:
    """A Generic Address Structure for an I/O port (access_size: 1 byte, 2 word, 3 dword)."""
    if port == 0:
        return bytes(12)
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, access_size, port)


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    f = bytearray(276 - HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, f, offset - HEADER.size, *values)

    # FIRMWARE_CTRL stays 0: X_FIRMWARE_CTRL carries the FACS (both set = listed twice by Linux)
    put(36, "<II", 0, dsdt_addr)
    put(45, "<BH", 0, layout.SCI_IRQ)  # preferred PM profile: unspecified
    put(48, "<I", 0)  # no SMI_CMD: ACPI is always enabled
    put(56, "<I", layout.PM1_EVT_PORT)
    put(64, "<I", layout.PM1_CNT_PORT)
    put(76, "<I", layout.PM_TMR_PORT)
    put(88, "<BBBB", 4, 2, 0, 4)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN
    put(96, "<HH", 101, 1001)  # C2/C3 latencies > 100/1000: not supported
    put(108, "<B", CMOS_CENTURY)
    put(109, "<H", BOOT_LEGACY_DEVICES | BOOT_8042 | BOOT_VGA_NOT_PRESENT)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP)
    put(116, "<12s", gas(layout.RESET_PORT, 8, 1))
    put(128, "<B", 0x06)  # RESET_VALUE
    put(131, "<B", 3)  # FADT minor version: ACPI 6.3
    put(132, "<QQ", facs_addr, dsdt_addr)
    put(148, "<12s", gas(layout.PM1_EVT_PORT, 32, 2))
    put(172, "<12s", gas(layout.PM1_CNT_PORT, 16, 2))
    put(208, "<12s", gas(layout.PM_TMR_PORT, 32, 3))
    put(268, "<8s", b"CORRAL\0\0")  # hypervisor vendor identity
    return sdt(b"FACP", 6, bytes(f))


def facs() -> bytes:
    # No checksum; version 2; the waking vectors start 0 (the OS sets one before it enters S3).
    # Flags 0: no 64BIT_WAKE_SUPPORTED_F, so an X_FIRMWARE_WAKING_VECTOR is entered in 32-bit
    # protected mode, never 64-bit.
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", 64, 0, 0, 0, 0, 0, 2, b"", 0, b"")


# FACS fields (ACPI 6.x table 5.13)
FACS_WAKING_VECTOR = 12  # 32-bit FIRMWARE_WAKING_VECTOR: real mode, CS = v >> 4, IP = v & 0xF
FACS_X_WAKING_VECTOR = 24  # 64-bit X_FIRMWARE_WAKING_VECTOR (version >= 1): protected mode
FACS_VERSION = 32
RSDP_SCAN = (0xE0000, 0x100000)  # where the RSDP lies (corral's tables, SeaBIOS's F segment)
MAX_XSDT_ENTRIES = 64


class WakingVectorError(ValueError):
    """The guest's memory holds no usable FACS waking vector."""


class WakingVector(NamedTuple):
    """Where a waking CPU enters: `protected` False is real mode at `address` (CS:IP split as
    ACPI says), True is flat 32-bit protected mode, paging off, at `address`."""

    address: int
    protected: bool


def find_facs(read: Callable[[int, int], bytes]) -> int:
    """The FACS's guest-physical address, found as an OS finds it: the RSDP in the BIOS area,
    its XSDT, the FADT there, X_FIRMWARE_CTRL (or FIRMWARE_CTRL). `read(gpa, n)` reads guest
    memory and raises GuestMemoryError outside RAM. Guest memory is the guest's: every pointer is
    checked and every walk bounded; anything that does not fit raises WakingVectorError."""
    lo, hi = RSDP_SCAN
    try:
        area = read(lo, hi - lo)
        rsdp_off = next((o for o in range(0, len(area), 16) if area[o : o + 8] == b"RSD PTR "), -1)
        if rsdp_off < 0:
            raise WakingVectorError(f"no RSDP in {lo:#x}-{hi:#x}")
        rsdp_data = area[rsdp_off : rsdp_off + 36]
        if len(rsdp_data) < 36 or rsdp_data[15] < 2:
            raise WakingVectorError("the RSDP has no XSDT (revision < 2)")
        (xsdt_addr,) = struct.unpack_from("<Q", rsdp_data, 24)
        sig, length = struct.unpack("<4sI", read(xsdt_addr, 8))
        if sig != b"XSDT" or not HEADER.size <= length <= HEADER.size + 8 * MAX_XSDT_ENTRIES:
            raise WakingVectorError(f"no valid XSDT at {xsdt_addr:#x}")
        entries = read(xsdt_addr + HEADER.size, length - HEADER.size)
        for (ptr,) in struct.iter_unpack("<Q", entries[: len(entries) // 8 * 8]):
            if read(ptr, 4) != b"FACP":
                continue
            fadt_data = read(ptr, 140)
            (x_ctrl,) = struct.unpack_from("<Q", fadt_data, 132)
            (ctrl,) = struct.unpack_from("<I", fadt_data, 36)
            addr = x_ctrl or ctrl
            if read(addr, 4) != b"FACS":
                raise WakingVectorError(f"the FADT's FACS pointer {addr:#x} holds no FACS")
            return addr
    except WakingVectorError:
        raise
    except (GuestMemoryError, ValueError, struct.error) as exc:
        raise WakingVectorError(f"the guest's ACPI tables point outside RAM ({exc})") from None
    raise WakingVectorError("the XSDT lists no FADT")


def waking_vector(facs_data: bytes) -> WakingVector:
    """The vector a FACS (its first 64 bytes) gives: X_FIRMWARE_WAKING_VECTOR when the OS set
    it (FACS version >= 1; entered in 32-bit protected mode, as we offer no 64-bit wake), else
    FIRMWARE_WAKING_VECTOR in real mode. WakingVectorError when both are 0 or out of reach."""
    (vector,) = struct.unpack_from("<I", facs_data, FACS_WAKING_VECTOR)
    (x_vector,) = struct.unpack_from("<Q", facs_data, FACS_X_WAKING_VECTOR)
    if facs_data[FACS_VERSION] >= 1 and x_vector:
        if x_vector >= 1 << 32:
            raise WakingVectorError(f"X_FIRMWARE_WAKING_VECTOR {x_vector:#x} is above 4 GiB")
        return WakingVector(x_vector, True)
    if not vector:
        raise WakingVectorError("the guest set no waking vector in its FACS")
    if vector >= 1 << 20:
        raise WakingVectorError(f"FIRMWARE_WAKING_VECTOR {vector:#x} is above 1 MiB (real mode)")
    return WakingVector(vector, False)


def madt(num_cpus: int) -> bytes:
    if not 1 <= num_cpus <= 254:
        raise ValueError(f"the MADT describes 1 to 254 xAPIC CPUs, not {num_cpus}")
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for i in range(num_cpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, 1)
    ioapic_id = num_cpus  # the next id after the CPUs' APIC ids
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id, 0, layout.IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, 0, 2, 0)  # PIT IRQ0 -> GSI2, bus defaults
    body += struct.pack(
        "<BBBBIH", MADT_ISO, 10, 0, layout.SCI_IRQ, layout.SCI_IRQ, ISO_ACTIVE_HIGH | ISO_LEVEL
    )
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, ISO_ACTIVE_HIGH | ISO_EDGE, 1)
    return sdt(b"APIC", 5, bytes(body))


def _isa_device(name: str, hid: str, uid: int, *resources: bytes) -> bytes:
    return aml.device(
        name,
        aml.name("_HID", aml.integer(aml.eisa_id(hid))),
        aml.name("_UID", aml.integer(uid)),
        aml.name("_CRS", aml.resource_template(*resources)),
    )


def dsdt_objects(num_cpus: int, extra_devices: list[bytes] | None = None) -> list[bytes]:
    """The DSDT's AML: sleep states S3 and S5, then under \\_SB the CPUs, the ISA devices on the legacy
    bus and `extra_devices` (AML Device objects, e.g. a PCI host bridge)."""
    cpus = [
        aml.device(f"C{i:03X}", aml.name("_HID", aml.string("ACPI0007")), aml.name("_UID", aml.integer(i)))
        for i in range(num_cpus)
    ]
    isa = [
        _isa_device(
            "COM1", "PNP0501", 0, aml.io_port(layout.COM1_PORT, 8), aml.irq_no_flags(layout.COM1_IRQ)
        ),
        _isa_device("RTC_", "PNP0B00", 0, aml.io_port(layout.RTC_PORT, 2), aml.irq_no_flags(layout.RTC_IRQ)),
        fw_cfg_device(),
        # No PNP0303 for the i8042: Linux warns ("PS/2 appears to have AUX port disabled") when
        # the DSDT lists a keyboard but no PS/2 mouse, and ours has no mouse port. Without one,
        # the FADT's 8042 boot flag makes Linux probe 0x60/0x64, IRQ 1, directly (info lines).
        # ports corral's own devices use, so the OS never hands them to anything else
        # The ECAM window is reserved here too, as Linux wants for MCFG ranges.
        _isa_device(
            "SYSR",
            "PNP0C02",
            1,
            *(aml.io_port(p, n) for p, n in MOTHERBOARD_PORTS),
            aml.memory32_fixed(layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE),
        ),
    ]
    # {SLP_TYPa, SLP_TYPb, reserved, reserved}
    s3, s5 = (
        aml.name(name, aml.package(*(aml.integer(v) for v in (typ, typ, 0, 0))))
        for name, typ in (("_S3_", layout.S3_SLP_TYP), ("_S5_", layout.S5_SLP_TYP))
    )
    return [s3, s5, aml.scope("\\_SB_", *cpus, *isa, *(extra_devices or []))]


def fw_cfg_device() -> bytes:
    """\\_SB.FWCF: fw_cfg's ports, under the _HID QEMU gives them (a string: not an EISA id)."""
    return aml.device(
        "FWCF",
        aml.name("_HID", aml.string("QEMU0002")),
        aml.name("_STA", aml.integer(FW_CFG_STA)),
        aml.name("_CRS", aml.resource_template(aml.io_port(layout.FW_CFG_PORT, layout.FW_CFG_PORTS))),
    )


def mcfg() -> bytes:
    """MCFG: one ECAM allocation, segment 0, buses 0 to 0."""
    body = bytes(8) + struct.pack("<QHBBI", layout.PCI_ECAM_BASE, 0, 0, 0, 0)
    return sdt(b"MCFG", 1, body)


def pci_host_bridge(mem_size: int) -> bytes:
    """\\_SB.PCI0: a PCIe root (PNP0A08, compatible with PNP0A03) on bus 0 whose windows are the
    config ports, all other I/O ports, the 32-bit BAR window and the 64-bit one above RAM. Its
    _OSC grants the OS everything it asks for: there is no firmware that could want any back."""
    start64, size64 = layout.pci_mmio64_window(mem_size)
    crs = aml.resource_template(
        aml.word_bus_number(0, 0),
        aml.io_port(layout.PCI_CONFIG_ADDRESS_PORT, 8),
        aml.word_io(0x0000, layout.PCI_CONFIG_ADDRESS_PORT - 1),
        aml.word_io(0x0D00, 0xFFFF),
        aml.dword_memory(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - 1),
        aml.qword_memory(start64, start64 + size64 - 1),
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.integer(aml.eisa_id("PNP0A08"))),
        aml.name("_CID", aml.integer(aml.eisa_id("PNP0A03"))),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.name("_PRT", pci_routing_table()),
        aml.method("_OSC", 4, aml.return_(aml.arg(3))),
    )


def pci_routing_table() -> bytes:
    """_PRT: INTA-INTD of slots 1-31 straight to IOAPIC GSIs (no link devices)."""
    entries = [
        aml.package(
            aml.integer((slot << 16) | 0xFFFF),
            aml.integer(pin),
            aml.integer(0),
            aml.integer(layout.pci_intx_gsi(slot, pin)),
        )
        for slot in range(1, 32)
        for pin in range(4)
    ]
    return aml.package(*entries)


def dsdt(objects: list[bytes]) -> bytes:
    return sdt(b"DSDT", 2, b"".join(objects))


def rsdp(xsdt_addr: int) -> bytes:
    r = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0, b""))
    r[8] = checksum(r[:20])
    r[32] = checksum(r)
    return bytes(r)


class AcpiTables(NamedTuple):
    rsdp_addr: int
    blobs: list[tuple[int, bytes]]  # (guest address, table), filled in by build_acpi_tables

    def write_to(self, mem) -> None:  # mem: GuestMemory (anything with .write(gpa, data))
        for addr, data in self.blobs:
            mem.write(addr, data)

    def table(self, signature: bytes) -> bytes:
        for _, data in self.blobs:
            if data[:4] == signature:
                return data
        raise KeyError(signature)


def build_acpi_tables(
    num_cpus: int,
    *,
    base: int = layout.ACPI_START,
    limit: int = layout.ACPI_END,
    extra_tables: list[bytes] | None = None,
    extra_devices: list[bytes] | None = None,
    extra_dsdt: list[bytes] | None = None,
) -> AcpiTables:
    """Lay the tables out from `base`: RSDP, FACS, DSDT, FADT, MADT, extra tables, XSDT.

    extra_tables: complete tables (built with `sdt`) the XSDT also points at (an MCFG, ...).
    extra_devices: AML Device objects placed in the DSDT under \\_SB.
    extra_dsdt: AML terms placed at the DSDT's root, after \\_S5 and the \\_SB scope.
    Raises ValueError when num_cpus is not 1 to 254 or the tables do not fit below `limit`.
    """
    if base % 16:
        raise ValueError(f"the RSDP must be 16-byte aligned, not at {base:#x}")
    out = AcpiTables(rsdp_addr=base, blobs=[])
    cursor = base + 64  # the RSDP takes 36 bytes; keep FACS 64-byte aligned

    def place(data: bytes, align: int = 16) -> int:
        nonlocal cursor
        addr = (cursor + align - 1) & ~(align - 1)
        if addr + len(data) > limit:
            raise ValueError(
                f"ACPI tables do not fit in {base:#x}-{limit:#x} ({num_cpus} CPUs): "
                f"the {data[:4].decode()} table ({len(data)} bytes) would end at "
                f"{addr + len(data):#x}"
            )
        out.blobs.append((addr, data))
        cursor = addr + len(data)
        return addr

    facs_addr = place(facs(), 64)
    dsdt_addr = place(dsdt(dsdt_objects(num_cpus, extra_devices) + (extra_dsdt or [])))
    pointers = [place(fadt(dsdt_addr, facs_addr)), place(madt(num_cpus))]
    pointers += [place(t) for t in extra_tables or []]
    xsdt_addr = place(sdt(b"XSDT", 1, b"".join(struct.pack("<Q", p) for p in pointers)))
    out.blobs.insert(0, (base, rsdp(xsdt_addr)))
    return out


def machine_acpi_tables(num_cpus: int, mem_size: int, *, base: int = layout.ACPI_START) -> AcpiTables:
    """The tables of a corral machine: the base set plus PCI (MCFG and the host bridge), laid out
    from `base` in a region as large as the BIOS area (base 0: offsets, for the table loader)."""
    return build_acpi_tables(
        num_cpus,
        base=base,
        limit=base + layout.ACPI_END - layout.ACPI_START,
        extra_tables=[mcfg()],
        extra_devices=[pci_host_bridge(mem_size)],
    )
