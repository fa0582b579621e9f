"""Assembles a machine's parts from a validated MachineConfig (Firecracker's builder).

    vm = Vm.create(...)                     # KVM: irqchip, PIT, capabilities (vstate)
    board = build_board(vm, memory, config, control, console)     # buses, devices, PCI, virtio
    boot = load_guest(memory, config)       # ACPI tables and the kernel in guest memory
    vcpus = create_vcpus(vm, board, host, config, boot)            # or restore_vcpus(...)

The board is the PC: the legacy devices on their ports, the PCI root on ECAM and the config
ports, and one virtio-pci function per virtio device the config asks for, each with its BAR
placed in the 32-bit window as firmware would leave it. Devices get interrupt lines, guest
memory, the device event loop and `VmControl`; only this module and vstate/ know about KVM.
"""

from __future__ import annotations

import importlib
import logging
import mmap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from corral.arch.x86 import layout
from corral.arch.x86.acpi import machine_acpi_tables
from corral.arch.x86.cpuid import vcpu_cpuid
from corral.arch.x86.msr import boot_msrs
from corral.backends.tap import Tap
from corral.boot.loader import BootInfo, load_kernel_file, read_boot_file
from corral.config import DiskConfig, MachineConfig, NetConfig, VsockConfig
from corral.devices.base import Stateful, VmControl
from corral.devices.bus import BusConflictError, MmioBus, PioBus
from corral.devices.legacy import fw_cfg
from corral.devices.legacy.acpi_pm import AcpiPm
from corral.devices.legacy.debug_exit import DebugExit
from corral.devices.legacy.i8042 import I8042
from corral.devices.legacy.post import PostSink
from corral.devices.legacy.reset import ResetRegister
from corral.devices.legacy.rtc import CmosRtc
from corral.devices.legacy.uart import Serial16550
from corral.devices.pci.config import CMD_MEMORY, COMMAND, INTERRUPT_LINE
from corral.devices.pci.root import ConfigPorts, Ecam, PciRoot
from corral.errors import FieldError
from corral.memory import GuestMemory
from corral.vstate.irq import IrqRouter
from corral.vstate.kvm_state import VcpuState
from corral.vstate.kvm_stats import VcpuStats
from corral.vstate.vcpu import Vcpu, VcpuHost
from corral.vstate.vm import Vm

if TYPE_CHECKING:
    from corral.backends.flash import VarsFile
    from corral.boot import firmware
    from corral.devices.virtio.base import VirtioDevice
    from corral.devices.virtio.blk import VirtioBlock
    from corral.devices.virtio.console import VirtioConsole
    from corral.devices.virtio.net import FrameFilter, VirtioNet
    from corral.devices.virtio.pci import VirtioPciDevice
    from corral.devices.virtio.vsock import VirtioVsock
    from corral.eventloop import EventLoop
    from corral.vstate.doorbells import KvmDoorbells

# What only some machines use is imported when one does: a machine without virtio devices or
# firmware (the probe, a microVM's first boot) starts ~15 ms sooner. A thread that may build a
# machine under its seccomp filter, which maps no new code (a C extension), calls preload()
# before it enters the filter; tests/unit/test_builder_lazy.py holds this list to the imports
# made inside functions here, in fw_cfg (a firmware's tables) and in the kernel loader (bzImage
# and Multiboot, loaded when the kernel is one).
LAZY_MODULES = (
    "corral.arch.x86.acpi_loader",
    "corral.arch.x86.smbios",
    "corral.backends.console",
    "corral.backends.disk",
    "corral.backends.flash",
    "corral.backends.unix_socket",
    "corral.boot.bzimage",
    "corral.boot.firmware",
    "corral.boot.multiboot",
    "corral.devices.legacy.pflash",
    "corral.devices.pci.i440fx",
    "corral.devices.pci.piix",
    "corral.devices.virtio.balloon",
    "corral.devices.virtio.blk",
    "corral.devices.virtio.console",
    "corral.devices.virtio.net",
    "corral.devices.virtio.pci",
    "corral.devices.virtio.rng",
    "corral.devices.virtio.vsock",
    "corral.eventloop",
    "corral.vstate.doorbells",
)


def preload() -> None:
    """Import every module a machine's assembly may import on first use."""
    for name in LAZY_MODULES:
        importlib.import_module(name)


log = logging.getLogger(__name__)

Console = Callable[[bytes], None]


@dataclass
class Board:
    """The devices of one machine and what carries their traffic."""

    pio: PioBus
    mmio: MmioBus
    pci: PciRoot
    serial: Serial16550
    legacy: dict[str, Stateful]  # by name: ports, timers, PCI config ports
    virtio: dict[str, VirtioPciDevice] = field(default_factory=dict)
    loop: EventLoop | None = None  # only when there are virtio devices
    doorbells: KvmDoorbells | None = None
    irq_router: IrqRouter | None = None
    flash: VarsFile | None = None  # OVMF's variables file, written through by the flash bank

    def components(self) -> dict[str, Stateful]:
        """Every device with state, in load order: the PCI bus before its functions."""
        comps: dict[str, Stateful] = dict(self.legacy)
        comps["pci"] = self.pci
        comps.update(self.virtio)
        return comps

    def close(self) -> None:
        """Release the devices' host resources (after the vCPUs have stopped). When the device
        loop does not stop (a device call stuck in the host), nothing is closed: a file closed
        under that call would have its number reused by the next open, and the stuck call's I/O
        would land in that file when it returns."""
        if self.loop is not None and not self.loop.stop():
            log.warning(
                "the device loop did not stop within %.0f s (a device call is stuck in the host): "
                "its devices' files are left open",
                self.loop.stop_wait,
            )
            self.loop = None
            return
        if self.doorbells is not None:
            self.doorbells.close()
            self.doorbells = None
        for fn in self.virtio.values():
            fn.device.close()
        self.virtio = {}
        if self.irq_router is not None:
            self.irq_router.close()
            self.irq_router = None
        if self.flash is not None:
            self.flash.close()
            self.flash = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None


class _RomWrites:
    """The firmware ROM on the MMIO bus: KVM serves its reads; a write is dropped, as a ROM
    drops it."""

    def mmio_read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


class _ShadowWrites:
    """The BIOS shadow area where PAM made it read-only: writes exit here and are dropped; a
    read lands here only while a segment's slot is being remapped, and reads the RAM."""

    def __init__(self, memory: GuestMemory, start: int) -> None:
        self.memory, self.start = memory, start

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.memory.read(self.start + offset, size), "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


def _add_ovmf(vm: Vm, mmio: MmioBus, ovmf: firmware.Ovmf) -> VarsFile | None:
    """OVMF's flash pair: the code bank a ROM, the variables bank a Pflash over an anonymous
    mapping KVM shows read-only while it reads as an array, written through to the vars file."""
    from corral.backends.flash import open_vars
    from corral.devices.legacy.pflash import Pflash

    vm.map_rom(ovmf.code_base, ovmf.code)
    mmio.register(ovmf.code_base, len(ovmf.code), Pflash(memoryview(ovmf.code), readonly=True), "ovmf-code")
    vars_file = open_vars(ovmf.vars_path, ovmf.vars_template) if ovmf.vars_path is not None else None
    try:
        bank = mmap.mmap(-1, len(ovmf.vars_template), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        bank[:] = vars_file.data if vars_file is not None else ovmf.vars_template
        base = ovmf.vars_base
        vm.map_flash(base, bank, True)
        dev = Pflash(
            memoryview(bank),
            store=vars_file.store if vars_file is not None else None,
            on_mode=lambda array: vm.map_flash(base, bank, array),
        )
        mmio.register(base, len(bank), dev, "ovmf-vars")
    except BaseException:
        if vars_file is not None:
            vars_file.close()
        raise
    return vars_file


def _firmware_board(vm: Vm, mmio: MmioBus, memory: GuestMemory, spec: str) -> tuple[PciRoot, VarsFile | None]:
    """A firmware's ROM (and OVMF's flash pair), the BIOS shadow area, and the PCI root with the
    i440FX host bridge (and OVMF's PIIX functions). On failure the vars file is closed again."""
    from corral.boot import firmware
    from corral.devices.pci import piix
    from corral.devices.pci.i440fx import PAM_SEGMENTS, SHADOW_END, SHADOW_START, I440fxHostBridge

    flash: VarsFile | None = None
    ovmf = firmware.is_ovmf(spec)
    if ovmf:
        flash = _add_ovmf(vm, mmio, firmware.read_ovmf(spec))
    else:
        rom = firmware.read_firmware(spec)
        base = firmware.rom_base(rom)
        vm.map_rom(base, rom)
        mmio.register(base, len(rom), _RomWrites(), "firmware-rom")
    try:
        # each PAM segment its own slot, read-only until the BIOS unlocks it (i440fx.py)
        vm.split_memory([(gpa, size) for gpa, size, _, _ in PAM_SEGMENTS])
        shadow = _ShadowWrites(memory, SHADOW_START)
        mmio.register(SHADOW_START, SHADOW_END - SHADOW_START, shadow, "bios-shadow")
        pci = PciRoot(mmio, I440fxHostBridge(vm))
        if ovmf:
            pci.add(piix.PiixIsaBridge(), slot=piix.SLOT)  # OVMF's serial console and ACPI timer
            pci.add_function(piix.PiixPm(), piix.SLOT, piix.PM_FUNCTION)
    except BaseException:
        if flash is not None:
            flash.close()
        raise
    return pci, flash


class _Window:
    """Presents one port of a multi-port device registered at a single address."""

    __slots__ = ("dev", "offset")

    def __init__(self, dev: object, offset: int) -> None:
        self.dev, self.offset = dev, offset

    def pio_read(self, offset: int, size: int) -> int:
        return self.dev.pio_read(self.offset + offset, size)  # type: ignore[attr-defined]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.dev.pio_write(self.offset + offset, size, value)  # type: ignore[attr-defined]


def build_board(
    vm: Vm,
    memory: GuestMemory,
    config: MachineConfig,
    control: VmControl,
    console: Console,
    net_filters: Mapping[int, FrameFilter] | None = None,
) -> Board:
    """The PC board for `config`. On failure, whatever was opened is closed again.
    `net_filters`: by index into config.nets, the frame filter (MMDS) that interface runs."""
    pio, mmio = PioBus(), MmioBus()
    serial = Serial16550(vm.irq_line(layout.COM1_IRQ), console)
    pci, flash = (
        (PciRoot(mmio, None), None)
        if config.firmware is None
        else _firmware_board(vm, mmio, memory, config.firmware)
    )
    try:
        mmio.register(layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, Ecam(pci), "pci-ecam")
        legacy: dict[str, Stateful] = {
            "com1": serial,
            "i8042": I8042(control, vm.irq_line(1)),
            "rtc": CmosRtc(vm.irq_line(layout.RTC_IRQ), mem_size=config.memory),
            "post": PostSink(),
            "debug-exit": DebugExit(control),
            "bench-sink": PostSink(),
            "acpi-pm": AcpiPm(control, vm.irq_line(layout.SCI_IRQ)),
            "reset": ResetRegister(control),
            "pci-cfg": ConfigPorts(pci),
        }
        ports = [  # (base, ports, device, offset of the base within the device)
            (layout.COM1_PORT, 8, "com1", 0),
            (layout.I8042_DATA_PORT, 1, "i8042", 0),
            (layout.I8042_CMD_PORT, 1, "i8042", 4),
            (layout.RTC_PORT, 2, "rtc", 0),
            (layout.POST_PORT, 1, "post", 0),
            (config.debug_exit, 2, "debug-exit", 0),
            (layout.BENCH_SINK_PORT, 1, "bench-sink", 0),
            (layout.PM_BASE_PORT, 12, "acpi-pm", 0),
            (layout.RESET_PORT, 1, "reset", 0),
            (layout.PCI_CONFIG_ADDRESS_PORT, 1, "pci-cfg", ConfigPorts.ADDRESS_OFFSET),
            (layout.PCI_CONFIG_DATA_PORT, 4, "pci-cfg", ConfigPorts.DATA_OFFSET),
        ]
        for base, size, name, offset in ports:
            dev = legacy[name]
            try:
                pio.register(base, size, _Window(dev, offset) if offset else dev, name)  # type: ignore[arg-type]
            except BusConflictError:
                if name != "debug-exit":
                    raise
                raise FieldError(
                    "debug_exit", f"iobase {base:#x} overlaps another device's ports: choose another (0xf4)"
                ) from None
    except BaseException:
        if flash is not None:
            flash.close()
        raise
    board = Board(pio, mmio, pci, serial, legacy, flash=flash)
    try:
        _add_virtio(board, vm, memory, config, net_filters or {})
        _add_fw_cfg(board, memory, config)
    except BaseException:
        board.close()
        raise
    return board


def _add_fw_cfg(board: Board, memory: GuestMemory, config: MachineConfig) -> None:
    """fw_cfg on every machine: firmware and test kernels read the CPU count, RAM and memory
    map there; the kernel items are read from their files only if the guest asks for them."""
    slots = {fn: s for s, fn in enumerate(board.pci.slots) if fn is not None}
    disks = [slots[fn] for name, fn in board.virtio.items() if name.startswith("virtio-blk")]
    bootorder: list[str] = []
    if disks or config.firmware is not None:  # the boot order names them as firmware does
        from corral.boot import firmware

        bootorder = [firmware.virtio_blk_boot_path(slot) for slot in disks]
    linux = None
    if config.firmware is not None and config.kernel is not None:
        linux = _linux_boot(memory, config)
        bootorder.insert(0, f"/rom@{firmware.LINUXBOOT_NAME}")  # the kernel before any disk
    dev = fw_cfg.machine_fw_cfg(
        memory,
        cpus=config.cpus,
        e820=layout.e820_map(memory.size),
        bootorder=bootorder,
        serial_port=layout.COM1_PORT,
    )
    if config.firmware is not None:
        fw_cfg.add_firmware_tables(dev, cpus=config.cpus, mem_size=memory.size)
    initrd = config.initrd
    if linux is not None:
        dev.add_file(firmware.LINUXBOOT_NAME, linux.rom)
        for key, value in [
            (fw_cfg.SETUP_ADDR, le32(linux.setup_addr)),
            (fw_cfg.SETUP_SIZE, le32(len(linux.setup))),
            (fw_cfg.SETUP_DATA, linux.setup),
            (fw_cfg.KERNEL_ADDR, le32(linux.kernel_addr)),
            (fw_cfg.KERNEL_SIZE, le32(len(linux.kernel))),
            (fw_cfg.KERNEL_DATA, linux.kernel),
            (fw_cfg.CMDLINE_ADDR, le32(linux.cmdline_addr)),
            (fw_cfg.CMDLINE_SIZE, le32(len(linux.cmdline))),
            (fw_cfg.CMDLINE_DATA, linux.cmdline),
            (fw_cfg.INITRD_ADDR, le32(linux.initrd_addr)),
            (fw_cfg.INITRD_SIZE, le32(len(linux.initrd))),
            (fw_cfg.INITRD_DATA, linux.initrd),
        ]:
            dev.add(key, value)
    elif config.kernel is not None:
        fw_cfg.add_kernel_items(
            dev,
            partial(read_boot_file, memory, config.kernel, "kernel"),
            None if initrd is None else partial(read_boot_file, memory, initrd, "initrd"),
            config.cmdline,
        )
    board.legacy["fw-cfg"] = dev
    board.pio.register(fw_cfg.BASE_PORT, fw_cfg.SPAN, dev, "fw-cfg")


def le32(value: int) -> bytes:
    return fw_cfg.le(value, 4)


def _linux_boot(memory: GuestMemory, config: MachineConfig) -> firmware.LinuxBoot:
    """The kernel (a bzImage) and initrd a firmware boots, read now: the operator asked for
    them, and a file that cannot boot this way is one line before the guest starts."""
    from corral.boot import firmware

    assert config.kernel is not None
    kernel = read_boot_file(memory, config.kernel, "kernel")
    initrd = None if config.initrd is None else read_boot_file(memory, config.initrd, "initrd")
    return firmware.linux_boot(kernel, initrd, config.cmdline, memory.size, f"kernel file '{config.kernel}'")


def _virtio_devices(
    config: MachineConfig, loop: Callable[[], EventLoop], net_filters: Mapping[int, FrameFilter]
) -> list[tuple[str, Callable[[], VirtioDevice]]]:
    """(name, constructor) for each virtio device the config asks for, in slot order. Each
    constructor opens the device's host backend (disk image, tap, socket, console) and hands it
    in: devices never open host resources themselves."""
    wanted: list[tuple[str, Callable[[], VirtioDevice]]] = [
        (f"virtio-blk{i}", partial(_blk, d, f"disks[{i}]")) for i, d in enumerate(config.disks)
    ]
    if config.rng:
        wanted.append(("virtio-rng", _rng))
    if config.balloon:
        wanted.append(("virtio-balloon", _balloon))
    if config.virtio_console:
        wanted.append(("virtio-console", partial(_console, config.virtio_console, loop)))
    if config.vsock is not None:
        wanted.append(("virtio-vsock", partial(_vsock, config.vsock, loop)))
    for i, n in enumerate(config.nets):
        wanted.append((f"virtio-net{i}", partial(_net, n, loop, net_filters.get(i))))
    return wanted


def _rng() -> VirtioDevice:
    from corral.devices.virtio.rng import VirtioRng

    return VirtioRng()


def _balloon() -> VirtioDevice:
    from corral.devices.virtio.balloon import VirtioBalloon

    return VirtioBalloon()


def _blk(d: DiskConfig, field: str) -> VirtioBlock:
    from corral.backends.disk import open_disk
    from corral.devices.virtio.blk import VirtioBlock

    image = open_disk(
        str(d.path), read_only=d.read_only, overlay=str(d.overlay) if d.overlay else None, field=field
    )
    try:
        return VirtioBlock(image, serial=d.serial)
    except BaseException:
        image.close()
        raise


def _console(spec: str, loop: Callable[[], EventLoop]) -> VirtioConsole:
    from corral.backends.console import ConsoleBackend
    from corral.devices.virtio.console import VirtioConsole

    backend = ConsoleBackend(spec)
    if spec == "pty":
        log.warning("hvc0 (virtio-console) is on %s", backend.path)
    return VirtioConsole(backend, loop())


def _vsock(v: VsockConfig, loop: Callable[[], EventLoop]) -> VirtioVsock:
    from corral.backends.unix_socket import listen_unix
    from corral.devices.virtio.vsock import VirtioVsock

    return VirtioVsock(v.cid, listen_unix(v.uds_path, "vsock socket", "vsock.uds_path"), loop())


def _net(n: NetConfig, loop: Callable[[], EventLoop], frame_filter: FrameFilter | None) -> VirtioNet:
    from corral.devices.virtio.net import VirtioNet

    return VirtioNet(Tap(n.tap, host_ip=n.host_ip or None), n.guest_mac(), loop(), frame_filter)


def _add_virtio(
    board: Board, vm: Vm, memory: GuestMemory, config: MachineConfig, net_filters: Mapping[int, FrameFilter]
) -> None:
    def loop() -> EventLoop:
        assert board.loop is not None
        return board.loop

    wanted = _virtio_devices(config, loop, net_filters)
    if not wanted:
        return
    from corral.devices.virtio.pci import BAR_SIZE, VirtioPciDevice
    from corral.eventloop import EventLoop
    from corral.vstate.doorbells import KvmDoorbells

    board.loop = EventLoop("corral-devices")
    board.doorbells = KvmDoorbells(vm.fd, board.loop)
    board.irq_router = IrqRouter(vm.fd)
    bar = layout.PCI_MMIO32_START
    for name, make in wanted:
        slot = next(s for s in range(1, 32) if board.pci.slots[s] is None)
        device = make()
        # one MSI-X vector per queue and one for configuration changes
        vectors = [board.irq_router.msi_vector() for _ in range(len(device.queue_sizes) + 1)]
        gsi = layout.pci_intx_gsi(slot)
        fn = VirtioPciDevice(device, memory, vm.irq_line(gsi), board.loop, board.doorbells, vectors)
        board.virtio[name] = fn  # registered first, so close() releases it on failure
        fn.config.set_bar_address(0, bar)
        fn.config.write(COMMAND, 2, CMD_MEMORY)
        fn.config.write(INTERRUPT_LINE, 1, gsi)  # as firmware sets it
        board.pci.add(fn, slot)
        bar += BAR_SIZE


def load_guest(memory: GuestMemory, config: MachineConfig) -> BootInfo | None:
    """ACPI tables and the kernel (with its initrd and command line) in guest memory; with a
    firmware, only the ROM's tail in the BIOS area (None: the vCPU starts at the reset vector,
    and the firmware reads the kernel, if any, from fw_cfg)."""
    if config.firmware is not None:
        from corral.boot import firmware

        firmware.load_shadow(memory, firmware.rom_image(config.firmware))
        return None
    if config.kernel is None:
        raise FieldError("kernel", "give a kernel to boot, or a firmware (seabios) to boot from a disk")
    tables = machine_acpi_tables(config.cpus, config.memory)
    tables.write_to(memory)
    return load_kernel_file(
        memory,
        config.kernel,
        cmdline=config.cmdline,
        initrd=config.initrd,
        rsdp_addr=tables.rsdp_addr,
        modules=[(m.path, m.cmdline) for m in config.modules],
    )


def create_vcpus(
    vm: Vm, board: Board, host: VcpuHost, config: MachineConfig, boot: BootInfo | None
) -> list[Vcpu]:
    """Fresh vCPUs: the boot CPU at the kernel entry (or, for firmware, `boot` None, at the
    reset vector where KVM leaves a new vCPU), the APs waiting in KVM for INIT/SIPI."""
    msrs = boot_msrs(set(vm.msr_indices))

    def setup(vcpu: Vcpu) -> None:
        vcpu.configure(vcpu_cpuid(vm.supported_cpuid, vcpu.index, config.cpus, config.cpu_hide), msrs)
        if vcpu.index == 0 and boot is not None:
            vcpu.set_boot_state(boot.cpu)

    return _vcpus(vm, board, host, config.cpus, setup)


def restore_vcpus(vm: Vm, board: Board, host: VcpuHost, states: list[VcpuState]) -> list[Vcpu]:
    """vCPUs put back as saved (a snapshot's restore)."""
    return _vcpus(vm, board, host, len(states), lambda vcpu: vcpu.load_state(states[vcpu.index]))


def blank_vcpus(vm: Vm, board: Board, host: VcpuHost, config: MachineConfig) -> list[Vcpu]:
    """vCPUs for a state that arrives later, created with the CPUID `config` gives them here
    (an incoming migration makes them before its stop-and-copy: ~0.6 ms each out of the
    guest's downtime); each gets its state with Vcpu.load_state() before it first runs."""

    def setup(vcpu: Vcpu) -> None:
        vcpu.preset_cpuid(vcpu_cpuid(vm.supported_cpuid, vcpu.index, config.cpus, config.cpu_hide))

    return _vcpus(vm, board, host, config.cpus, setup)


def _vcpus(vm: Vm, board: Board, host: VcpuHost, count: int, setup: Callable[[Vcpu], None]) -> list[Vcpu]:
    vcpus: list[Vcpu] = []
    try:
        for i in range(count):
            vcpus.append(Vcpu(vm.create_vcpu(i), i, board.pio, board.mmio, host))
            vcpus[-1].kvm_stats = VcpuStats.open(vcpus[-1].fd)  # now: KVM_RUN will hold its mutex
            setup(vcpus[-1])
    except BaseException:
        for v in vcpus:
            v.close()
        raise
    return vcpus


__all__ = ["Board", "blank_vcpus", "build_board", "create_vcpus", "load_guest", "restore_vcpus"]
