"""Guest-physical memory map of a corral x86-64 machine.

Low memory holds the structures the VMM writes for the guest before it starts (GDT, page tables,
zero page, command line, ACPI tables); RAM above 3 GiB is moved above 4 GiB so the 32-bit MMIO
hole holds the IOAPIC, LAPIC and room for device BARs.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- low memory, written by the VMM --------------------------------------------------------
BOOT_GDT = 0x500  # boot GDT: 0x00 null, 0x08 TSS, 0x10 code (__BOOT_CS), 0x18 data (__BOOT_DS)
BOOT_IDT = 0x520  # empty IDT (limit 0): any exception before the guest sets one up faults
PVH_START_INFO = 0x6000  # struct hvm_start_info + memmap
ZERO_PAGE = 0x7000  # struct boot_params for the Linux 64-bit boot protocol
MULTIBOOT_INFO = 0x8000  # struct multiboot_info (+ mmap at MULTIBOOT_INFO + 0x100)
PML4 = 0x9000  # identity page tables for 64-bit entry: PML4, PDPT, 4 PDs (4 GiB)
PDPT = 0xA000
PD = 0xB000  # 4 pages: 0xB000..0xEFFF
BOOT_STACK = 0x8FF0  # initial stack pointer handed to kernels that want one
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000  # 64 KiB, including the NUL
EBDA_START = 0x9FC00  # RAM ends here in the first MiB; the BIOS area above is reserved
ACPI_START = 0xE0000  # RSDP and tables live in the BIOS read-only area, where Linux scans
ACPI_END = 0x100000
HIMEM_START = 0x100000  # kernels load at 1 MiB

# --- the 32-bit hole ------------------------------------------------------------------------
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
PCI_MMIO32_START = 0xC000_0000  # 32-bit BAR window: the first 512 MiB of the hole
PCI_MMIO32_END = 0xE000_0000
PCI_ECAM_BASE = 0xE000_0000  # PCIe ECAM for bus 0 (1 MiB), announced by ACPI MCFG
PCI_ECAM_SIZE = 1 * MiB
PCI_MMIO64_SIZE = 64 * GiB  # 64-bit BAR window, placed above the top of RAM
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000  # one page, for the real-mode identity map (VMX)
KVM_TSS_ADDR = 0xFFFB_D000  # three pages, for the real-mode TSS (VMX)

# --- ports ----------------------------------------------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_CMD_PORT = 0x64
RTC_PORT = 0x70
RTC_IRQ = 8
POST_PORT = 0x80  # port-80 POST codes / Linux io delay: accepted and ignored
DEBUG_EXIT_PORT = 0x501  # QEMU isa-debug-exit default iobase
FW_CFG_PORT = 0x510  # QEMU's fw_cfg: selector, data, DMA address (devices/legacy/fw_cfg.py)
FW_CFG_PORTS = 12
BENCH_SINK_PORT = 0x504  # the probe guest's pio-bench target: writes are accepted and ignored
PM_BASE_PORT = 0x600  # ACPI PM1 event block (4 bytes) then PM1 control (2 bytes)
PM1_EVT_PORT = PM_BASE_PORT
PM1_CNT_PORT = PM_BASE_PORT + 4
PM_TMR_PORT = PM_BASE_PORT + 8  # ACPI PM timer (3.579545 MHz)
PCI_CONFIG_ADDRESS_PORT = 0xCF8  # PCI configuration mechanism #1 (address latch; data at 0xCFC)
PCI_CONFIG_DATA_PORT = 0xCFC
RESET_PORT = 0xCF9  # ACPI reset register (FADT RESET_REG), value 0x06 resets
SCI_IRQ = 9
S5_SLP_TYP = 5  # SLP_TYP the DSDT's \_S5 package advertises
S3_SLP_TYP = 1  # SLP_TYP of \_S3 (suspend to RAM), QEMU's value

# --- limits ---------------------------------------------------------------------------------
MIN_MEMORY = 16 * MiB
MAX_MEMORY = 1024 * GiB


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """(guest-physical start, size) of each RAM slot for a guest of `mem_size` bytes."""
    if mem_size <= MMIO_HOLE_START:
        return [(0, mem_size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem_size - MMIO_HOLE_START)]


PCI_INTX_GSI_BASE = 16  # PCI INTx lines use IOAPIC pins 16-23 (level, active low)


def pci_intx_gsi(slot: int, pin: int = 0) -> int:
    """The GSI of INTA..INTD (pin 0..3) of a device in `slot`: rotated so slots spread out."""
    return PCI_INTX_GSI_BASE + (slot + pin) % 8


def pci_mmio64_window(mem_size: int) -> tuple[int, int]:
    """(start, size) of the 64-bit BAR window: the first 1 GiB boundary above RAM and 4 GiB."""
    top = max(end for _, end in ((s, s + n) for s, n in ram_ranges(mem_size)))
    start = (max(top, MMIO_HOLE_END) + GiB - 1) & ~(GiB - 1)
    return start, PCI_MMIO64_SIZE


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The e820 map (addr, size, type) the guest sees: 1 = RAM, 2 = reserved. The ECAM window
    is reserved too: Linux trusts MCFG only where the firmware reserved its range."""
    entries = [
        (0, EBDA_START, 1),
        (EBDA_START, HIMEM_START - EBDA_START, 2),
        (PCI_ECAM_BASE, PCI_ECAM_SIZE, 2),
    ]
    for start, size in ram_ranges(mem_size):
        lo = max(start, HIMEM_START)
        if start + size > lo:
            entries.append((lo, start + size - lo, 1))
    return sorted(entries)
