"""Machine: one VM's lifecycle (build, start, wait, stop, reboot), pause/resume, and the walk
over its state that snapshots and migration share.

Assembly is the builder's (corral.builder) and everything holding a KVM fd is vstate's; the
machine orchestrates: KVM VM -> guest memory -> the board's devices -> ACPI tables and kernel
(or a saved state) -> vCPUs -> vCPU threads. It also offers the verbs live migration needs
(an exclusive section, dirty logging, holding the vCPUs), so migration stays above it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from corral.arch.x86 import acpi
from corral.arch.x86.msr import wake_msrs
from corral.boot.loader import BootInfo
from corral.builder import Board, blank_vcpus, build_board, create_vcpus, load_guest, restore_vcpus
from corral.builder import preload as preload_builder
from corral.config import HostResources, MachineConfig
from corral.devices.legacy.acpi_pm import AcpiPm
from corral.devices.legacy.uart import Serial16550
from corral.errors import CorralError
from corral.lazymodel import BaseModel, ConfigDict, prepare_quick, real
from corral.memory import GuestMemory
from corral.state.model import CpuModel, MachineState, SnapshotError
from corral.vstate.exits import ExitObserver, ExitRecorder
from corral.vstate.vcpu import Vcpu
from corral.vstate.vm import Vm

if TYPE_CHECKING:
    from corral.devices.virtio.balloon import BalloonInfo, VirtioBalloon
    from corral.devices.virtio.net import FrameFilter
    from corral.devices.virtio.pci import VirtioPciDevice
    from corral.eventloop import EventLoop
    from corral.state.snapshot import Snapshot, SnapshotStats

log = logging.getLogger(__name__)


def preload() -> None:
    """Import what building, restoring or snapshotting a machine imports on first use: a thread
    that may do those under its seccomp filter, which maps no new code, calls this before it."""
    preload_builder()
    import corral.state.snapshot  # noqa: F401


PAGE = 4096


class ExitResult(NamedTuple):
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

    model_config = ConfigDict(defer_build=True)  # built on first use, not at launch

    state: Literal["running", "paused", "suspended"]
    cpus: int
    memory: int  # bytes of guest RAM


def state_models(roots: Iterable[type[BaseModel]]) -> list[type[BaseModel]]:
    """`roots` and every pydantic model their fields hold, however nested (list[VcpuState],
    dict[str, X], X | None...), each once (lazy models as declared, walked as built)."""
    import pydantic

    seen: list[type[BaseModel]] = []
    todo: list[object] = list(roots)
    while todo and len(seen) < 1000:
        t = todo.pop()
        built = real(t)
        if isinstance(built, type) and issubclass(built, pydantic.BaseModel):
            if t not in seen:
                seen.append(t)  # type: ignore[arg-type]
                todo += [f.annotation for f in built.model_fields.values()]
        else:
            todo += get_args(t)
    return seen


class VmStateError(CorralError):
    """Pause, resume or a state operation cannot happen now (not built, not paused, ...)."""


def _close_vm_and_memory(owner: WarmVm | Machine) -> None:
    """The end of a teardown: the VM (its fd, and with it KVM's use of the RAM), then the RAM."""
    if owner.vm is not None:
        owner.vm.close()
        owner.vm = None
    if owner.memory is not None:
        owner.memory.close()
        owner.memory = None


class WarmVm:
    """A KVM VM with its RAM slots registered, made before a restore is asked for, so that the
    restore skips what costs it most: creating the VM and registering its RAM with KVM (on a
    PVM host each slot waits out a kernel grace period of several milliseconds). A pool of
    these, one per memory size, is what a service restoring guests on demand keeps ready.
    `Machine.from_snapshot(..., warm=)` takes it over: the snapshot's memory file is mapped
    over the registered RAM (GuestMemory.adopt_backing). Each serves one restore; close() one
    never used."""

    def __init__(self, memory: int, cpus: int = 1, *, kvm_path: str = "/dev/kvm") -> None:
        self.kvm_path, self.cpus = kvm_path, cpus
        self.vm: Vm | None = Vm.create(kvm_path, cpus)
        self.memory: GuestMemory | None = None
        try:
            self.memory = GuestMemory(memory)
            self.vm.map_memory(self.memory)
        except BaseException:
            self.close()
            raise

    def take(self, config: MachineConfig, kvm_path: str) -> tuple[Vm, GuestMemory]:
        """The VM and its RAM for a machine of `config`; refused (one line) when they do not
        fit it. Once taken, they are the machine's."""
        if self.vm is None or self.memory is None:
            raise VmStateError("this prepared VM has served a restore already")
        if kvm_path != self.kvm_path:
            raise VmStateError(f"the prepared VM is on {self.kvm_path}, not {kvm_path}")
        if config.memory != self.memory.size or config.cpus > self.cpus:
            raise VmStateError(
                f"the prepared VM has {self.memory.size >> 20} MiB for up to {self.cpus} vCPUs; "
                f"the guest needs {config.memory >> 20} MiB and {config.cpus}"
            )
        vm, memory, self.vm, self.memory = self.vm, self.memory, None, None
        return vm, memory

    def close(self) -> None:
        _close_vm_and_memory(self)


class Machine:
    """One virtual machine.

    >>> m = Machine(MachineConfig(kernel="probe.elf", cmdline="hello"))
    >>> result = m.run()          # boots, waits until the guest stops, tears down
    """

    def __init__(
        self,
        config: MachineConfig,
        *,
        console: Callable[[bytes], None] | None = None,
        kvm_path: str = "/dev/kvm",
        restore_from: Snapshot | None = None,
        incoming: bool = False,
        net_filters: Mapping[int, FrameFilter] | None = None,
        warm: WarmVm | None = None,
    ) -> None:
        self.config = config
        if warm is not None and restore_from is None:
            raise ValueError("a WarmVm serves a restore (Machine.from_snapshot)")
        self._warm = warm  # the first build's VM and RAM, made before
        # by index into config.nets: a frame filter (MMDS) that interface runs; read by build()
        self.net_filters: Mapping[int, FrameFilter] = net_filters or {}
        self._restore = restore_from  # consumed by the first build; a reboot boots afresh
        # incoming migration: build() creates blank vCPUs; RAM arrives, then load_incoming()
        self._incoming = incoming
        self.kvm_path = kvm_path
        self._console = console or self._stdout_console
        self._stopped = threading.Event()
        self._result: ExitResult | None = None
        self._result_lock = threading.Lock()
        self._serial_input_lock = threading.Lock()
        self.vm: Vm | None = None
        self.memory: GuestMemory | None = None
        self.board: Board | None = None
        self.vcpus: list[Vcpu] = []
        self.boot: BootInfo | None = None
        self.reboots = 0
        self._stop_requested = False  # sticky across reboots: stop() must end run()
        self._state_lock = threading.RLock()  # pause, resume, snapshot, migration: one at a time
        self.paused = False
        self.suspended = False  # ACPI S3: the guest's vCPUs are held until wake()
        self._clock_at_pause: int | None = None
        self._msr_indices: list[int] | None = None
        self.cpu_model: CpuModel | None = None
        # the next start() parks every vCPU before its first instruction and pauses the
        # machine (a debugger's --gdb-wait: it attaches, then continues the guest)
        self.hold_at_start = False
        # exit statistics (per vCPU index, kept across reboots) and the trace they feed
        self._observing = False
        self._recorder_for: Callable[[int], ExitRecorder] | None = None
        self.exit_observers: dict[int, ExitObserver] = {}
        # called after a guest crash (triple fault, KVM internal error), vCPUs stopped, before
        # the machine is torn down: --dump-on-crash writes its core here
        self.on_crash: Callable[[Machine, ExitResult], None] | None = None

    @classmethod
    def from_snapshot(
        cls,
        path: str | os.PathLike[str],
        *,
        console: Callable[[bytes], None] | None = None,
        kvm_path: str = "/dev/kvm",
        clone_index: int | None = None,
        host: HostResources | None = None,
        warm: WarmVm | None = None,
    ) -> Machine:
        """A machine that resumes where the snapshot at `path` was taken; start() or run()
        continues the guest. RAM is mapped from the snapshot lazily, so this is fast whatever
        the memory size, and machines restored from one snapshot share unchanged pages.
        The manifest is not trusted with the host: its disks, NICs, vsock and console are
        taken from `host` (HostResources: the caller's grant; none for a snapshot without
        them), and one the caller did not grant is refused (FieldError naming the field).
        `clone_index` gives a clone its own host resources and vsock CID (MachineConfig.for_clone).
        `warm`: a WarmVm of the guest's memory size to restore into (the first build uses it)."""
        from corral.state.snapshot import read_snapshot

        snap = read_snapshot(path)
        config = (host or HostResources()).apply(snap.manifest.config, "the snapshot")
        if clone_index is not None:
            config = config.for_clone(clone_index)
        return cls(config, console=console, kvm_path=kvm_path, restore_from=snap, warm=warm)

    # -- the board's parts, for callers that look inside ----------------------------------------
    @property
    def serial(self) -> Serial16550 | None:
        return self.board.serial if self.board else None

    @property
    def virtio(self) -> dict[str, VirtioPciDevice]:
        return self.board.virtio if self.board else {}

    @property
    def loop(self) -> EventLoop | None:
        return self.board.loop if self.board else None

    # -- VmControl (called by devices and vCPUs, from any thread) ------------------------------
    def request_exit(self, status: int) -> None:
        self._finish(ExitResult("exit", status, f"guest wrote {status} to the exit port"))

    def request_poweroff(self) -> None:
        self._finish(ExitResult("poweroff", 0, "guest powered off"))

    def request_reset(self) -> None:
        self._finish(ExitResult("reset", 0, "guest requested reset"))

    def request_suspend(self) -> None:
        """The guest entered ACPI S3 (from its vCPU thread): every vCPU parks until wake().
        The devices and the clock run on, as a sleeping PC's RTC does."""
        with self._result_lock:
            if self._result is not None:
                return
            self.suspended = True
        self.hold_vcpus()
        log.info("guest suspended to RAM (ACPI S3); `corral wake` resumes it")

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
        """Create the VM and load the guest (or its saved state); vCPUs are configured but not
        started."""
        cfg = self.config
        snap, self._restore = self._restore, None
        warm, self._warm = self._warm, None
        try:
            if warm is not None and snap is not None:  # made before: VM and RAM slots there
                vm, memory = warm.take(cfg, self.kvm_path)
                self.vm, self.memory = vm, memory
            else:
                self.vm = vm = Vm.create(self.kvm_path, cfg.cpus)
            self.cpu_model = CpuModel.from_cpuid(vm.supported_cpuid)
            if snap is not None and snap.manifest.cpu != self.cpu_model:
                raise SnapshotError(
                    f"{snap.path} was taken on a {snap.manifest.cpu.describe()}; this "
                    f"host has a {self.cpu_model.describe()}: the guest would see its CPU change"
                )
            if self.memory is not None:
                assert snap is not None
                self.memory.adopt_backing(snap.memory_file, ksm=cfg.ksm)  # over the slots' RAM
            else:
                self.memory = GuestMemory(cfg.memory, backing=snap.memory_file if snap else None, ksm=cfg.ksm)
                # a fresh boot makes its board, kernel and vCPUs while KVM registers the RAM
                # (not a firmware's board, which splits the slots; not a restore, whose MSRs
                # may point into RAM)
                fresh = snap is None and not self._incoming and cfg.firmware is None
                vm.map_memory(self.memory, background=fresh)
            self.board = build_board(vm, self.memory, cfg, self, self._console, self.net_filters)
            if snap is not None:
                self._restore_state(snap.state)
            elif self._incoming:
                self.vcpus = blank_vcpus(vm, self.board, self, cfg)
            else:
                self.boot = load_guest(self.memory, cfg)
                self.vcpus = create_vcpus(vm, self.board, self, cfg, self.boot)
            vm.wait_mapped()
        except BaseException:
            self.close()
            raise

    @property
    def _vcpus_started(self) -> bool:
        return any(v.thread is not None for v in self.vcpus)

    def start(self) -> None:
        if self.vm is None:
            self.build()
        if self._incoming:
            raise VmStateError("an incoming machine starts once its state has arrived")
        if self._vcpus_started:
            return  # already running
        if self._result is not None:
            return  # stopped while it was being built
        assert self.vm is not None and self.memory is not None
        self.memory.check_backing()  # a restored VM's memory file may have shrunk since mapped
        if self._clock_at_pause is not None:
            # a restored guest's clock continues from the snapshot, not from when it was taken
            self.vm.set_clock(self._clock_at_pause)
            self._clock_at_pause = None
        hold, self.hold_at_start = self.hold_at_start, False
        if hold:
            for v in self.vcpus:
                v.request_pause()
        if self.loop is not None:
            self.loop.start()
        self._attach_observers()
        for v in self.vcpus:
            v.start()
        if hold:
            self.pause()

    # -- pause, resume, state -----------------------------------------------------------------
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every other pause, resume, snapshot or migration while the block runs."""
        with self._state_lock:
            yield

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
            late = self._wait_parked(timeout)
            if late is not None:
                self.release_vcpus()
                raise VmStateError(f"vcpu{late.index} did not pause within {timeout:g} s; the guest runs on")
            if self.loop is not None and not self.loop.pause(timeout):
                # a failed pause leaves the guest as it was: running, devices and all
                self.loop.resume()
                self.release_vcpus()
                raise VmStateError(
                    f"the device event loop did not pause within {timeout:g} s; the guest runs on"
                )
            self._clock_at_pause = self.vm.get_clock()
            for v in self.vcpus:
                v.notify_paused()
            self.paused = True

    def _wait_parked(self, timeout: float) -> Vcpu | None:
        """Wait until every vCPU asked to park has; the first still running after `timeout`."""
        deadline = time.monotonic() + timeout
        for v in self.vcpus:
            while not v.parked.wait(0.05):
                if v.thread is None or not v.thread.is_alive() or self._stopped.is_set():
                    break  # a stopped vCPU is as still as a parked one
                if time.monotonic() > deadline:
                    return v
        return None

    def resume(self) -> None:
        with self._state_lock:
            if not self.paused:
                return
            assert self.vm is not None
            if self._clock_at_pause is not None:
                self.vm.set_clock(self._clock_at_pause)
                self._clock_at_pause = None
            if self.loop is not None:
                self.loop.resume()
            if not self.suspended:  # a suspended guest sleeps on until wake()
                self.release_vcpus()
            self.paused = False

    def wake(self, timeout: float = 10.0) -> None:
        """Wake a guest suspended to RAM (ACPI S3), as a PC resumes: WAK_STS set in PM1_STS,
        every CPU reset with RAM kept, vCPU 0 entering the FACS waking vector (real mode CS:IP
        from FIRMWARE_WAKING_VECTOR, or flat 32-bit protected mode at X_FIRMWARE_WAKING_VECTOR),
        the other vCPUs waiting for the OS's INIT/SIPI. A paused machine wakes when resumed.
        VmStateError when it is not suspended or its FACS gives no vector (it stays suspended)."""
        with self._state_lock:
            if not self.suspended:
                raise VmStateError("the guest is not suspended to RAM: nothing to wake")
            assert self.vm is not None and self.memory is not None and self.board is not None
            late = self._wait_parked(timeout)
            if late is not None:
                raise VmStateError(f"vcpu{late.index} did not stop for the suspend within {timeout:g} s")
            try:
                vector = acpi.waking_vector(self.memory.read(acpi.find_facs(self.memory.read), 64))
            except acpi.WakingVectorError as exc:
                raise VmStateError(f"cannot wake the guest: {exc}; it stays suspended (stop it)") from None
            supported = set(self.vm.msr_indices)
            for v in self.vcpus:
                bsp = v.index == 0
                v.reset_for_wake(wake_msrs(supported, bsp), vector.address if bsp else None, vector.protected)
            pm = self.board.legacy["acpi-pm"]
            assert isinstance(pm, AcpiPm)
            pm.wake()
            self.suspended = False
            if not self.paused:
                self.release_vcpus()

    def hold_vcpus(self) -> None:
        """Ask every vCPU to park, without waiting and without stopping the clock or the devices
        (throttling: the guest sees a busy host, not a pause)."""
        for v in self.vcpus:
            v.request_pause()

    def release_vcpus(self) -> None:
        for v in self.vcpus:
            v.resume()

    # -- exit statistics and tracing --------------------------------------------------------------
    def observe_exits(self, on: bool = True) -> None:
        """Count (on) or stop counting every vCPU's exits by reason, port and address, with the
        time spent handling them (see vstate.exits); the counts so far are kept."""
        self._observing = on or self._recorder_for is not None
        self._attach_observers()

    def trace_exits(self, recorder_for: Callable[[int], ExitRecorder] | None) -> None:
        """Hand every exit of vCPU i to `recorder_for(i)` (a trace; None: stop tracing).
        Tracing counts the exits too."""
        self._recorder_for = recorder_for
        for i, obs in self.exit_observers.items():
            obs.recorder = recorder_for(i) if recorder_for else None
        self.observe_exits(self._observing or recorder_for is not None)

    @property
    def observing_exits(self) -> bool:
        return self._observing

    def _attach_observers(self) -> None:
        for v in self.vcpus:
            if not self._observing:
                v.set_observer(None)
                continue
            obs = self.exit_observers.get(v.index)
            if obs is None:
                rec = self._recorder_for(v.index) if self._recorder_for else None
                obs = self.exit_observers[v.index] = ExitObserver(rec)
            v.set_observer(obs)

    # -- dirty logging (live migration) ---------------------------------------------------------
    def start_dirty_log(self) -> None:
        """Track the pages the guest writes (KVM's log) and those the VMM writes (device DMA)."""
        assert self.vm is not None and self.memory is not None
        self.vm.start_dirty_log()
        self.memory.track_vmm_writes()

    def read_dirty_log(self, *, with_vmm_writes: bool = False) -> set[int]:
        """Backing offsets of the pages written since the last read; the VMM's own writes since
        the log started are added when `with_vmm_writes`."""
        assert self.vm is not None and self.memory is not None
        dirty = self.vm.read_dirty_log()
        if with_vmm_writes and self.memory.vmm_dirty:
            dirty |= {p * PAGE for p in self.memory.vmm_dirty}
        return dirty

    def stop_dirty_log(self) -> None:
        if self.memory is not None:
            self.memory.vmm_dirty = None
        if self.vm is not None:
            self.vm.stop_dirty_log()

    # -- memory balloon -------------------------------------------------------------------------
    def _balloon(self) -> VirtioBalloon:
        fn = self.virtio.get("virtio-balloon")
        if fn is None:
            raise VmStateError("this VM has no balloon: give it one (balloon=True in its config)")
        from corral.devices.virtio.balloon import VirtioBalloon  # imported: the builder made one

        assert isinstance(fn.device, VirtioBalloon)
        return fn.device

    def set_balloon(self, target_bytes: int) -> None:
        """Ask the guest to hand `target_bytes` of its RAM back to the host (0: take it all back)."""
        if not 0 <= target_bytes <= self.config.memory:
            raise VmStateError(
                f"a balloon of {target_bytes} bytes does not fit in the guest's "
                f"{self.config.memory >> 20} MiB"
            )
        self._balloon().set_target_bytes(target_bytes)

    def balloon_info(self, timeout: float = 2.0) -> BalloonInfo:
        """Target and actual balloon size, host memory behind guest RAM, and the guest's latest
        memory statistics (asked for fresh ones, waiting up to `timeout`)."""
        balloon = self._balloon()
        assert self.memory is not None
        return balloon.info(self.memory.resident_bytes(), self.loop.call_soon if self.loop else None, timeout)

    def status(self) -> MachineStatus:
        return MachineStatus(
            state="suspended" if self.suspended else "paused" if self.paused else "running",
            cpus=self.config.cpus,
            memory=self.config.memory,
        )

    # -- the state walk -------------------------------------------------------------------------
    def save_state(self) -> MachineState:
        """The state of a paused (or never started) machine, RAM aside."""
        with self._state_lock:
            if self.vm is None or self.board is None:
                raise VmStateError("the machine is not built: it has no state")
            if not self.paused and any(v.thread is not None and v.thread.is_alive() for v in self.vcpus):
                raise VmStateError("pause the machine before saving its state")
            # the first save reads every MSR KVM lists, skipping those refused; later ones only
            # what the first read (one ioctl each, not a probe and a read: not in the downtime)
            vm_state = self.vm.save_state()
            if self._clock_at_pause is not None:
                vm_state.clock = self._clock_at_pause
            vcpus = [v.save_state(self._msr_indices or self.vm.msr_indices) for v in self.vcpus]
            if self._msr_indices is None and vcpus:
                self._msr_indices = list(vcpus[0].msrs)
            return MachineState(
                vm=vm_state,
                vcpus=vcpus,
                devices={
                    name: dev.save_state().model_dump(mode="json")
                    for name, dev in self.board.components().items()
                },
            )

    def prepare_state_models(self) -> None:
        """Build the validators and serializers of the machine's state models now (they are
        deferred to first use, so a launch does not pay for them): ~10 ms, which a migration
        pays before its stop-and-copy instead of in the guest's downtime. The models inside them
        too (VcpuState, VmKvmState): each is built on its own first use, and those two alone
        were ~3 ms of the first save_state()."""
        roots: list[type[BaseModel]] = [MachineState]
        if self.board is not None:
            roots += [dev.state_model for dev in self.board.components().values()]
        from pydantic_core import SchemaValidator

        for model in state_models(roots):
            if not isinstance(model.__pydantic_validator__, SchemaValidator):
                model.model_rebuild(force=True)
            prepare_quick(model)  # the first save's instances are quick ones (~0.4 ms in all)

    def load_incoming(self, state: MachineState) -> None:
        """Finish an incoming machine (built with incoming=True, RAM already filled): load its
        vCPUs (created blank by build()) and every component from `state`. start() then runs
        the guest."""
        if not self._incoming or self.vm is None or len(self.vcpus) != self.config.cpus:
            raise VmStateError("load_incoming() needs a machine built with incoming=True")
        if len(state.vcpus) != self.config.cpus:
            raise SnapshotError(f"the state has {len(state.vcpus)} vCPUs, the config {self.config.cpus}")
        try:
            self._restore_state(state, blank_vcpus=True)
        except BaseException:
            self.close()  # half loaded: never to run
            raise
        self._incoming = False

    def _restore_state(self, state: MachineState, *, blank_vcpus: bool = False) -> None:
        assert self.vm is not None and self.board is not None
        comps = self.board.components()
        if set(state.devices) != set(comps):
            raise SnapshotError(
                f"the saved devices ({', '.join(state.devices)}) do not match this "
                f"machine's ({', '.join(comps)})"
            )
        if blank_vcpus:  # an incoming machine's, created before its state arrived
            for v in self.vcpus:
                v.load_state(state.vcpus[v.index])
        else:
            self.vcpus = restore_vcpus(self.vm, self.board, self, state.vcpus)
        self.vm.load_state(state.vm)
        for name, data in state.devices.items():
            dev = comps[name]
            dev.load_state(dev.state_model.model_validate(data))
        self._clock_at_pause = state.vm.clock  # applied when the vCPUs start

    def snapshot(
        self, path: str | os.PathLike[str], *, pages: Collection[int] | None = None
    ) -> SnapshotStats:
        """Write the machine to `path` (a new directory). A running machine is paused for the
        copy and resumed afterwards; a paused one stays paused. With `pages` (backing offsets,
        from the dirty log) only those pages of RAM are written: a diff snapshot."""
        from corral.state.snapshot import write_snapshot

        with self._state_lock:
            was_paused = self.paused
            self.pause()
            try:
                state = self.save_state()
                assert self.memory is not None and self.cpu_model is not None
                return write_snapshot(path, self.config, self.cpu_model, state, self.memory, pages=pages)
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
                log.warning(
                    "vcpu%d (mp_state %s, %d exits):\n%s",
                    v.index,
                    v.mp_state_name(),
                    v.exits,
                    v.describe_registers(),
                )
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.board is not None:
            self.board.close()
            self.board = None
        _close_vm_and_memory(self)
        self.suspended = False  # a reboot starts awake

    def run(self) -> ExitResult:
        """Boot, wait for the guest to stop, reboot on reset unless no_reboot, tear down."""
        while True:
            if self._stop_requested:
                return ExitResult("stopped", 0, "stopped by the host", self.reboots)
            with self._result_lock:
                if not self._vcpus_started:
                    # (one started before run(), as a migration's destination starts it at
                    # once, keeps what it may already have reported)
                    self._result = None
                    self._stopped.clear()
            interrupted = True
            try:
                self.start()
                result = self.wait()
                interrupted = False
                if result is not None and result.kind == "crash" and self.on_crash is not None:
                    self.on_crash(self, result)  # the vCPUs are stopped, the RAM still there
            finally:
                # an interrupted run (Ctrl-C) shows where each vCPU was, with -v
                self.close(dump_registers=interrupted and log.isEnabledFor(logging.INFO))
            assert result is not None
            if result.kind == "reset" and not self.config.no_reboot and not self._stop_requested:
                self.reboots += 1
                log.info("guest reset: rebooting (%d)", self.reboots)
                continue
            return ExitResult(result.kind, result.status, result.message, self.reboots)

    def _stdout_console(self, data: bytes) -> None:
        """The serial console's default: this process's stdout. A closed one (a reader that
        went away: `corral run | head`) stops the VM with one line instead of a crash."""
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except (OSError, ValueError, AttributeError) as exc:  # EPIPE, closed, or no stdout at all
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "closed"
            self.vcpu_stop("error", 1, f"the console's output (stdout) failed: {why}: the VM was stopped")

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ExitResult", "Machine", "MachineStatus", "VmStateError"]
