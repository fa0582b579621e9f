"""Firecracker's API bodies as pydantic models, with Firecracker's field names.

Each model mirrors a definition of Firecracker's swagger spec (src/firecracker/swagger/
firecracker.yaml). Bodies are hostile: every model forbids unknown fields and is strict about
types (no "2" for 2, no 1 for true), as Firecracker's serde parsing is, and resource ids are
checked against Firecracker's rule (alphanumerics and underscores). `body_error` turns pydantic's
report into the one-line fault message a client reads.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)

from corral.config import HostResources, parse_size
from corral.errors import CorralError
from corral.migration import MigrationStats

U32 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF)]
U64 = Annotated[int, Field(ge=0, le=0xFFFF_FFFF_FFFF_FFFF)]
PATH_MAX = 4096
HostPath = Annotated[str, Field(max_length=PATH_MAX)]

EMPTY_ID = "The ID cannot be empty."
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."


class IdError(ValueError):
    """A resource id that breaks Firecracker's rule."""


def check_id(value: str) -> str:
    """Firecracker's rule for drive, interface (and other resource) ids."""
    if not value:
        raise IdError(EMPTY_ID)
    if not all(c == "_" or c.isalnum() for c in value):
        raise IdError(INVALID_ID)
    return value


ResourceId = Annotated[str, Field(max_length=256), AfterValidator(check_id)]


def check_instance_id(value: str) -> str:
    """The rule for `--id`: 1 to 64 characters, alphanumerics and hyphens."""
    if not 1 <= len(value) <= 64:
        raise IdError(f"Invalid len ({len(value)});  the length must be between 1 and 64")
    for i, c in enumerate(value):
        if not (c == "-" or c.isalnum()):
            raise IdError(f"Invalid char ({c}) at position {i}")
    return value


class Body(BaseModel):
    """A request or reply body: unknown fields refused, types strict."""

    model_config = ConfigDict(extra="forbid", strict=True)


# --- replies ---------------------------------------------------------------------------------


class InstanceInfo(Body):
    app_name: str
    id: str
    state: Literal["Not started", "Running", "Paused"]
    vmm_version: str


class FirecrackerVersion(Body):
    firecracker_version: str


class Error(Body):
    fault_message: str


class BalloonStats(Body):
    target_pages: int
    actual_pages: int
    target_mib: int
    actual_mib: int
    swap_in: int | None = None
    swap_out: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free_memory: int | None = None
    total_memory: int | None = None
    available_memory: int | None = None
    disk_caches: int | None = None
    hugetlb_allocations: int | None = None
    hugetlb_failures: int | None = None


# --- pre-boot resources ----------------------------------------------------------------------


class TokenBucket(Body):
    size: U64
    one_time_burst: U64 | None = None
    refill_time: U64


class RateLimiter(Body):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


CpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]
HugePages = Literal["None", "Transparent", "2M"]


class MachineConfiguration(Body):
    vcpu_count: U32
    mem_size_mib: U32
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: CpuTemplate | None = None
    huge_pages: HugePages = "None"


class MachineConfigurationUpdate(Body):
    """PATCH /machine-config: any subset of MachineConfiguration."""

    vcpu_count: U32 | None = None
    mem_size_mib: U32 | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: CpuTemplate | None = None
    huge_pages: HugePages | None = None


class BootSource(Body):
    kernel_image_path: HostPath
    boot_args: Annotated[str, Field(max_length=PATH_MAX)] | None = None
    initrd_path: HostPath | None = None


class Drive(Body):
    drive_id: ResourceId
    is_root_device: bool
    partuuid: Annotated[str, Field(max_length=64)] | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    is_read_only: bool | None = None
    path_on_host: HostPath | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] = "Sync"
    socket: HostPath | None = None


class PartialDrive(Body):
    drive_id: ResourceId
    path_on_host: HostPath | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(Body):
    iface_id: ResourceId
    host_dev_name: Annotated[str, Field(max_length=64)]
    guest_mac: Annotated[str, Field(max_length=64)] | None = None
    mtu: Annotated[int, Field(ge=68, le=65535)] | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class PartialNetworkInterface(Body):
    iface_id: ResourceId
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(Body):
    guest_cid: Annotated[int, Field(ge=3, le=0xFFFF_FFFF)]
    uds_path: HostPath
    vsock_id: Annotated[str, Field(max_length=256)] | None = None  # deprecated


class EntropyDevice(Body):
    rate_limiter: RateLimiter | None = None


class Balloon(Body):
    amount_mib: U32
    deflate_on_oom: bool
    stats_polling_interval_s: Annotated[int, Field(ge=0, le=0xFFFF)] = 0
    free_page_hinting: bool = False
    free_page_reporting: bool = False


class BalloonUpdate(Body):
    amount_mib: U32


class BalloonStatsUpdate(Body):
    stats_polling_interval_s: Annotated[int, Field(ge=0, le=0xFFFF)]


class Logger(Body):
    level: Annotated[str, Field(max_length=16)] | None = None
    log_path: HostPath | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: Annotated[str, Field(max_length=256)] | None = None


class Metrics(Body):
    metrics_path: HostPath
    emit_id: bool = False
    properties: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=4096)]] | None = (
        None
    )


class SerialDevice(Body):
    serial_out_path: HostPath | None = None
    rate_limiter: TokenBucket | None = None


class MmdsConfig(Body):
    version: Literal["V1", "V2"] = "V1"
    network_interfaces: Annotated[list[ResourceId], Field(max_length=64)]
    ipv4_address: Annotated[str, Field(max_length=15)] | None = None
    imds_compat: bool = False


# --- actions and state -----------------------------------------------------------------------


class InstanceActionInfo(Body):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Vm(Body):
    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(Body):
    mem_file_path: HostPath
    snapshot_path: HostPath
    snapshot_type: Literal["Full", "Diff"] = "Full"


class MemoryBackend(Body):
    backend_type: Literal["File", "Uffd"]
    backend_path: HostPath


class NetworkOverride(Body):
    iface_id: ResourceId
    host_dev_name: Annotated[str, Field(max_length=64)]


class VsockOverride(Body):
    uds_path: HostPath


class SnapshotLoadParams(Body):
    snapshot_path: HostPath
    mem_file_path: HostPath | None = None  # deprecated: mem_backend
    mem_backend: MemoryBackend | None = None
    enable_diff_snapshots: bool = False  # deprecated: track_dirty_pages
    track_dirty_pages: bool = False
    resume_vm: bool = False
    network_overrides: Annotated[list[NetworkOverride], Field(max_length=64)] = []
    vsock_override: VsockOverride | None = None
    clock_realtime: bool = False
    huge_pages: Literal["Snapshot", "None", "Transparent", "2M"] | None = None


# --- corral's own endpoints (/corral/...), beside Firecracker's -------------------------------


class CorralSnapshot(Body):
    """PUT /corral/snapshot: a corral snapshot directory (what `corral restore` reads)."""

    path: Annotated[str, Field(min_length=1, max_length=PATH_MAX)] = Field(
        description="a new directory to write the snapshot to"
    )


class CorralDump(Body):
    """PUT /corral/dump: an ELF core of the guest (gdb, crash), written to a new file."""

    path: Annotated[str, Field(min_length=1, max_length=PATH_MAX)] = Field(
        description="a new file to write the core to"
    )


class CorralStats(Body):
    """PATCH /corral/stats: start or stop counting exits (the counts so far are kept)."""

    enabled: bool = Field(description="count every vCPU exit by reason, port and address, timed")


class CorralOptions(Body):
    """The `corral` key of a full config (`--config-file`, the daemon's create body): corral's
    own options, beside Firecracker's keys and never changing them. Firecracker has no such key,
    so a config without it is Firecracker's exactly."""

    ksm: bool = Field(
        default=False,
        description="offer guest RAM to the host's KSM (MADV_MERGEABLE): identical pages of "
        "VMs are merged; what was merged shows in GET /corral/stats",
    )
    exit_stats: bool = Field(
        default=False, description="count exits by reason, port and address from boot on (GET /corral/stats)"
    )


def _size(value: Any) -> int:
    """Bytes as a number, or a size with a unit ("256M", "1G")."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and len(value) <= 32:
        try:
            return parse_size(value)
        except CorralError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError("give a number of bytes (>= 0) or a size such as 256M or 1G")


Size = Annotated[
    int,
    PlainValidator(_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 32}]}),
]


class CorralBalloon(Body):
    """PATCH /corral/balloon: the balloon's target, in bytes or with a unit (256M, 1G)."""

    target: Size = Field(description="bytes (or 256M, 1G) the guest gives back; 0 takes it all back")


class CorralMigrate(Body):
    """PUT /corral/migrate: live-migrate the VM to `corral receive` at `to`."""

    to: Annotated[str, Field(min_length=1, max_length=300)] = Field(
        description="HOST:PORT where `corral receive` listens"
    )
    downtime_ms: Annotated[int, Field(ge=1, le=60_000)] = 300
    token: Annotated[str, Field(min_length=16, max_length=4096)] | None = Field(
        default=None, repr=False, description="the receiver's shared token"
    )
    tls_pin: Annotated[str, Field(max_length=200)] | None = Field(
        default=None, description="SHA-256 of the receiver's TLS certificate"
    )
    insecure: bool = Field(default=False, description="send to a receiver that checks no token")


class MigrationProgress(Body):
    """One pre-copy round of a migration in flight."""

    round: int
    sent: int = Field(description="bytes sent so far")
    dirty: int = Field(description="bytes the guest dirtied meanwhile (still to send)")


class MigrationEvent(BaseModel):
    """One line of PUT /corral/migrate's streamed reply (JSON lines): a round's progress, then
    the result, or the fault that ended the migration (the VM then runs on here)."""

    progress: MigrationProgress | None = None
    result: MigrationStats | None = None
    fault_message: str | None = None


class CorralReceive(Body):
    """PUT /corral/receive (pre-boot): wait for one live migration (`corral migrate`, or a
    daemon's /vms/ID/migrate) on `listen`; the VM runs when it has arrived."""

    listen: Annotated[str, Field(min_length=1, max_length=300)] = Field(
        default="127.0.0.1:0", description="[HOST:]PORT to listen on (port 0: one the host picks)"
    )
    token: Annotated[str, Field(min_length=16, max_length=4096)] = Field(
        repr=False, description="the shared token the source must prove"
    )
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0, description="give up (and end the process) when no source has proven itself by then"
    )
    host: HostResources = Field(
        default_factory=HostResources,
        description="the host side of the guest's devices (disks, taps, vsock): never the source's",
    )


class ReceiveInfo(Body):
    """The reply to PUT /corral/receive: where the source sends the guest."""

    address: str = Field(description="HOST:PORT listened on")


class CorralGdb(Body):
    """PUT /corral/gdb: serve the GDB remote protocol for this VM (one stub per VM)."""

    address: Annotated[str, Field(min_length=5, max_length=PATH_MAX)] = Field(
        description="tcp:[HOST:]PORT (HOST defaults to 127.0.0.1; port 0: one the host picks) or unix:PATH"
    )


class GdbInfo(Body):
    """Where the VM's gdb stub listens (`target remote` it)."""

    address: str = Field(description="tcp:HOST:PORT or unix:PATH")


# --- the whole configuration (GET /vm/config, --config-file) ----------------------------------


class FullVmConfiguration(BaseModel):
    """Every resource at once, under Firecracker's kebab-case keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    balloon: Balloon | None = None
    drives: Annotated[list[Drive], Field(max_length=64)] = []
    boot_source: BootSource | None = Field(default=None, alias="boot-source")
    logger: Logger | None = None
    machine_config: MachineConfiguration | None = Field(default=None, alias="machine-config")
    metrics: Metrics | None = None
    mmds_config: MmdsConfig | None = Field(default=None, alias="mmds-config")
    network_interfaces: Annotated[list[NetworkInterface], Field(max_length=64)] = Field(
        default=[], alias="network-interfaces"
    )
    vsock: Vsock | None = None
    entropy: EntropyDevice | None = None
    corral: CorralOptions | None = None  # corral's extension (see CorralOptions)


def dump(model: BaseModel) -> dict[str, Any]:
    """A reply body: Firecracker's keys, unset optional fields left out."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- errors ----------------------------------------------------------------------------------


def body_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """pydantic's first complaint about a body, as the fault message Firecracker gives for a
    body that does not deserialize."""
    errors = exc.errors(include_url=False)
    # an unknown field is the likelier mistake (a typo) and what serde reports first
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        detail = f"unknown field `{loc[-1]}`"
        if len(loc) == 1:
            names = [f.alias or n for n, f in model.model_fields.items()]
            detail += ", expected one of " + ", ".join(f"`{n}`" for n in names)
        elif len(loc) > 1:
            detail += f" in `{'.'.join(loc[:-1])}`"
    elif kind == "missing":
        detail = f"missing field `{where}`"
    elif kind == "json_invalid":
        detail = f"the body is not JSON ({err['msg'].removeprefix('Invalid JSON: ')})"
    elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        detail = "the body must be a JSON object"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if isinstance(err.get("ctx", {}).get("error"), IdError):
            return msg
        detail = f"invalid value for `{where}`: {msg}"
    return f"An error occurred when deserializing the json body of a request: {detail}."
