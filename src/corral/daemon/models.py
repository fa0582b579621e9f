"""The daemon's request and reply bodies: unknown fields refused, sizes bounded.

A VM is created from a whole Firecracker config (the JSON `corral firecracker --config-file`
takes) or from a snapshot directory the daemon wrote (a clone), with optional cgroup limits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.daemon.cgroups import LimitReport, Limits
from corral.daemon.statedir import VM_ID_RE
from corral.firecracker.models import CorralOptions, FullVmConfiguration, NetworkOverride, VsockOverride

VmId = Annotated[str, Field(pattern=f"^{VM_ID_RE.pattern}$")]
HostPath = Annotated[str, Field(min_length=1, max_length=4096)]
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
    source: Literal["config", "snapshot"]
    snapshot: str | None = None
    limits: Limits = Limits()
    cgroups: LimitReport = LimitReport()
    taps: list[str] = []  # taps the VM's config named that did not exist before it: removed with it
    vcpus: int | None = None
    mem_mib: int | None = None
    jail: JailInfo | None = None  # None: the VM runs unjailed (--no-jail, or a daemon not root)


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
    dir: str = ""


class SnapshotVm(Strict):
    """POST /vms/ID/snapshot: the directory to write (created; must not exist)."""

    path: HostPath


class SnapshotInfo(Strict):
    path: str
    snapshot_file: str
    mem_file: str


class DaemonInfo(Strict):
    app: str = "corral"
    version: str
    state_dir: str
    vms: int
    jail: bool = False  # whether new VMs are jailed


__all__ = [
    "CreateVm",
    "DaemonInfo",
    "JailInfo",
    "SnapshotInfo",
    "SnapshotVm",
    "VmInfo",
    "VmRecord",
    "VmState",
]
