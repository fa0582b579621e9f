"""The KVM side of one VM: capabilities, the in-kernel irqchip and PIT, memory slots, dirty
logging, the guest clock and KVM's own VM state.

Everything the machine needs from the VM fd goes through `Vm`, so the machine above speaks in
verbs (map this memory, start the dirty log, freeze the clock) and never issues an ioctl. The
capability table is the one list of what corral uses: `corral doctor` prints it, and `Vm.create`
refuses a host that lacks a required entry.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import threading
from typing import NamedTuple

from corral.arch.x86 import layout
from corral.errors import HostError
from corral.kvm import Kvm, VcpuFd, VmFd
from corral.kvm import constants as K
from corral.kvm.structs import KVM_PIT_SPEAKER_DUMMY
from corral.memory import GuestMemory, MemorySlot
from corral.vstate.irq import KvmIrqLine, pc_routes
from corral.vstate.kvm_state import VmKvmState, load_vm, save_vm, set_clock

PAGE = 4096
_BLOCK = 4096  # bitmap bytes compared with zeros at once: 32768 pages, 128 MiB of RAM
_ZEROS = bytes(_BLOCK)
_DIRTY = bytes([0] + [1] * 255)  # a bitmap byte -> 1 where it marks a dirty page, 0 where not
_BITS = tuple(tuple(n for n in range(8) if byte >> n & 1) for byte in range(256))


def dirty_pages(bitmap: bytes | bytearray) -> list[int]:
    """The numbers of the bits set in a KVM dirty bitmap (bit n of byte i: page 8 * i + n; the
    same as bit n of 64-bit word w being page 64 * w + n, little-endian), in order. Clean
    stretches are skipped in C (a compare with zeros per block, then translate() and find()
    within a dirty block), not word by word in Python: the final read of a migration's
    stop-and-copy covers every guest page (an idle 8 GiB guest's 256 KiB of bitmap took
    ~1.2 ms to walk word by word)."""
    out: list[int] = []
    for base in range(0, len(bitmap), _BLOCK):
        block = bitmap[base : base + _BLOCK]
        if block == _ZEROS[: len(block)]:
            continue
        flags = block.translate(_DIRTY)
        first = flags.find(1)
        while first != -1:
            last = flags.find(0, first)
            if last == -1:
                last = len(flags)
            out.extend(8 * (base + i) + n for i in range(first, last) for n in _BITS[block[i]])
            first = flags.find(1, last)
    return out


FLASH_SLOT = 15  # KVM slot of a flash bank's array view (OVMF's variables), mapped and unmapped
ROM_SLOT = 16  # KVM slot of a firmware ROM; RAM uses 0 and 1
SPLIT_SLOT = 17  # the first KVM slot of RAM pieces split off for write protection (split_memory)


class Capability(NamedTuple):
    cap: int
    name: str  # KVM_CAP_<name>
    use: str  # what corral uses it for
    required: bool  # corral cannot run without it


CAPABILITIES: tuple[Capability, ...] = (
    Capability(K.CAP_IRQCHIP, "IRQCHIP", "in-kernel PIC, IOAPIC and LAPIC", True),
    Capability(K.CAP_PIT2, "PIT2", "in-kernel i8254 timer", True),
    Capability(K.CAP_USER_MEMORY, "USER_MEMORY", "guest RAM from a memfd mapping", True),
    Capability(K.CAP_SET_TSS_ADDR, "SET_TSS_ADDR", "real-mode TSS on VMX hosts", True),
    Capability(K.CAP_EXT_CPUID, "EXT_CPUID", "per-vCPU CPUID and topology", True),
    Capability(K.CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT", "race-free vCPU kicks", True),
    Capability(K.CAP_MP_STATE, "MP_STATE", "SMP bring-up state (INIT/SIPI) and snapshots", False),
    Capability(K.CAP_IOEVENTFD, "IOEVENTFD", "virtio doorbells off the vCPU exit path", False),
    Capability(K.CAP_IRQFD, "IRQFD", "device interrupts without a vCPU exit", False),
    Capability(K.CAP_IRQ_ROUTING, "IRQ_ROUTING", "IRQ 0 on IOAPIC pin 2, MSI-X routes", True),
    Capability(K.CAP_COALESCED_MMIO, "COALESCED_MMIO", "batched writes to chatty registers", False),
    Capability(K.CAP_SET_GUEST_DEBUG, "SET_GUEST_DEBUG", "gdb breakpoints and single-step", False),
    Capability(K.CAP_XSAVE, "XSAVE", "FPU/AVX state in snapshots", False),
    Capability(K.CAP_XCRS, "XCRS", "XCR0 in snapshots", False),
    Capability(K.CAP_VCPU_EVENTS, "VCPU_EVENTS", "pending events in snapshots", False),
    Capability(K.CAP_DEBUGREGS, "DEBUGREGS", "debug registers in snapshots", False),
    Capability(K.CAP_ADJUST_CLOCK, "ADJUST_CLOCK", "kvmclock across snapshot/restore", False),
    Capability(
        K.CAP_MANUAL_DIRTY_LOG_PROTECT2, "MANUAL_DIRTY_LOG_PROTECT2", "live-migration dirty logging", False
    ),
    Capability(K.CAP_DIRTY_LOG_RING, "DIRTY_LOG_RING", "dirty ring for live migration", False),
    Capability(K.CAP_READONLY_MEM, "READONLY_MEM", "read-only memory slots (ROMs)", False),
    Capability(K.CAP_TSC_CONTROL, "TSC_CONTROL", "TSC frequency across migration", False),
)


def missing_capabilities(kvm: Kvm) -> list[str]:
    """The names of the required capabilities this KVM lacks."""
    return [c.name for c in CAPABILITIES if c.required and not kvm.check_extension(c.cap)]


def max_vcpus(kvm: Kvm) -> int:
    return kvm.check_extension(K.CAP_MAX_VCPUS) or kvm.check_extension(K.CAP_NR_VCPUS)


class Vm:
    """A KVM VM with corral's PC platform in the kernel (PIC, IOAPIC, LAPICs, PIT)."""

    def __init__(self, kvm: Kvm, fd: VmFd) -> None:
        self.kvm = kvm
        self.fd = fd
        self.memory: GuestMemory | None = None
        self._pieces: list[MemorySlot] = []  # the KVM slots RAM is mapped with
        self._readonly: set[int] = set()  # KVM slots mapped read-only (set_readonly)
        self._flags = 0  # what every RAM slot carries now (dirty logging)
        self._rom: mmap.mmap | None = None
        self._flash: mmap.mmap | None = None
        self._mapping: tuple[threading.Event, list[Exception]] | None = None  # map_memory's
        self.supported_cpuid = kvm.supported_cpuid()
        self._msr_indices = kvm.msr_index_list()

    @classmethod
    def create(cls, kvm_path: str, cpus: int) -> Vm:
        """Open KVM at `kvm_path`, check it has what corral needs for `cpus` vCPUs, and create
        the VM with its in-kernel irqchip and PIT."""
        kvm = Kvm(kvm_path)
        try:
            missing = missing_capabilities(kvm)
            if missing:
                raise HostError(f"{kvm_path} lacks KVM_CAP_{missing[0]}, which corral needs")
            limit = max_vcpus(kvm)
            if cpus > limit:
                raise HostError(f"cpus: {cpus} vCPUs is more than this host's KVM allows ({limit})")
            fd = kvm.create_vm()
        except BaseException:
            kvm.close()
            raise
        try:
            fd.set_tss_addr(layout.KVM_TSS_ADDR)
            fd.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            fd.create_irqchip()
            # KVM's default table puts GSI 0 on IOAPIC pin 0; the MADT promises pin 2 (as on
            # every PC). Without this a machine with no MSI-X device (whose IrqRouter rewrites
            # the table) got PIT interrupts on a pin no guest unmasks: `nolapic_timer` hung.
            fd.set_gsi_routing(pc_routes())
            fd.create_pit2(KVM_PIT_SPEAKER_DUMMY)
            return cls(kvm, fd)
        except BaseException:
            fd.close()
            kvm.close()
            raise

    @property
    def msr_indices(self) -> list[int]:
        """The MSRs KVM lists for this host (what boot and snapshots consider)."""
        return self._msr_indices

    # -- memory -----------------------------------------------------------------------------
    def map_memory(self, memory: GuestMemory, *, background: bool = False) -> None:
        """Give the guest `memory`, one KVM slot per RAM range. With `background` the slots are
        registered on a helper thread while the caller goes on: on PVM a slot's
        KVM_SET_USER_MEMORY_REGION sleeps 4-12 ms (~0.1 ms of CPU), at every launch. Call
        wait_mapped() before a vCPU runs or anything else changes the slots."""
        self.memory = memory
        self._pieces = list(memory.slots)
        if not background:
            self._set_slots(0)
            return
        failed: list[Exception] = []
        done = threading.Event()

        def register() -> None:
            try:
                self._set_slots(0)
            except Exception as exc:  # noqa: BLE001  (raised on the caller's thread by wait_mapped)
                failed.append(exc)
            finally:
                done.set()

        # Waited for with an event, never Thread.join: a Ctrl-C landing in join() marks a
        # running thread stopped (Python 3.11), and one still running when the interpreter
        # finalizes ends in pthread_exit, whose unwinder (libgcc_s) cannot be loaded under a
        # seccomp filter (a reboot's rebuild is under one). Not a daemon, so exit waits for it.
        threading.Thread(target=register, name="corral-memslots").start()
        self._mapping = (done, failed)

    def wait_mapped(self) -> None:
        """Wait for a background map_memory(); raise what it failed with."""
        if self._mapping is None:
            return
        done, failed = self._mapping
        done.wait()  # a KeyboardInterrupt here leaves it for close() to wait for
        self._mapping = None
        if failed:
            raise failed[0]

    def split_memory(self, ranges: list[tuple[int, int]]) -> None:
        """Give each (gpa, size) range of RAM its own KVM slot, so that `set_readonly` can
        protect it alone (the BIOS shadow area under the chipset's PAM registers). Before any
        vCPU runs: the slots a range cuts are remapped, leaving a moment with no RAM there."""
        assert self.memory is not None
        cuts = sorted(ranges)
        pieces: list[MemorySlot] = []
        next_slot = SPLIT_SLOT
        for s in self._pieces:
            inside = [(g, n) for g, n in cuts if s.gpa <= g and g + n <= s.end]
            if not inside:
                pieces.append(s)
                continue
            self.fd.set_user_memory_region(s.slot, s.gpa, 0, s.host_addr, 0)  # delete it
            edges = sorted({s.gpa, s.end, *(g for g, _ in inside), *(g + n for g, n in inside)})
            for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
                slot = s.slot if i == 0 else next_slot
                next_slot += i > 0
                piece = MemorySlot(slot, lo, hi - lo, s.offset + lo - s.gpa, s.host_addr + lo - s.gpa)
                pieces.append(piece)
                self._map(piece)
        self._pieces = pieces

    def set_readonly(self, gpa: int, readonly: bool) -> None:
        """Map the piece split off at `gpa` read-only (guest writes exit as MMIO, to be dropped
        there) or writable again. KVM cannot change that flag in place: the slot is deleted and
        added back, so another vCPU touching the piece just then sees an MMIO exit."""
        piece = next((p for p in self._pieces if p.gpa == gpa and p.slot >= SPLIT_SLOT), None)
        if piece is None:
            raise ValueError(f"no RAM piece split off at {gpa:#x}")
        if (piece.slot in self._readonly) == readonly:
            return
        self.fd.set_user_memory_region(piece.slot, piece.gpa, 0, piece.host_addr, 0)
        if readonly:
            self._readonly.add(piece.slot)
        else:
            self._readonly.discard(piece.slot)
        self._map(piece)

    def readonly_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) of each RAM piece mapped read-only now."""
        return [(p.gpa, p.size) for p in self._pieces if p.slot in self._readonly]

    def map_rom(self, gpa: int, image: bytes) -> None:
        """Map `image` read-only at `gpa` (firmware at the top of 4 GiB): the guest reads and
        executes it from KVM directly; its writes become MMIO exits (ignore them on the bus)."""
        if not self.kvm.check_extension(K.CAP_READONLY_MEM):
            raise HostError("this host's KVM lacks KVM_CAP_READONLY_MEM, which a firmware ROM needs")
        if self._rom is not None or not image or len(image) % PAGE or gpa % PAGE:
            raise ValueError("one page-aligned ROM per VM")
        rom = mmap.mmap(-1, len(image), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        rom[:] = image
        host_addr = ctypes.addressof(ctypes.c_char.from_buffer(rom))
        self.fd.set_user_memory_region(ROM_SLOT, gpa, len(image), host_addr, K.MEM_READONLY)
        self._rom = rom

    def map_flash(self, gpa: int, bank: mmap.mmap, mapped: bool) -> None:
        """Show `bank` read-only at `gpa` (a flash bank reading as an array: KVM serves reads,
        writes exit as MMIO), or take it away so that reads exit too (a flash command is in
        progress). Called from a vCPU thread on the bank's writes, as PAM's remapping is."""
        # checked at build time only: the vCPU threads' seccomp filter allows no KVM-fd ioctl
        if self._flash is None and not self.kvm.check_extension(K.CAP_READONLY_MEM):
            raise HostError("this host's KVM lacks KVM_CAP_READONLY_MEM, which a flash bank needs")
        if not len(bank) or len(bank) % PAGE or gpa % PAGE:
            raise ValueError("a flash bank is whole pages, page-aligned")
        host_addr = ctypes.addressof(ctypes.c_char.from_buffer(bank))
        size = len(bank) if mapped else 0
        self._flash = bank  # kept until the VM is closed, as the ROM is
        self.fd.set_user_memory_region(FLASH_SLOT, gpa, size, host_addr, K.MEM_READONLY)

    def _map(self, s: MemorySlot) -> None:
        flags = self._flags | (K.MEM_READONLY if s.slot in self._readonly else 0)
        self.fd.set_user_memory_region(s.slot, s.gpa, s.size, s.host_addr, flags)

    def _set_slots(self, flags: int) -> None:
        assert self.memory is not None
        self._flags = flags
        for s in self._pieces:
            self._map(s)

    def start_dirty_log(self) -> None:
        """Log guest writes to RAM from now on (read with `read_dirty_log`)."""
        self._set_slots(K.MEM_LOG_DIRTY_PAGES)

    def stop_dirty_log(self) -> None:
        self._set_slots(0)

    def read_dirty_log(self) -> set[int]:
        """Backing offsets of the pages the guest wrote since dirty logging started or since
        the last read (KVM clears the log as it hands it over)."""
        assert self.memory is not None
        out: set[int] = set()
        for s in self._pieces:
            out.update(
                s.offset + page * PAGE for page in dirty_pages(self.fd.get_dirty_log(s.slot, s.size // PAGE))
            )
        return out

    # -- interrupts, vCPUs ------------------------------------------------------------------
    def irq_line(self, gsi: int) -> KvmIrqLine:
        """An input of the in-kernel PIC+IOAPIC, for a device to drive."""
        return KvmIrqLine(self.fd, gsi)

    def create_vcpu(self, index: int) -> VcpuFd:
        return self.fd.create_vcpu(index)

    # -- clock and KVM's VM state -----------------------------------------------------------
    def get_clock(self) -> int:
        """The guest's kvmclock, in nanoseconds."""
        return self.fd.get_clock().clock

    def set_clock(self, ns: int) -> None:
        set_clock(self.fd, ns)

    def save_state(self) -> VmKvmState:
        return save_vm(self.fd)

    def load_state(self, state: VmKvmState) -> None:
        load_vm(self.fd, state)

    def close(self) -> None:
        if self._mapping is not None:
            self._mapping[0].wait()  # its ioctls use the fd
            self._mapping = None
        self.fd.close()
        self.kvm.close()
        # the mapping goes only after the VM that used it (ctypes holds an export: let it go)
        self._rom = None
        self._flash = None


__all__ = ["CAPABILITIES", "Capability", "Vm", "dirty_pages", "max_vcpus", "missing_capabilities"]
