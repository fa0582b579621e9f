"""The daemon's request and reply bodies: unknown fields refused, sizes bounded.

A VM is created from a whole Firecracker config (the JSON `corral firecracker --config-file`
takes) or from a snapshot directory the daemon wrote (a clone), with optional cgroup limits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.config import HostResources
from corral.daemon.cgroups import LimitReport, Limits
from corral.daemon.statedir import VM_ID_RE
from corral.firecracker.models import CorralOptions, FullVmConfiguration, NetworkOverride, VsockOverride
from corral.migration import MigrationStats

VmId = Annotated[str, Field(pattern=f"^{VM_ID_RE.pattern}$")]
HostPath = Annotated[str, Field(min_length=1, max_length=4096)]
Token = Annotated[str, Field(min_length=16, max_length=4096)]
GdbWhere = Annotated[str, Field(min_length=5, max_length=4096)]  # tcp:[HOST:]PORT or unix:PATH
VmState = Literal["starting", "not-started", "running", "paused", "unresponsive", "stopped", "dead"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateVm(Strict):
    """POST /vms. `config` or `snapshot`, not both; `id` chosen by the daemon when not given."""

    id: VmId | None = None
    config: FullVmConfiguration | None = None
    snapshot: HostPath | None = None
    resume: bool = True  # a clone runs at once (else it waits paused)
    # a clone's host sides, as Firecracker's /snapshot/load takes them (a tap per interface)
    network_overrides: Annotated[list[NetworkOverride], Field(max_length=64)] = []
    vsock_override: VsockOverride | None = None
    limits: Limits = Limits()
    gdb: GdbWhere | None = None  # serve the GDB remote protocol here once the VM runs
    # corral's options for a VM from a config (they set the config's `corral` key; a clone has
    # what its snapshot's VM had)
    ksm: bool = False  # KSM may merge its guest RAM with other VMs' (the saving is in /metrics)
    exit_stats: bool = False  # count exits by reason, port and address from boot (in /metrics)

    @model_validator(mode="after")
    def _one_source(self) -> CreateVm:
        if (self.config is None) == (self.snapshot is None):
            raise ValueError("give either `config` (a Firecracker config) or `snapshot` (a directory)")
        if self.config is not None and (self.network_overrides or self.vsock_override):
            raise ValueError("`network_overrides` and `vsock_override` are for a clone (`snapshot`)")
        if self.snapshot is not None and (self.ksm or self.exit_stats):
            raise ValueError(
                "`ksm` and `exit_stats` are for a VM from a `config` (a clone keeps its snapshot's)"
            )
        return self

    def vm_config(self) -> FullVmConfiguration | None:
        """The config the VM boots from: `config`, with `ksm` and `exit_stats` in its `corral` key."""
        if self.config is None or not (self.ksm or self.exit_stats):
            return self.config
        opts = self.config.corral or CorralOptions()
        opts = opts.model_copy(
            update={"ksm": opts.ksm or self.ksm, "exit_stats": opts.exit_stats or self.exit_stats}
        )
        return self.config.model_copy(update={"corral": opts})


class JailInfo(Strict):
    """The jail a VM runs in (corral.jail): what `vm show` reports and `rm` undoes."""

    uid: int
    gid: int
    dir: str  # <state>/jail/corral/ID: root/ (the mount point of its root) and run/ (its sockets)
    root: str
    namespaces: list[str]
    cgroups: list[str] = []  # the cgroups the VM moved itself into before anything else
    setup_ms: float | None = None  # host side + the child's entering, until the VM's own code


class VmRecord(Strict):
    """vm.json: what the daemon knows of a VM beyond its process."""

    id: VmId
    created: float
    source: Literal["config", "snapshot", "migration"]
    snapshot: str | None = None
    limits: Limits = Limits()
    cgroups: LimitReport = LimitReport()
    taps: list[str] = []  # taps the VM's config named that did not exist before it: removed with it
    vcpus: int | None = None
    mem_mib: int | None = None
    jail: JailInfo | None = None  # None: the VM runs unjailed (--no-jail, or a daemon not root)
    gdb: str | None = None  # where its gdb stub listens (as seen by the host)


class VmInfo(Strict):
    """A VM as `corral vm show` reports it."""

    id: str
    state: VmState
    pid: int | None = None
    created: float | None = None
    source: str | None = None
    snapshot: str | None = None
    vcpus: int | None = None
    mem_mib: int | None = None
    exit: str | None = None  # how a stopped or dead VM ended, when known
    limits: Limits = Limits()
    cgroups: LimitReport = LimitReport()
    jail: JailInfo | None = None
    gdb: str | None = None
    dir: str = ""


class SnapshotVm(Strict):
    """POST /vms/ID/snapshot: the directory to write (created; must not exist)."""

    path: HostPath


class SnapshotInfo(Strict):
    path: str
    snapshot_file: str
    mem_file: str


class Incoming(Strict):
    """POST /incoming: a VM that waits for a live migration (what a source daemon asks of the
    target's). The guest's shape comes with the migration; its host side (disks, taps) is
    `host`, named by this daemon's client, never by the source's stream."""

    id: VmId | None = None
    host: HostResources = HostResources()
    limits: Limits = Limits()
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    vcpus: Annotated[int, Field(ge=1, le=1024)] | None = None  # for `vm ls` until it arrives
    mem_mib: Annotated[int, Field(ge=1, le=1 << 30)] | None = None


class IncomingInfo(Strict):
    """The reply to POST /incoming: the waiting VM, and what the source must send to."""

    vm: VmInfo
    address: str  # HOST:PORT the VM listens on (a wildcard host: use the daemon's own)
    token: str  # a fresh migration token for this one migration


class MigrateVm(Strict):
    """POST /vms/ID/migrate: live-migrate the VM to another daemon."""

    to: HostPath  # the target daemon: its Unix socket, or tcp:HOST:PORT
    token: Token | None = Field(default=None, repr=False)  # the target daemon's bearer token (TCP)
    id: VmId | None = None  # the VM's id there (default: the same)
    host: HostResources = HostResources()  # the target host's disks and taps for the guest
    limits: Limits = Limits()  # the VM's limits there
    downtime_ms: Annotated[int, Field(ge=1, le=60_000)] = 300


class MigrateResult(Strict):
    id: str  # the VM's id on the target
    to: str
    stats: MigrationStats
    target: VmInfo  # the VM as the target reports it (running)


class CloneVm(Strict):
    """POST /vms/ID/clone: a new VM from a snapshot of this one (which runs on)."""

    id: VmId | None = None
    resume: bool = True
    network_overrides: Annotated[list[NetworkOverride], Field(max_length=64)] = []
    vsock_override: VsockOverride | None = None
    limits: Limits = Limits()


class GdbVm(Strict):
    """POST /vms/ID/gdb: start the VM's gdb stub."""

    address: GdbWhere


class DaemonInfo(Strict):
    app: str = "corral"
    version: str
    state_dir: str
    vms: int
    jail: bool = False  # whether new VMs are jailed


__all__ = [
    "CloneVm",
    "CreateVm",
    "DaemonInfo",
    "GdbVm",
    "Incoming",
    "IncomingInfo",
    "JailInfo",
    "MigrateResult",
    "MigrateVm",
    "SnapshotInfo",
    "SnapshotVm",
    "VmInfo",
    "VmRecord",
    "VmState",
]
