"""The VMM behind the Firecracker API: resources gathered from pre-boot requests, a corral
Machine once InstanceStart (or a snapshot load) builds one, and the post-boot verbs on it.

Firecracker's phases are kept: pre-boot requests configure resources (and are refused after
boot), post-boot requests act on the running machine (and are refused before), with
Firecracker's messages. Every refusal is a FirecrackerError whose text is the fault message; a
failed snapshot load is a FatalError, after which the process ends, as Firecracker's does.

Snapshots: Firecracker writes two files, the microVM state (`snapshot_path`) and guest memory
(`mem_file_path`); corral writes a directory (manifest.json, state.json, memory.bin). The
mapping: corral's snapshot is written into a temporary directory beside `snapshot_path`, its
memory.bin is renamed to `mem_file_path` (copied, keeping holes, across file systems), and
`snapshot_path` becomes one JSON file holding manifest.json's and state.json's text and the
Firecracker resources (drive and interface ids). A load rebuilds the directory in a temporary
place, memory.bin being a symlink to the memory file given, and restores from it; RAM stays
mapped from that file, privately, as any corral restore.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from corral.config import DiskConfig, MachineConfig, NetConfig, VsockConfig
from corral.devices.mmds import Mmds, MmdsStack
from corral.errors import CorralError, FieldError
from corral.firecracker.logs import configure_logging, write_metrics
from corral.firecracker.models import (
    Balloon,
    BalloonStats,
    BalloonStatsUpdate,
    BalloonUpdate,
    BootSource,
    CorralOptions,
    CorralReceive,
    Drive,
    EntropyDevice,
    FullVmConfiguration,
    InstanceInfo,
    Logger,
    MachineConfiguration,
    MachineConfigurationUpdate,
    Metrics,
    MmdsConfig,
    NetworkInterface,
    PartialDrive,
    PartialNetworkInterface,
    SerialDevice,
    SnapshotCreateParams,
    SnapshotLoadParams,
    Vsock,
)
from corral.firecracker.snapshot import DirtyPages, create_snapshot_files, staged_snapshot
from corral.machine import ExitResult, Machine
from corral.migration import listen, receive
from corral.seccomp import enter as enter_seccomp
from corral.state.snapshot import Snapshot

log = logging.getLogger(__name__)

APP_NAME = "corral"
FIRECRACKER_API_VERSION = "1.17.0"  # the spec this API follows
MAX_VCPUS = 32  # Firecracker's limit, kept so configs that work there work here
MIB = 1 << 20
PAGE = 4096
DEFAULT_BOOT_ARGS = (
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce"
)
MMDS_MAX = 51200  # bytes of MMDS data, Firecracker's default limit

PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."
POST_BOOT_ONLY = "The requested operation is not supported before starting the microVM."
WAITS_FOR_MIGRATION = "The requested operation is not supported while the microVM waits for a migration."
LOAD_NOT_ALLOWED = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
)

State = Literal["Not started", "Running", "Paused"]
# (config, snapshot to restore or None, console or None) -> an unbuilt Machine
MachineFactory = Callable[[MachineConfig, Snapshot | None, Callable[[bytes], None] | None], Machine]


class FirecrackerError(CorralError):
    """A request refused: the message is the fault message, `status` the HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FatalError(FirecrackerError):
    """A failure after which the process ends once the client has its answer (a failed load)."""


def _os_error(exc: OSError) -> str:
    return f"{exc.strerror} (os error {exc.errno})"


def _default_machine(kvm_path: str) -> MachineFactory:
    def make(
        config: MachineConfig, snap: Snapshot | None, console: Callable[[bytes], None] | None
    ) -> Machine:
        return Machine(config, console=console, kvm_path=kvm_path, restore_from=snap)

    return make


class FirecrackerVmm:
    """One microVM as Firecracker's API sees it. Not thread-safe: the API serializes calls."""

    def __init__(
        self,
        instance_id: str = "anonymous-instance",
        *,
        kvm_path: str = "/dev/kvm",
        machine_factory: MachineFactory | None = None,
        boot_timer: bool = False,
    ) -> None:
        self.instance_id = instance_id
        self._make_machine = machine_factory or _default_machine(kvm_path)
        self.kvm_path = kvm_path
        self.boot_timer = boot_timer
        self.machine_config = MachineConfiguration(vcpu_count=1, mem_size_mib=128)
        self.boot_source: BootSource | None = None
        self.drives: dict[str, Drive] = {}
        self.nets: dict[str, NetworkInterface] = {}
        self.vsock: Vsock | None = None
        self.entropy: EntropyDevice | None = None
        self.balloon: Balloon | None = None
        self.mmds_config: MmdsConfig | None = None
        self.mmds_data: Any = None
        self.logger: Logger | None = None
        self.metrics: Metrics | None = None
        self.corral_options = CorralOptions()  # the config's `corral` key: KSM, exit stats
        self.serial: SerialDevice | None = None
        self.boot_path = False  # a boot resource was configured: no snapshot load any more
        self.machine: Machine | None = None
        self.started = False  # the vCPUs run (a loaded snapshot waits for Resumed)
        self.exited = threading.Event()
        # Set with `exited`, and by whoever else needs the process's main thread: it sleeps on
        # this one event instead of polling (an idle VM must cost its host no wake-ups).
        self.wake = threading.Event()
        self.exit_result: ExitResult | None = None
        self._serial_file: Any = None
        self._dirty: DirtyPages | None = None  # track_dirty_pages: what a Diff snapshot writes
        self.receiving = False  # PUT /corral/receive: a migration is awaited
        self.gdb: Any = None  # the GdbStub PUT /corral/gdb started (closed when the guest stops)

    @classmethod
    def attached(cls, machine: Machine, instance_id: str = "corral") -> FirecrackerVmm:
        """The API's view of a machine started elsewhere (`corral run --api`): post-boot from
        the start, its resources read from its config."""
        vmm = cls(instance_id)
        cfg = machine.config
        vmm.machine_config = MachineConfiguration(vcpu_count=cfg.cpus, mem_size_mib=cfg.memory // MIB)
        vmm.boot_source = BootSource(
            kernel_image_path=str(cfg.kernel or ""),
            boot_args=cfg.cmdline,
            initrd_path=None if cfg.initrd is None else str(cfg.initrd),
        )
        if cfg.balloon:
            vmm.balloon = Balloon(amount_mib=0, deflate_on_oom=False, stats_polling_interval_s=1)
        vmm.machine, vmm.started = machine, True
        return vmm

    # -- phases -----------------------------------------------------------------------------------
    @property
    def booted(self) -> bool:
        return self.machine is not None

    def _pre_boot(self) -> None:
        if self.booted:
            raise FirecrackerError(PRE_BOOT_ONLY)
        if self.receiving:  # the guest, its devices and size come with the migration
            raise FirecrackerError(WAITS_FOR_MIGRATION)

    def _post_boot(self) -> Machine:
        if self.machine is None:
            raise FirecrackerError(POST_BOOT_ONLY)
        return self.machine

    def state(self) -> State:
        if self.machine is None:
            return "Not started"
        return "Paused" if self.machine.paused or not self.started else "Running"

    # -- reads ------------------------------------------------------------------------------------
    def instance_info(self) -> InstanceInfo:
        return InstanceInfo(
            app_name=APP_NAME, id=self.instance_id, state=self.state(), vmm_version=FIRECRACKER_API_VERSION
        )

    def full_config(self) -> FullVmConfiguration:
        return FullVmConfiguration.model_construct(
            balloon=self.balloon,
            drives=list(self._ordered_drives()),
            boot_source=self.boot_source,
            logger=self.logger,
            machine_config=self.machine_config,
            metrics=self.metrics,
            mmds_config=self.mmds_config,
            network_interfaces=list(self.nets.values()),
            vsock=self.vsock,
            entropy=self.entropy,
            corral=None if self.corral_options == CorralOptions() else self.corral_options,
        )

    # -- machine configuration --------------------------------------------------------------------
    def put_machine_config(self, cfg: MachineConfiguration) -> None:
        self._pre_boot()
        self._check_machine_config(cfg)
        self.machine_config = cfg
        self.boot_path = True

    def patch_machine_config(self, upd: MachineConfigurationUpdate) -> None:
        self._pre_boot()
        fields = {k: getattr(upd, k) for k in upd.model_fields_set}
        if not fields:
            raise FirecrackerError("Machine config error: give at least one field to change")
        cfg = self.machine_config.model_copy(update=fields)
        self._check_machine_config(cfg)
        self.machine_config = cfg
        self.boot_path = True

    def _check_machine_config(self, cfg: MachineConfiguration) -> None:
        if not 1 <= cfg.vcpu_count <= MAX_VCPUS or (cfg.smt and cfg.vcpu_count > 1 and cfg.vcpu_count % 2):
            raise FirecrackerError(
                f"Machine config error: The number of vCPUs must be greater than 0, less than "
                f"{MAX_VCPUS} and must be 1 or an even number if SMT is enabled."
            )
        if cfg.mem_size_mib == 0:
            raise FirecrackerError(
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of the "
                "configured page size."
            )
        if self.balloon is not None and self.balloon.amount_mib > cfg.mem_size_mib:
            raise FirecrackerError(
                "Machine config error: The memory size (MiB) is smaller than the previously set "
                "balloon device target size."
            )
        if cfg.huge_pages != "None":
            raise FirecrackerError(
                "Machine config error: corral backs guest memory with 4 KiB pages only: leave "
                "huge_pages at None"
            )
        if cfg.cpu_template not in (None, "None"):
            raise FirecrackerError(
                "Machine config error: corral has no CPU templates: leave cpu_template out "
                "(corral run --cpu-hide hides CPU features)"
            )
        try:
            MachineConfig.build(kernel="-", cpus=cfg.vcpu_count, memory=cfg.mem_size_mib * MIB)
        except FieldError as exc:
            raise FirecrackerError(f"Machine config error: {exc}") from None

    # -- boot source ------------------------------------------------------------------------------
    def put_boot_source(self, src: BootSource) -> None:
        self._pre_boot()
        try:
            with open(src.kernel_image_path, "rb"):
                pass
        except OSError as exc:
            raise FirecrackerError(
                f"Boot source error: The kernel file cannot be opened: {_os_error(exc)}"
            ) from None
        if src.initrd_path is not None:
            try:
                with open(src.initrd_path, "rb"):
                    pass
            except OSError as exc:
                raise FirecrackerError(
                    "Boot source error: The initrd file cannot be opened due to invalid path or "
                    f"invalid permissions. {_os_error(exc)}"
                ) from None
        self.boot_source = src
        self.boot_path = True

    # -- drives -----------------------------------------------------------------------------------
    def put_drive(self, drive: Drive) -> None:
        self._pre_boot()
        if drive.socket is not None:
            raise FirecrackerError(
                "Drive config error: corral has no vhost-user block backend: "
                "give path_on_host instead of socket"
            )
        if drive.path_on_host is None:
            raise FirecrackerError("Drive config error: path_on_host is required for a virtio-block drive")
        if drive.is_root_device and any(
            d.is_root_device and d.drive_id != drive.drive_id for d in self.drives.values()
        ):
            raise FirecrackerError("Drive config error: A root block device already exists!")
        flags = os.O_RDONLY if drive.is_read_only else os.O_RDWR
        try:
            os.close(os.open(drive.path_on_host, flags | os.O_CLOEXEC))
        except OSError as exc:
            raise FirecrackerError(
                f"Drive config error: Unable to create the virtio block device: {drive.path_on_host}: "
                f"{_os_error(exc)}"
            ) from None
        if len(self.drives) >= 16 and drive.drive_id not in self.drives:
            raise FirecrackerError("Drive config error: corral gives a microVM at most 16 drives")
        self.drives[drive.drive_id] = drive
        self.boot_path = True

    def patch_drive(self, upd: PartialDrive) -> None:
        self._post_boot()
        drive = self.drives.get(upd.drive_id)
        if drive is None:
            raise FirecrackerError(
                f"Drive config error: Unable to patch the block device: there is no drive "
                f"'{upd.drive_id}' Please verify the request arguments."
            )
        if upd.path_on_host is not None and upd.path_on_host != drive.path_on_host:
            raise FirecrackerError(
                "Drive config error: Unable to patch the block device: corral cannot change a "
                "drive's file while the microVM runs Please verify the request arguments."
            )
        if upd.rate_limiter is not None:
            self.drives[upd.drive_id] = drive.model_copy(update={"rate_limiter": upd.rate_limiter})

    def _ordered_drives(self) -> list[Drive]:
        """The root drive first (it becomes /dev/vda), then the others in the order given."""
        return sorted(self.drives.values(), key=lambda d: not d.is_root_device)

    # -- network, vsock, entropy ------------------------------------------------------------------
    def put_net(self, iface: NetworkInterface) -> None:
        self._pre_boot()
        try:
            NetConfig(tap=iface.host_dev_name, mac=iface.guest_mac or "")
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise FirecrackerError(
                f"Network config error: Could not create the network device: {msg}"
            ) from None
        for other in self.nets.values():
            if other.iface_id == iface.iface_id:
                continue
            if iface.guest_mac and other.guest_mac and iface.guest_mac.lower() == other.guest_mac.lower():
                raise FirecrackerError(
                    f"Network config error: The MAC address is already in use: {iface.guest_mac}"
                )
            if other.host_dev_name == iface.host_dev_name:
                raise FirecrackerError(
                    f"Network config error: Cannot open/create the tap device: {iface.host_dev_name} "
                    f"is already used by interface {other.iface_id}"
                )
        if len(self.nets) >= 16 and iface.iface_id not in self.nets:
            raise FirecrackerError("Network config error: corral gives a microVM at most 16 interfaces")
        self.nets[iface.iface_id] = iface
        self.boot_path = True

    def patch_net(self, upd: PartialNetworkInterface) -> None:
        self._post_boot()
        iface = self.nets.get(upd.iface_id)
        if iface is None:
            raise FirecrackerError(
                "Network config error: Unable to update the net device: "
                f"there is no interface '{upd.iface_id}'"
            )
        self.nets[upd.iface_id] = iface.model_copy(
            update={k: getattr(upd, k) for k in upd.model_fields_set if k != "iface_id"}
        )

    def put_vsock(self, vsock: Vsock) -> None:
        self._pre_boot()
        try:
            VsockConfig(cid=vsock.guest_cid, uds_path=Path(vsock.uds_path))
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"]
            raise FirecrackerError(f"Vsock config error: Cannot create vsock device: {msg}") from None
        self.vsock = vsock
        self.boot_path = True

    def put_entropy(self, dev: EntropyDevice) -> None:
        self._pre_boot()
        self.entropy = dev
        self.boot_path = True

    # -- balloon ----------------------------------------------------------------------------------
    def put_balloon(self, cfg: Balloon) -> None:
        self._pre_boot()
        if cfg.amount_mib > self.machine_config.mem_size_mib:
            raise FirecrackerError("Balloon config error: Amount of pages requested is too large.")
        if cfg.free_page_hinting:
            raise FirecrackerError(
                "Balloon config error: corral's balloon has no free page hinting: it reports free "
                "pages instead (free_page_reporting)"
            )
        self.balloon = cfg
        self.boot_path = True

    def get_balloon(self) -> Balloon:
        if self.balloon is None:
            raise FirecrackerError("Balloon config error: No balloon device found.")
        return self.balloon

    def patch_balloon(self, upd: BalloonUpdate) -> None:
        balloon = self.get_balloon()
        if upd.amount_mib > self.machine_config.mem_size_mib:
            raise FirecrackerError("Balloon update error: Amount of pages requested is too large.")
        if self.machine is not None:
            try:
                self.machine.set_balloon(upd.amount_mib * MIB)
            except CorralError as exc:
                raise FirecrackerError(f"Balloon update error: {exc}") from None
        self.balloon = balloon.model_copy(update={"amount_mib": upd.amount_mib})

    def patch_balloon_stats(self, upd: BalloonStatsUpdate) -> None:
        self._post_boot()
        balloon = self.get_balloon()
        if (upd.stats_polling_interval_s == 0) != (balloon.stats_polling_interval_s == 0):
            raise FirecrackerError(
                "Balloon update error: Statistics cannot be enabled/disabled after activation."
            )
        self.balloon = balloon.model_copy(update={"stats_polling_interval_s": upd.stats_polling_interval_s})

    def balloon_stats(self) -> BalloonStats:
        machine = self._post_boot()
        balloon = self.get_balloon()
        if balloon.stats_polling_interval_s == 0:
            raise FirecrackerError(
                "Internal VMM error: Balloon error: Received stats query when stats are disabled."
            )
        try:
            info = machine.balloon_info()
        except CorralError as exc:
            raise FirecrackerError(f"Internal VMM error: {exc}") from None
        names = set(BalloonStats.model_fields)
        return BalloonStats(
            target_pages=info.target_bytes // PAGE,
            actual_pages=info.actual_bytes // PAGE,
            target_mib=info.target_bytes // MIB,
            actual_mib=info.actual_bytes // MIB,
            **{k: v for k, v in info.stats.items() if k in names},
        )

    # -- logger, metrics, serial, MMDS ------------------------------------------------------------
    def put_logger(self, cfg: Logger) -> None:
        self._pre_boot()
        try:
            configure_logging(cfg.log_path, cfg.level)
        except CorralError as exc:
            raise FirecrackerError(f"Logger error: {exc}") from None
        self.logger = cfg

    def put_metrics(self, cfg: Metrics) -> None:
        self._pre_boot()
        if self.metrics is not None:
            raise FirecrackerError("Metrics error: Reinitialization of metrics not allowed.")
        try:
            with open(cfg.metrics_path, "a"):
                pass
        except OSError as exc:
            raise FirecrackerError(f"Metrics error: Cannot open the metrics file: {_os_error(exc)}") from None
        self.metrics = cfg

    def put_serial(self, cfg: SerialDevice) -> None:
        self._pre_boot()
        if cfg.serial_out_path is not None:
            try:
                with open(cfg.serial_out_path, "ab"):
                    pass
            except OSError as exc:
                raise FirecrackerError(f"Cannot open the serial output file: {_os_error(exc)}") from None
        self.serial = cfg

    def put_mmds_config(self, cfg: MmdsConfig) -> None:
        self._pre_boot()
        if not cfg.network_interfaces:
            raise FirecrackerError(
                "MMDS config error: The list of network interface IDs that allow forwarding MMDS "
                "requests is empty."
            )
        if any(i not in self.nets for i in cfg.network_interfaces):
            raise FirecrackerError(
                "MMDS config error: The list of network interface IDs provided contains at least "
                "one ID that does not correspond to any existing network interface."
            )
        if cfg.ipv4_address is not None:
            if not _mmds_address_ok(cfg.ipv4_address):
                raise FirecrackerError("MMDS config error: The MMDS IPv4 address is not link local.")
        self.mmds_config = cfg
        self.boot_path = True

    def get_mmds(self) -> Any:
        return {} if self.mmds_data is None else self.mmds_data

    def put_mmds(self, data: Any) -> None:
        self._check_mmds_size(data)
        self.mmds_data = data

    def patch_mmds(self, patch: Any) -> None:
        if self.mmds_data is None:
            raise FirecrackerError("MMDS error: The MMDS data store is not initialized.")
        merged = merge_patch(self.mmds_data, patch)
        self._check_mmds_size(merged)
        self.mmds_data = merged

    def _mmds_stacks(self, iface_ids: list[str], cfg: MmdsConfig | None) -> dict[int, MmdsStack]:
        """The MMDS stack for each interface (by index) that forwards to MMDS: one service, so a
        token works on all of them, reading self.mmds_data at each request (PUT and PATCH swap
        it whole, so the next request sees the update)."""
        if cfg is None:
            return {}
        mmds = Mmds(lambda: self.mmds_data, version=cfg.version, imds_compat=cfg.imds_compat)
        return {
            i: MmdsStack(mmds, cfg.ipv4_address)
            for i, iface in enumerate(iface_ids)
            if iface in cfg.network_interfaces
        }

    def _check_mmds_size(self, data: Any) -> None:
        if len(json.dumps(data)) > MMDS_MAX:
            raise FirecrackerError("MMDS limit exceeded error: The MMDS patch request doesn't fit.", 413)

    # -- actions ----------------------------------------------------------------------------------
    def instance_start(self) -> None:
        self._pre_boot()
        if self.boot_source is None:
            raise FirecrackerError("Start microvm error: Cannot start microvm without kernel configuration.")
        try:
            config = self.corral_config()
            machine = self._make_machine(config, None, self._console())
            machine.net_filters = self._mmds_stacks(list(self.nets), self.mmds_config)
            machine.build()
        except CorralError as exc:
            raise FirecrackerError(f"Start microvm error: {exc}") from None
        if self.corral_options.exit_stats:
            machine.observe_exits(True)  # from the first instruction
        self._run(machine)
        if self.machine_config.track_dirty_pages:
            self._dirty = DirtyPages(machine)
        if self.balloon is not None and self.balloon.amount_mib:
            machine.set_balloon(self.balloon.amount_mib * MIB)

    def send_ctrl_alt_del(self) -> None:
        # Corral's i8042 has no keyboard to type on: pulse its reset line, the end Firecracker's
        # Ctrl+Alt+Del leads a Linux guest to (reboot=k), which stops the microVM.
        self._post_boot().request_reset()

    def flush_metrics(self) -> None:
        self._post_boot()
        if self.metrics is None:
            return
        fields: dict[str, Any] = {"vmm": {"state": self.state()}}
        if self.metrics.emit_id:
            fields["id"] = self.instance_id
        if self.metrics.properties:
            fields["properties"] = dict(self.metrics.properties)
        try:
            write_metrics(self.metrics.metrics_path, fields)
        except CorralError as exc:
            raise FirecrackerError(f"Metrics error: {exc}") from None

    def pause(self) -> None:
        machine = self._post_boot()
        if self.started:
            try:
                machine.pause()
            except CorralError as exc:
                raise FirecrackerError(f"Internal VMM error: {exc}") from None

    def resume(self) -> None:
        machine = self._post_boot()
        try:
            if not self.started:
                self._start(machine)
            else:
                machine.resume()
        except CorralError as exc:
            raise FirecrackerError(f"Internal VMM error: {exc}") from None

    # -- snapshots --------------------------------------------------------------------------------
    def create_snapshot(self, params: SnapshotCreateParams) -> None:
        machine = self._post_boot()
        if params.snapshot_type == "Diff" and self._dirty is None:
            raise FirecrackerError(
                "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page "
                "tracking disabled: set track_dirty_pages in /machine-config (or on /snapshot/load)"
            )
        if not self.started:
            # a loaded VM not yet resumed: its vCPUs never ran, and corral saves a clock only
            # from a machine that has run (its snapshot would be the one it was loaded from)
            raise FirecrackerError(
                "Create snapshot error: this microVM was loaded from a snapshot and has not run "
                "since: resume it first (PATCH /vm Resumed), or copy the snapshot it was loaded from"
            )
        state_path, mem_path = Path(params.snapshot_path), Path(params.mem_file_path)
        try:
            create_snapshot_files(
                machine, state_path, mem_path, self.full_config(), self._dirty, params.snapshot_type == "Diff"
            )
        except CorralError as exc:
            raise FirecrackerError(f"Create snapshot error: {exc}") from None

    def load_snapshot(self, params: SnapshotLoadParams, mem_file: str) -> None:
        """Restore from `params.snapshot_path` and the memory file `mem_file` (mem_backend or the
        deprecated mem_file_path, resolved by the caller). The VM stays paused unless resume_vm."""
        self._pre_boot()
        if self.boot_path:
            raise FirecrackerError(LOAD_NOT_ALLOWED)
        try:
            machine = self._restore(params, mem_file)
        except CorralError as exc:
            raise FatalError(f"Load snapshot error: Failed to restore from snapshot: {exc}") from None
        self.machine = machine
        tracking = params.track_dirty_pages or params.enable_diff_snapshots
        self.machine_config = self.machine_config.model_copy(update={"track_dirty_pages": tracking})
        if tracking:
            self._dirty = DirtyPages(machine)
        self._watch(machine)
        if params.resume_vm:
            try:
                self._start(machine)
            except CorralError as exc:
                raise FatalError(f"Load snapshot error: Failed to resume microVM: {exc}") from None

    def _restore(self, params: SnapshotLoadParams, mem_file: str) -> Machine:
        with staged_snapshot(Path(params.snapshot_path), Path(mem_file)) as (snap, fc):
            config = self._apply_overrides(snap.manifest.config, fc, params)
            machine = self._make_machine(config, snap, self._console())
            ids = [n.iface_id for n in fc.network_interfaces]
            machine.net_filters = self._mmds_stacks(ids, fc.mmds_config)
            machine.build()  # opens the memory file: the staging directory may go
        # what GET /vm/config shows after a load (Firecracker leaves the boot source empty)
        self.drives = {d.drive_id: d for d in fc.drives}
        self.nets = {n.iface_id: n for n in fc.network_interfaces}
        for o in params.network_overrides:
            self.nets[o.iface_id] = self.nets[o.iface_id].model_copy(
                update={"host_dev_name": o.host_dev_name}
            )
        self.vsock = fc.vsock
        if fc.vsock is not None and params.vsock_override is not None:
            self.vsock = fc.vsock.model_copy(update={"uds_path": params.vsock_override.uds_path})
        self.entropy, self.balloon, self.mmds_config = fc.entropy, fc.balloon, fc.mmds_config
        self.corral_options = fc.corral or CorralOptions()  # what the snapshot's VM had
        if fc.machine_config is not None:
            self.machine_config = fc.machine_config.model_copy(update={"smt": False, "cpu_template": None})
        return machine

    def _apply_overrides(
        self, config: MachineConfig, fc: FullVmConfiguration, params: SnapshotLoadParams
    ) -> MachineConfig:
        if config.firmware is not None:  # never map a firmware file a snapshot names
            raise CorralError(
                "the snapshot booted through firmware: restore it with `corral restore --firmware`"
            )
        ids = [n.iface_id for n in fc.network_interfaces]
        nets = list(config.nets)
        for o in params.network_overrides:
            if o.iface_id not in ids or ids.index(o.iface_id) >= len(nets):
                raise CorralError(f"the snapshot has no network interface '{o.iface_id}' to override")
            i = ids.index(o.iface_id)
            try:
                # the guest keeps its MAC (derived from the old tap's name when none was given)
                mac = ":".join(f"{x:02x}" for x in nets[i].guest_mac())
                nets[i] = NetConfig(tap=o.host_dev_name, mac=mac, host_ip=nets[i].host_ip)
            except ValidationError as exc:
                raise CorralError(f"network_overrides: {exc.errors()[0]['msg']}") from None
        vsock = config.vsock
        if params.vsock_override is not None:
            if vsock is None:
                raise CorralError("vsock_override: the snapshot has no vsock device")
            vsock = vsock.model_copy(update={"uds_path": Path(params.vsock_override.uds_path)})
        return config.model_copy(update={"nets": tuple(nets), "vsock": vsock})

    # -- an incoming live migration (PUT /corral/receive) ------------------------------------------
    def receive(self, req: CorralReceive) -> str:
        """Listen for one live migration and return HOST:PORT; the guest runs once it has
        arrived. A migration that fails or does not come within the timeout ends the process
        (as a failed snapshot load does); the source then runs on."""
        if self.receiving:
            raise FirecrackerError("Receive error: this microVM already waits for a migration")
        self._pre_boot()
        if self.boot_path:
            raise FirecrackerError(
                "Receive error: boot resources are configured: receive into a fresh microVM"
            )
        try:
            server = listen(req.listen)
        except CorralError as exc:
            raise FirecrackerError(f"Receive error: {exc}") from None
        self.receiving = True
        host, port = server.getsockname()[:2]
        console = self._console()
        threading.Thread(
            target=self._receive, args=(server, req, console), name="corral-fc-recv", daemon=True
        ).start()
        return f"{host}:{port}"

    def _receive(self, server: Any, req: CorralReceive, console: Callable[[bytes], None] | None) -> None:
        try:
            machine = receive(
                server,
                token=req.token,
                host=req.host,
                console=console,
                kvm_path=self.kvm_path,
                accept_timeout=req.timeout_s,
            )
            cfg = machine.config
            self.machine_config = MachineConfiguration(vcpu_count=cfg.cpus, mem_size_mib=cfg.memory // MIB)
            if cfg.balloon:
                self.balloon = Balloon(amount_mib=0, deflate_on_oom=False, stats_polling_interval_s=1)
            try:
                machine.start()
            except CorralError:
                machine.close()
                raise
            self.machine, self.started = machine, True
            self._watch(machine)
            log.info("the migration arrived; the microVM runs")
        except CorralError as exc:
            log.error("Receive error: %s", exc)
            self.exit_result = ExitResult("error", 1, f"the incoming migration failed: {exc}")
            self.exited.set()
            self.wake.set()
        finally:
            server.close()

    # -- the machine ------------------------------------------------------------------------------
    def corral_config(self) -> MachineConfig:
        """The corral MachineConfig these resources describe."""
        src = self.boot_source
        if src is None:
            raise FirecrackerError("Start microvm error: Cannot start microvm without kernel configuration.")
        cmdline = DEFAULT_BOOT_ARGS if src.boot_args is None else src.boot_args
        drives = self._ordered_drives()
        root = next((d for d in drives if d.is_root_device), None)
        if root is not None:
            where = f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda"
            cmdline = f"{cmdline} {where} {'ro' if root.is_read_only else 'rw'}".strip()
        try:
            return self._build_config(src, cmdline, drives)
        except ValidationError as exc:
            raise FirecrackerError(f"Start microvm error: {exc.errors()[0]['msg']}") from None

    def _build_config(self, src: BootSource, cmdline: str, drives: list[Drive]) -> MachineConfig:
        mc = self.machine_config
        return MachineConfig.build(
            kernel=src.kernel_image_path,
            initrd=src.initrd_path,
            cmdline=cmdline,
            cpus=mc.vcpu_count,
            memory=mc.mem_size_mib * MIB,
            no_reboot=True,  # a guest reset ends the microVM, as in Firecracker
            disks=[
                DiskConfig(
                    path=Path(d.path_on_host or ""),
                    read_only=bool(d.is_read_only),
                    serial=d.drive_id[:20] if d.drive_id.isascii() else "",
                )
                for d in drives
            ],
            nets=[NetConfig(tap=n.host_dev_name, mac=n.guest_mac or "") for n in self.nets.values()],
            vsock=VsockConfig(cid=self.vsock.guest_cid, uds_path=Path(self.vsock.uds_path))
            if self.vsock
            else None,
            rng=self.entropy is not None,
            balloon=self.balloon is not None,
            ksm=self.corral_options.ksm,
        )

    def _console(self) -> Callable[[bytes], None] | None:
        """Where the serial console goes: the serial_out_path asked for, else stdout."""
        sink: Callable[[bytes], None] | None = None
        if self.serial is not None and self.serial.serial_out_path is not None:
            self._serial_file = open(self.serial.serial_out_path, "ab", buffering=0)
            sink = self._serial_file.write
        if not self.boot_timer:
            return sink
        t0 = time.monotonic()
        first = [True]

        def timed(data: bytes) -> None:
            if first[0]:
                first[0] = False
                us = int((time.monotonic() - t0) * 1e6)
                log.warning("Guest-boot-time = %d us %d ms (start to first serial byte)", us, us // 1000)
            if sink is not None:
                sink(data)
            else:
                os.write(1, data)

        return timed

    def _run(self, machine: Machine) -> None:
        try:
            machine.start()
        except CorralError as exc:
            machine.close()
            raise FirecrackerError(f"Start microvm error: {exc}") from None
        self.started = True
        self.machine = machine
        self._watch(machine)

    def _start(self, machine: Machine) -> None:
        machine.start()
        self.started = True

    def _watch(self, machine: Machine) -> None:
        def wait() -> None:
            # Started before the main thread filters itself (a --config-file boot): filter here.
            enter_seccomp("vmm", "corral-fc-wait")
            result = machine.wait()
            if self.gdb is not None:
                self.gdb.close()
            machine.close()
            self.exit_result = result
            self.exited.set()
            self.wake.set()

        threading.Thread(target=wait, name="corral-fc-wait", daemon=True).start()

    def stop(self) -> None:
        if self.machine is not None:
            self.machine.stop("stopped by the host")
        else:
            self.exited.set()
            self.wake.set()


def _mmds_address_ok(text: str) -> bool:
    """169.254.C.D with C in 1..254 (the spec's pattern for the MMDS address)."""
    try:
        a, b, c, _ = ipaddress.IPv4Address(text).packed
    except ValueError:
        return False
    return (a, b) == (169, 254) and 1 <= c <= 254


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch (what PATCH /mmds applies)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


__all__ = [
    "APP_NAME",
    "FIRECRACKER_API_VERSION",
    "FatalError",
    "FirecrackerError",
    "FirecrackerVmm",
    "merge_patch",
]
