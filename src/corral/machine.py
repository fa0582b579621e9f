"""Machine: a VM assembled from a validated MachineConfig; start, wait, stop, reboot.

Assembly order: KVM VM -> guest memory -> irqchip/PIT -> devices on the buses -> ACPI tables
and kernel in memory -> vCPUs configured -> vCPU threads started. Devices are built by
`_build_devices` and see only interrupt lines, guest memory and `VmControl`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel

from corral.arch.x86 import layout
from corral.arch.x86.acpi import machine_acpi_tables
from corral.arch.x86.cpuid import vcpu_cpuid
from corral.arch.x86.msr import boot_msrs
from corral.boot.loader import BootInfo, load_kernel_file
from corral.config import MachineConfig
from corral.devices.base import Stateful
from corral.devices.bus import MmioBus, PioBus
from corral.devices.legacy.acpi_pm import AcpiPm
from corral.devices.legacy.debug_exit import DebugExit
from corral.devices.legacy.i8042 import I8042
from corral.devices.legacy.post import PostSink
from corral.devices.legacy.reset import ResetRegister
from corral.devices.legacy.rtc import CmosRtc
from corral.devices.legacy.uart import Serial16550
from corral.devices.pci.config import COMMAND, CMD_MEMORY
from corral.devices.pci.root import ConfigPorts, Ecam, PciRoot
from corral.devices.virtio.balloon import BalloonInfo
from corral.devices.virtio.base import VirtioDevice
from corral.devices.virtio.pci import BAR_SIZE, VirtioPciDevice
from corral.doorbells import KvmDoorbells
from corral.eventloop import EventLoop
from corral.irq import IrqRouter
from corral.errors import CorralError, HostError
from corral.kvm import Kvm, KvmError, VmFd
from corral.kvm import constants as K
from corral.kvm.structs import KVM_PIT_SPEAKER_DUMMY
from corral.memory import GuestMemory
from corral.state.kvm_state import cpuid_entries, load_vcpu, load_vm, save_vcpu, save_vm, savable_msrs, set_clock
from corral.state.model import CpuModel, MachineState
from corral.state.snapshot import Snapshot, SnapshotError, SnapshotStats, read_snapshot, write_snapshot
from corral.vcpu import Vcpu

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExitResult:
    """How a machine stopped.

    kind: "exit" (exit port), "poweroff", "reset" (with no_reboot), "crash" (triple fault, KVM
    internal error), "error" (VMM failure) or "stopped" (the host asked).
    """

    kind: str
    status: int
    message: str = ""
    reboots: int = 0


class MachineStatus(BaseModel):
    """Whether a machine runs, and its size (the reply of the status verb)."""

    state: Literal["running", "paused"]
    cpus: int
    memory: int                     # bytes of guest RAM


class VmStateError(CorralError):
    """Pause, resume or a state operation cannot happen now (not built, not paused, ...)."""


class KvmIrqLine:
    """An interrupt input of the in-kernel PIC+IOAPIC, driven through KVM_IRQ_LINE."""

    def __init__(self, vm: VmFd, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self._level = 0
        self._lock = threading.Lock()

    def set_level(self, high: bool) -> None:
        level = 1 if high else 0
        with self._lock:
            if level != self._level:
                self._level = level
                self._vm.irq_line(self.gsi, level)

    def pulse(self) -> None:
        with self._lock:
            self._vm.irq_line(self.gsi, 1)
            self._vm.irq_line(self.gsi, 0)
            self._level = 0


class Machine:
    """One virtual machine.

    >>> m = Machine(MachineConfig(kernel="probe.elf", cmdline="hello"))
    >>> result = m.run()          # boots, waits until the guest stops, tears down
    """

    def __init__(self, config: MachineConfig, *, console: Callable[[bytes], None] | None = None,
                 kvm_path: str = "/dev/kvm", restore_from: Snapshot | None = None,
                 incoming: bool = False) -> None:
        self.config = config
        self._restore = restore_from       # consumed by the first build; a reboot boots afresh
        # incoming migration: build() stops before the vCPUs; RAM arrives, then load_incoming()
        self._incoming = incoming
        self.kvm_path = kvm_path
        self._console = console or _stdout_console
        self._stopped = threading.Event()
        self._result: ExitResult | None = None
        self._result_lock = threading.Lock()
        self._serial_input_lock = threading.Lock()
        self.vm: VmFd | None = None
        self.kvm: Kvm | None = None
        self.memory: GuestMemory | None = None
        self.vcpus: list[Vcpu] = []
        self.serial: Serial16550 | None = None
        self.boot: BootInfo | None = None
        self.reboots = 0
        self.loop: EventLoop | None = None
        self.doorbells: KvmDoorbells | None = None
        self.irq_router: IrqRouter | None = None
        self.virtio: dict[str, VirtioPciDevice] = {}
        self._stop_requested = False  # sticky across reboots: stop() must end run()
        self._state_lock = threading.RLock()   # pause, resume, snapshot, migration: one at a time
        self.paused = False
        self._clock_at_pause: int | None = None
        self._msr_indices: list[int] | None = None
        self.cpu_model: CpuModel | None = None

    @classmethod
    def from_snapshot(cls, path: str | os.PathLike[str], *,
                      console: Callable[[bytes], None] | None = None,
                      kvm_path: str = "/dev/kvm", clone_index: int | None = None) -> Machine:
        """A machine that resumes where the snapshot at `path` was taken; start() or run()
        continues the guest. RAM is mapped from the snapshot lazily, so this is fast whatever
        the memory size, and machines restored from one snapshot share unchanged pages.
        `clone_index` gives a clone its own host resources and vsock CID (MachineConfig.for_clone)."""
        snap = read_snapshot(path)
        config = snap.manifest.config
        if clone_index is not None:
            config = config.for_clone(clone_index)
        return cls(config, console=console, kvm_path=kvm_path, restore_from=snap)

    # -- VmControl (called by devices and vCPUs, from any thread) ------------------------------
    def request_exit(self, status: int) -> None:
        self._finish(ExitResult("exit", status, f"guest wrote {status} to the exit port"))

    def request_poweroff(self) -> None:
        self._finish(ExitResult("poweroff", 0, "guest powered off"))

    def request_reset(self) -> None:
        self._finish(ExitResult("reset", 0, "guest requested reset"))

    def vcpu_stop(self, kind: str, status: int, message: str) -> None:
        self._finish(ExitResult(kind, status, message))

    def _finish(self, result: ExitResult) -> None:
        with self._result_lock:
            if self._result is None:
                self._result = result
        # Always kick and signal, even when another event won the race: no vCPU may keep
        # running once the machine is stopping.
        for v in self.vcpus:
            v.kick()
        self._stopped.set()

    # -- lifecycle ----------------------------------------------------------------------------
    def build(self) -> None:
        """Create the VM and load the guest; vCPUs are configured but not started."""
        cfg = self.config
        self.kvm = Kvm(self.kvm_path)
        try:
            self._build_vm(cfg)
        except BaseException:
            self.close()
            raise

    def _build_vm(self, cfg: MachineConfig) -> None:
        assert self.kvm is not None
        kvm = self.kvm
        for cap, name in ((K.CAP_IRQCHIP, "IRQCHIP"), (K.CAP_PIT2, "PIT2"),
                          (K.CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"), (K.CAP_USER_MEMORY, "USER_MEMORY")):
            if not kvm.check_extension(cap):
                raise HostError(f"{self.kvm_path} lacks KVM_CAP_{name}, which corral needs")
        max_vcpus = kvm.check_extension(K.CAP_MAX_VCPUS) or kvm.check_extension(K.CAP_NR_VCPUS)
        if cfg.cpus > max_vcpus:
            raise HostError(f"--cpus {cfg.cpus} is more than this host's KVM allows ({max_vcpus})")
        self.vm = vm = kvm.create_vm()
        vm.set_tss_addr(layout.KVM_TSS_ADDR)
        vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2(KVM_PIT_SPEAKER_DUMMY)

        supported = kvm.supported_cpuid()
        self.cpu_model = CpuModel.from_cpuid(supported)
        snap, self._restore = self._restore, None
        if snap is not None and snap.manifest.cpu != self.cpu_model:
            raise SnapshotError(f"{snap.path} was taken on a {snap.manifest.cpu.describe()}; this "
                                f"host has a {self.cpu_model.describe()}: the guest would see its CPU change")

        self.memory = mem = GuestMemory(cfg.memory, backing=snap.memory_file if snap else None)
        for s in mem.slots:
            vm.set_user_memory_region(s.slot, s.gpa, s.size, s.host_addr)

        self.pio, self.mmio = PioBus(), MmioBus()
        self._build_devices(vm, mem)
        self._build_virtio(vm, mem, cfg)

        if snap is not None:
            self._restore_state(snap.state)
            return
        if self._incoming:
            return

        tables = machine_acpi_tables(cfg.cpus, cfg.memory)
        tables.write_to(mem)
        self.boot = load_kernel_file(mem, cfg.kernel, cmdline=cfg.cmdline, initrd=cfg.initrd,
                                     rsdp_addr=tables.rsdp_addr)

        msrs = boot_msrs(set(kvm.msr_index_list()))
        for i in range(cfg.cpus):
            vcpu = Vcpu(vm.create_vcpu(i), i, self.pio, self.mmio, self)
            self.vcpus.append(vcpu)
            vcpu.configure(vcpu_cpuid(supported, i, cfg.cpus, cfg.cpu_hide), msrs)
        # The boot CPU starts at the kernel entry; APs wait in KVM for the guest's INIT/SIPI.
        self.vcpus[0].set_boot_state(self.boot.cpu)

    def _build_devices(self, vm: VmFd, mem: GuestMemory) -> None:
        def irq(gsi: int) -> KvmIrqLine:
            return KvmIrqLine(vm, gsi)

        self.serial = Serial16550(irq(layout.COM1_IRQ), self._console)
        self.rtc = CmosRtc(irq(layout.RTC_IRQ), mem_size=self.config.memory)
        i8042 = I8042(self, irq(1))
        self.pci = PciRoot(self.mmio)
        self.mmio.register(layout.PCI_ECAM_BASE, layout.PCI_ECAM_SIZE, Ecam(self.pci), "pci-ecam")
        # name -> device: every device, so state walks (snapshot, migration) see them all
        self.devices = {
            "com1": self.serial, "i8042": i8042, "rtc": self.rtc, "post": PostSink(),
            "debug-exit": DebugExit(self), "bench-sink": PostSink(),
            "acpi-pm": AcpiPm(self, irq(layout.SCI_IRQ)), "reset": ResetRegister(self),
            "pci-cfg": ConfigPorts(self.pci),
        }
        ports = [  # (base, ports, device, offset of the base within the device)
            (layout.COM1_PORT, 8, "com1", 0), (layout.I8042_DATA_PORT, 1, "i8042", 0),
            (layout.I8042_CMD_PORT, 1, "i8042", 4), (layout.RTC_PORT, 2, "rtc", 0),
            (layout.POST_PORT, 1, "post", 0), (layout.DEBUG_EXIT_PORT, 2, "debug-exit", 0),
            (layout.BENCH_SINK_PORT, 1, "bench-sink", 0), (layout.PM_BASE_PORT, 12, "acpi-pm", 0),
            (layout.RESET_PORT, 1, "reset", 0),
            (layout.PCI_CONFIG_ADDRESS_PORT, 1, "pci-cfg", ConfigPorts.ADDRESS_OFFSET),
            (layout.PCI_CONFIG_DATA_PORT, 4, "pci-cfg", ConfigPorts.DATA_OFFSET),
        ]
        for base, size, name, offset in ports:
            dev = self.devices[name]
            self.pio.register(base, size, _Window(dev, offset) if offset else dev, name)

    def _build_virtio(self, vm: VmFd, mem: GuestMemory, cfg: MachineConfig) -> None:
        """The virtio devices the config asks for, each on its own PCI slot with its BAR placed
        in the 32-bit window and decoding on, as firmware would leave it."""
        from corral.backends.console import ConsoleBackend
        from corral.backends.disk import open_disk
        from corral.backends.tap import Tap
        from corral.backends.unix_socket import listen_unix
        from corral.devices.virtio.blk import VirtioBlock
        from corral.devices.virtio.balloon import VirtioBalloon
        from corral.devices.virtio.console import VirtioConsole
        from corral.devices.virtio.net import VirtioNet
        from corral.devices.virtio.rng import VirtioRng
        from corral.devices.virtio.vsock import VirtioVsock

        wanted: list[tuple[str, Callable[[], VirtioDevice]]] = [
            (f"virtio-blk{i}", (lambda i, d: lambda: VirtioBlock(open_disk(
                str(d.path), read_only=d.read_only, overlay=str(d.overlay) if d.overlay else None,
                field=f"disks[{i}]"), serial=d.serial))(i, d))
            for i, d in enumerate(cfg.disks)]
        if cfg.rng:
            wanted.append(("virtio-rng", VirtioRng))
        if cfg.balloon:
            wanted.append(("virtio-balloon", VirtioBalloon))
        if cfg.virtio_console:
            def console() -> VirtioConsole:
                dev = VirtioConsole(ConsoleBackend(cfg.virtio_console), self.loop)
                if cfg.virtio_console == "pty":
                    log.warning("hvc0 (virtio-console) is on %s", dev.backend.path)
                return dev
            wanted.append(("virtio-console", console))
        if cfg.vsock is not None:
            v = cfg.vsock
            wanted.append(("virtio-vsock", lambda: VirtioVsock(
                v.cid, listen_unix(v.uds_path, "vsock socket", "vsock.uds_path"), self.loop)))
        for i, n in enumerate(cfg.nets):
            wanted.append((f"virtio-net{i}", (lambda n: lambda: VirtioNet(
                Tap(n.tap, host_ip=n.host_ip or None), n.guest_mac(), self.loop))(n)))
        if not wanted:
            return
        self.loop = EventLoop("corral-devices")
        self.doorbells = KvmDoorbells(vm, self.loop)
        self.irq_router = IrqRouter(vm)
        bar = layout.PCI_MMIO32_START
        for name, make in wanted:
            slot = next(s for s in range(1, 32) if self.pci.slots[s] is None)
            device = make()
            # one MSI-X vector per queue and one for configuration changes
            vectors = [self.irq_router.msi_vector() for _ in range(len(device.queue_sizes) + 1)]
            fn = VirtioPciDevice(device, mem, KvmIrqLine(vm, layout.pci_intx_gsi(slot)), self.loop,
                                 self.doorbells, vectors)
            self.virtio[name] = fn        # registered first, so close() releases it on failure
            fn.config.set_bar_address(0, bar)
            fn.config.write(COMMAND, 2, CMD_MEMORY)
            fn.config.write(0x3C, 1, layout.pci_intx_gsi(slot))   # interrupt line, as firmware sets
            self.pci.add(fn, slot)
            bar += BAR_SIZE

    def start(self) -> None:
        if self.vm is None:
            self.build()
        if self._incoming:
            raise VmStateError("an incoming machine starts once its state has arrived")
        if any(v.thread is not None for v in self.vcpus):
            return  # already running
        if self._result is not None:
            return  # stopped while it was being built
        if self._clock_at_pause is not None:
            # a restored guest's clock continues from the snapshot, not from when it was taken
            assert self.vm is not None
            set_clock(self.vm, self._clock_at_pause)
            self._clock_at_pause = None
        if self.loop is not None:
            self.loop.start()
        for v in self.vcpus:
            v.start()

    # -- pause, resume, state -----------------------------------------------------------------
    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU at an instruction boundary and hold the device loop; the guest's
        clock stops too (it does not see the pause as lost time)."""
        with self._state_lock:
            if self.paused:
                return
            if self.vm is None:
                raise VmStateError("the machine is not built: nothing to pause")
            for v in self.vcpus:
                v.request_pause()
            deadline = time.monotonic() + timeout
            for v in self.vcpus:
                while not v.parked.wait(0.05):
                    if v.thread is None or not v.thread.is_alive() or self._stopped.is_set():
                        break      # a stopped vCPU is as still as a parked one
                    if time.monotonic() > deadline:
                        for u in self.vcpus:
                            u.resume()
                        raise VmStateError(f"vcpu{v.index} did not pause within {timeout:.0f}s")
            if self.loop is not None and not self.loop.pause(timeout):
                raise VmStateError("the device event loop did not pause")
            self._clock_at_pause = self.vm.get_clock().clock
            for v in self.vcpus:
                v.fd.kvmclock_ctrl()   # tells a kvmclock guest its watchdogs should not fire
            self.paused = True

    def resume(self) -> None:
        with self._state_lock:
            if not self.paused:
                return
            assert self.vm is not None
            if self._clock_at_pause is not None:
                set_clock(self.vm, self._clock_at_pause)
                self._clock_at_pause = None
            if self.loop is not None:
                self.loop.resume()
            for v in self.vcpus:
                v.resume()
            self.paused = False

    # -- memory balloon -------------------------------------------------------------------------
    def _balloon(self):  # -> VirtioBalloon
        fn = self.virtio.get("virtio-balloon")
        if fn is None:
            raise VmStateError("this VM has no balloon: start it with --balloon")
        return fn

    def set_balloon(self, target_bytes: int) -> None:
        """Ask the guest to hand `target_bytes` of its RAM back to the host (0: take it all back)."""
        if not 0 <= target_bytes <= self.config.memory:
            raise VmStateError(f"a balloon of {target_bytes} bytes does not fit in the guest's "
                               f"{self.config.memory >> 20} MiB")
        fn = self._balloon()
        fn.device.set_target(target_bytes >> 12, fn)

    def balloon_info(self, timeout: float = 2.0) -> BalloonInfo:
        """Target and actual balloon size, host memory behind guest RAM, and the guest's latest
        memory statistics (asked for fresh ones, waiting up to `timeout`)."""
        fn = self._balloon()
        dev = fn.device
        if self.loop is not None and dev.queues.get("stats") is not None:
            dev.stats_updated.clear()
            self.loop.call_soon(dev.request_stats)
            dev.stats_updated.wait(timeout)
        assert self.memory is not None
        return BalloonInfo(target_bytes=dev.target_pages << 12, actual_bytes=dev.actual_pages << 12,
                           host_resident_bytes=self.memory.resident_bytes(), stats=dict(dev.stats),
                           **dev.counters)

    def status(self) -> MachineStatus:
        return MachineStatus(state="paused" if self.paused else "running", cpus=self.config.cpus,
                             memory=self.config.memory)

    def _components(self) -> dict[str, Stateful]:
        """Every device with state, in load order: the PCI bus before its functions."""
        comps: dict[str, Stateful] = dict(self.devices)
        comps["pci"] = self.pci
        comps.update(self.virtio)
        return comps

    def save_state(self) -> MachineState:
        """The state of a paused (or never started) machine, RAM aside."""
        with self._state_lock:
            if self.vm is None or self.kvm is None:
                raise VmStateError("the machine is not built: it has no state")
            if not self.paused and any(v.thread is not None and v.thread.is_alive() for v in self.vcpus):
                raise VmStateError("pause the machine before saving its state")
            if self._msr_indices is None:
                self._msr_indices = savable_msrs(self.vcpus[0].fd, self.kvm.msr_index_list())
            vm_state = save_vm(self.vm)
            if self._clock_at_pause is not None:
                vm_state.clock = self._clock_at_pause
            return MachineState(
                vm=vm_state,
                vcpus=[save_vcpu(v.fd, v.index, v.cpuid, self._msr_indices) for v in self.vcpus],
                devices={name: dev.save_state().model_dump(mode="json")
                         for name, dev in self._components().items()})

    def load_incoming(self, state: MachineState) -> None:
        """Finish an incoming machine (built with incoming=True, RAM already filled): create
        its vCPUs from `state` and load every component. start() then runs the guest."""
        if not self._incoming or self.vm is None or self.vcpus:
            raise VmStateError("load_incoming() needs a machine built with incoming=True")
        if len(state.vcpus) != self.config.cpus:
            raise SnapshotError(f"the state has {len(state.vcpus)} vCPUs, the config {self.config.cpus}")
        self._incoming = False
        self._restore_state(state)

    def _restore_state(self, state: MachineState) -> None:
        assert self.vm is not None
        for i, vs in enumerate(state.vcpus):
            vcpu = Vcpu(self.vm.create_vcpu(i), i, self.pio, self.mmio, self)
            self.vcpus.append(vcpu)
            vcpu.cpuid = cpuid_entries(vs)
            load_vcpu(vcpu.fd, vs)
        self._load_state(state)

    def _load_state(self, state: MachineState) -> None:
        assert self.vm is not None
        comps = self._components()
        if set(state.devices) != set(comps):
            raise SnapshotError(f"the saved devices ({', '.join(state.devices)}) do not match this "
                                f"machine's ({', '.join(comps)})")
        load_vm(self.vm, state.vm)
        for name, data in state.devices.items():
            dev = comps[name]
            dev.load_state(dev.state_model.model_validate(data))
        self._clock_at_pause = state.vm.clock     # applied when the vCPUs start

    def snapshot(self, path: str | os.PathLike[str]) -> SnapshotStats:
        """Write the machine to `path` (a new directory). A running machine is paused for the
        copy and resumed afterwards; a paused one stays paused."""
        with self._state_lock:
            was_paused = self.paused
            self.pause()
            try:
                state = self.save_state()
                assert self.memory is not None and self.cpu_model is not None
                return write_snapshot(path, self.config, self.cpu_model, state, self.memory)
            finally:
                if not was_paused:
                    self.resume()

    def wait(self, timeout: float | None = None) -> ExitResult | None:
        """Block until the guest stops (or `timeout` seconds pass: returns None)."""
        if not self._stopped.wait(timeout):
            return None
        for v in self.vcpus:
            v.join(5.0)
        return self._result

    def stop(self, message: str = "stopped by the host") -> None:
        self._stop_requested = True
        self._finish(ExitResult("stopped", 0, message))
        if self.loop is not None:
            self.loop.resume()

    def send_input(self, data: bytes) -> None:
        """Type `data` into the guest's serial console."""
        with self._serial_input_lock:
            if self.serial is not None:
                self.serial.feed(data)

    def close(self, *, dump_registers: bool = False) -> None:
        for v in self.vcpus:
            v.kick()
        for v in self.vcpus:
            v.join(5.0)
        if dump_registers:
            for v in self.vcpus:
                log.warning("vcpu%d (mp_state %s, %d exits):\n%s", v.index, _mp_state(v), v.exits,
                            v.describe_registers())
        for v in self.vcpus:
            v.fd.close()
        self.vcpus = []
        if self.loop is not None:
            self.loop.stop()
        if self.doorbells is not None:
            self.doorbells.close()
            self.doorbells = None
        for fn in self.virtio.values():
            fn.device.close()
        self.virtio = {}
        if self.irq_router is not None:
            self.irq_router.close()
            self.irq_router = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None

    def run(self) -> ExitResult:
        """Boot, wait for the guest to stop, reboot on reset unless no_reboot, tear down."""
        while True:
            if self._stop_requested:
                return ExitResult("stopped", 0, "stopped by the host", self.reboots)
            with self._result_lock:
                self._result = None
                self._stopped.clear()
            interrupted = True
            try:
                self.start()
                result = self.wait()
                interrupted = False
            finally:
                # an interrupted run (Ctrl-C) shows where each vCPU was, with -v
                self.close(dump_registers=interrupted and log.isEnabledFor(logging.INFO))
            assert result is not None
            if result.kind == "reset" and not self.config.no_reboot and not self._stop_requested:
                self.reboots += 1
                log.info("guest reset: rebooting (%d)", self.reboots)
                continue
            return ExitResult(result.kind, result.status, result.message, self.reboots)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Window:
    """Presents one port of a multi-port device registered at a single address."""

    __slots__ = ("dev", "offset")

    def __init__(self, dev: object, offset: int) -> None:
        self.dev, self.offset = dev, offset

    def pio_read(self, offset: int, size: int) -> int:
        return self.dev.pio_read(self.offset + offset, size)  # type: ignore[attr-defined]

    def pio_write(self, offset: int, size: int, value: int) -> None:
        self.dev.pio_write(self.offset + offset, size, value)  # type: ignore[attr-defined]


def _mp_state(v: Vcpu) -> str:
    names = {K.MP_STATE_RUNNABLE: "runnable", K.MP_STATE_UNINITIALIZED: "wait-for-SIPI",
             K.MP_STATE_INIT_RECEIVED: "INIT received", K.MP_STATE_HALTED: "halted",
             K.MP_STATE_SIPI_RECEIVED: "SIPI received"}
    try:
        return names.get(v.fd.get_mp_state(), "?")
    except KvmError as exc:
        return f"unknown ({exc})"


def _stdout_console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


__all__ = ["ExitResult", "KvmIrqLine", "Machine", "MachineStatus", "VmStateError"]
