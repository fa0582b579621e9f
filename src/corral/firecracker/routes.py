"""Firecracker's paths and methods onto the VMM, plus corral's own under /corral/: one route
table (ROUTES) that dispatches requests and that the OpenAPI document is generated from
(openapi.py). Each route names its request and reply models; the handler parses the body into
its model, calls the VMM and shapes the reply (204 / 200 with JSON / 400 with a fault message)
as Firecracker does.

Requests are served one at a time, as Firecracker's single API thread does, so a pause cannot
race a snapshot; a migration streams its progress outside that lock (it holds the machine's own
exclusive section where it must), so the VM can be asked its status or stopped meanwhile. Paths
of Firecracker's spec that corral does not implement yet answer 400 saying so; any other path
answers Firecracker's "Invalid request method and/or path".

corral's endpoints (never a change to Firecracker's): GET /corral/status, PUT /corral/stop,
PUT /corral/snapshot (a corral snapshot directory), GET|PATCH /corral/balloon, PUT
/corral/migrate (JSON lines: progress, then the result), GET /corral/openapi.json, PUT
/corral/dump (an ELF core of the guest), GET|PATCH /corral/stats (exit statistics), PUT
/corral/receive (wait for a live migration, into a fresh VM), PUT /corral/gdb (a gdb stub) and
PUT /corral/wake (wake a guest suspended to RAM, ACPI S3).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from corral.debug import GdbAddress, GdbStub
from corral.debug.dump import DumpStats, dump_core
from corral.debug.stats import ExitStats, exit_stats
from corral.devices.virtio.balloon import BalloonInfo
from corral.errors import CorralError
from corral.firecracker import models as m
from corral.firecracker.openapi import document
from corral.firecracker.server import Emit, Reply
from corral.firecracker.vmm import (
    FIRECRACKER_API_VERSION,
    POST_BOOT_ONLY,
    FatalError,
    FirecrackerError,
    FirecrackerVmm,
)
from corral.machine import Machine, MachineStatus
from corral.migration import migrate
from corral.state.snapshot import SnapshotStats

log = logging.getLogger(__name__)

B = TypeVar("B", bound=BaseModel)

MISSING_MEM = "missing field: either `mem_backend` or `mem_file_path` is required"
TOO_MANY_MEM = "too many fields: either `mem_backend` or `mem_file_path` exclusively is required"
# Paths of Firecracker's spec that corral does not serve yet (first segment, method).
NOT_IMPLEMENTED = {
    ("PUT", "cpu-config"),
    ("PUT", "pmem"),
    ("PATCH", "pmem"),
    ("GET", "hotplug"),
    ("PUT", "hotplug"),
    ("PATCH", "hotplug"),
    ("DELETE", "drives"),
    ("DELETE", "network-interfaces"),
    ("DELETE", "pmem"),
}
STOPPED_HERE = "stopped through the control socket"

Params = dict[str, str]
Handler = Callable[["Router", Params, bytes], Reply]
JSON: Literal["json"] = "json"  # a body or reply that is any JSON value (MMDS)


@dataclass(frozen=True)
class Route:
    """One method + path template ("/drives/{drive_id}": a segment in braces is an id)."""

    method: str
    path: str
    summary: str
    handler: Handler
    body: type[BaseModel] | Literal["json"] | None = None  # the request body (None: none)
    reply: type[BaseModel] | Literal["json"] | None = None  # a 200's body (None: 204)
    stream: type[BaseModel] | None = None  # a 200 of JSON lines, each one of these
    tag: Literal["firecracker", "corral"] = "firecracker"

    @property
    def segments(self) -> list[str]:
        return self.path.strip("/").split("/") if self.path.strip("/") else []


def fault(message: str, status: int = 400) -> Reply:
    return Reply(status, {"fault_message": message})


class Router:
    """Serves Firecracker's API (and corral's) for one FirecrackerVmm."""

    def __init__(self, vmm: FirecrackerVmm) -> None:
        self.vmm = vmm
        self._lock = threading.Lock()
        self._deprecated = False  # the request used a deprecated field: say so, whatever the outcome

    def handle(self, method: str, target: str, body: bytes | None) -> Reply:
        """Answer one request; never raises for anything the client sent."""
        with self._lock:
            self._deprecated = False
            reply = self._answer(lambda: self._route(method, target.split("?", 1)[0], body))
            if self._deprecated:
                reply.headers["Deprecation"] = "true"
            return reply

    @staticmethod
    def _answer(serve: Callable[[], Reply]) -> Reply:
        try:
            return serve()
        except FatalError as exc:
            log.error("%s", exc)
            return Reply(400, {"fault_message": str(exc)}, fatal=True)
        except FirecrackerError as exc:
            return fault(str(exc), exc.status)
        except CorralError as exc:
            return fault(str(exc))

    def _deprecate(self, used: bool) -> None:
        self._deprecated = self._deprecated or used

    def _route(self, method: str, path: str, body: bytes | None) -> Reply:
        tokens = path.strip("/").split("/") if path.strip("/") else []
        top = tokens[0] if tokens else ""
        rest = tokens[1:]
        if (method, top) in NOT_IMPLEMENTED or (top == "balloon" and rest[:1] == ["hinting"]):
            return fault(f"corral does not implement {method} {path} of Firecracker's API yet")
        if body is not None and method == "GET":
            return fault("GET request cannot have a body.")
        route, params = match(method, tokens, path)
        if body is None and route.body is not None:
            return fault(f"Empty {method} request.")
        return route.handler(self, params, body or b"")

    def _machine(self) -> Machine:
        if self.vmm.machine is None:
            raise FirecrackerError(POST_BOOT_ONLY)
        return self.vmm.machine

    # -- reads ------------------------------------------------------------------------------------
    def _get_root(self, p: Params, body: bytes) -> Reply:
        return ok(self.vmm.instance_info())

    def _get_version(self, p: Params, body: bytes) -> Reply:
        return Reply(200, {"firecracker_version": FIRECRACKER_API_VERSION})

    def _get_vm_config(self, p: Params, body: bytes) -> Reply:
        return ok(self.vmm.full_config())

    def _get_machine_config(self, p: Params, body: bytes) -> Reply:
        return ok(self.vmm.machine_config)

    def _get_balloon(self, p: Params, body: bytes) -> Reply:
        return ok(self.vmm.get_balloon())

    def _get_balloon_stats(self, p: Params, body: bytes) -> Reply:
        return ok(self.vmm.balloon_stats())

    def _get_mmds(self, p: Params, body: bytes) -> Reply:
        return Reply(200, self.vmm.get_mmds())

    # -- pre-boot resources -----------------------------------------------------------------------
    def _put_machine_config(self, p: Params, body: bytes) -> Reply:
        cfg = parse(m.MachineConfiguration, body)
        self._deprecate(cfg.cpu_template is not None)
        self.vmm.put_machine_config(cfg)
        return no_content()

    def _patch_machine_config(self, p: Params, body: bytes) -> Reply:
        upd = parse(m.MachineConfigurationUpdate, body)
        self._deprecate(upd.cpu_template is not None)
        self.vmm.patch_machine_config(upd)
        return no_content()

    def _put_boot_source(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_boot_source(parse(m.BootSource, body))
        return no_content()

    def _put_drive(self, p: Params, body: bytes) -> Reply:
        drive = parse(m.Drive, body)
        same_id(p["drive_id"], drive.drive_id)
        self.vmm.put_drive(drive)
        return no_content()

    def _patch_drive(self, p: Params, body: bytes) -> Reply:
        upd = parse(m.PartialDrive, body)
        same_id(p["drive_id"], upd.drive_id)
        self.vmm.patch_drive(upd)
        return no_content()

    def _put_net(self, p: Params, body: bytes) -> Reply:
        iface = parse(m.NetworkInterface, body)
        same_id(p["iface_id"], iface.iface_id)
        self.vmm.put_net(iface)
        return no_content()

    def _patch_net(self, p: Params, body: bytes) -> Reply:
        upd = parse(m.PartialNetworkInterface, body)
        same_id(p["iface_id"], upd.iface_id)
        self.vmm.patch_net(upd)
        return no_content()

    def _put_vsock(self, p: Params, body: bytes) -> Reply:
        vsock = parse(m.Vsock, body)
        self._deprecate(vsock.vsock_id is not None)
        self.vmm.put_vsock(vsock)
        return no_content()

    def _put_entropy(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_entropy(parse(m.EntropyDevice, body))
        return no_content()

    def _put_balloon(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_balloon(parse(m.Balloon, body))
        return no_content()

    def _patch_balloon(self, p: Params, body: bytes) -> Reply:
        self.vmm.patch_balloon(parse(m.BalloonUpdate, body))
        return no_content()

    def _patch_balloon_stats(self, p: Params, body: bytes) -> Reply:
        self.vmm.patch_balloon_stats(parse(m.BalloonStatsUpdate, body))
        return no_content()

    def _put_logger(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_logger(parse(m.Logger, body))
        return no_content()

    def _put_metrics(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_metrics(parse(m.Metrics, body))
        return no_content()

    def _put_serial(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_serial(parse(m.SerialDevice, body))
        return no_content()

    def _put_mmds_config(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_mmds_config(parse(m.MmdsConfig, body))
        return no_content()

    def _put_mmds(self, p: Params, body: bytes) -> Reply:
        self.vmm.put_mmds(parse_json(body))
        return no_content()

    def _patch_mmds(self, p: Params, body: bytes) -> Reply:
        self.vmm.patch_mmds(parse_json(body))
        return no_content()

    # -- actions, state, snapshots ----------------------------------------------------------------
    def _put_actions(self, p: Params, body: bytes) -> Reply:
        action = parse(m.InstanceActionInfo, body).action_type
        if action == "InstanceStart":
            self.vmm.instance_start()
        elif action == "SendCtrlAltDel":
            self.vmm.send_ctrl_alt_del()
        else:
            self.vmm.flush_metrics()
        return no_content()

    def _patch_vm(self, p: Params, body: bytes) -> Reply:
        if parse(m.Vm, body).state == "Paused":
            self.vmm.pause()
        else:
            self.vmm.resume()
        return no_content()

    def _put_snapshot_create(self, p: Params, body: bytes) -> Reply:
        self.vmm.create_snapshot(parse(m.SnapshotCreateParams, body))
        return no_content()

    def _put_snapshot_load(self, p: Params, body: bytes) -> Reply:
        params = parse(m.SnapshotLoadParams, body)
        self._deprecate(params.mem_file_path is not None or params.enable_diff_snapshots)
        if params.mem_backend is not None and params.mem_file_path is not None:
            return fault(deserialize_error(TOO_MANY_MEM))
        if params.mem_backend is None and params.mem_file_path is None:
            return fault(deserialize_error(MISSING_MEM))
        if params.mem_backend is not None and params.mem_backend.backend_type != "File":
            return fault(
                "Load snapshot error: corral loads guest memory from a file only: give "
                "mem_backend.backend_type File"
            )
        mem = params.mem_backend.backend_path if params.mem_backend else params.mem_file_path
        assert mem is not None
        self.vmm.load_snapshot(params, mem)
        return no_content()

    # -- corral's own -----------------------------------------------------------------------------
    def _corral_status(self, p: Params, body: bytes) -> Reply:
        machine = self._machine()
        status = machine.status()
        if not self.vmm.started:  # loaded, not yet resumed: its vCPUs wait
            status = status.model_copy(update={"state": "paused"})
        return ok(status)

    def _corral_stop(self, p: Params, body: bytes) -> Reply:
        self._machine().stop(STOPPED_HERE)
        return no_content()

    def _corral_wake(self, p: Params, body: bytes) -> Reply:
        self._machine().wake()
        return no_content()

    def _corral_snapshot(self, p: Params, body: bytes) -> Reply:
        req = parse(m.CorralSnapshot, body)
        machine = self._machine()
        if not self.vmm.started:
            raise FirecrackerError(
                "this VM was loaded from a snapshot and has not run since: resume it first"
            )
        return ok(machine.snapshot(req.path))

    def _corral_get_balloon(self, p: Params, body: bytes) -> Reply:
        return ok(self._machine().balloon_info())

    def _corral_patch_balloon(self, p: Params, body: bytes) -> Reply:
        req = parse(m.CorralBalloon, body)
        machine = self._machine()
        machine.set_balloon(req.target)
        return ok(machine.balloon_info())

    def _corral_migrate(self, p: Params, body: bytes) -> Reply:
        req = parse(m.CorralMigrate, body)
        machine = self._machine()
        if not self.vmm.started:
            raise FirecrackerError(
                "this VM was loaded from a snapshot and has not run since: resume it first"
            )

        def run(emit: Emit) -> None:
            def progress(r: int, sent: int, dirty: int) -> None:
                emit({"progress": m.MigrationProgress(round=r, sent=sent, dirty=dirty).model_dump()})

            try:
                stats = migrate(
                    machine,
                    req.to,
                    token=req.token,
                    tls_pin=req.tls_pin,
                    insecure=req.insecure,
                    downtime_limit=req.downtime_ms / 1000,
                    progress=progress,
                )
            except CorralError as exc:
                emit({"fault_message": str(exc)})
                return
            emit({"result": stats.model_dump(mode="json")})

        return Reply(200, stream=run)

    def _corral_openapi(self, p: Params, body: bytes) -> Reply:
        return Reply(200, openapi())

    def _corral_dump(self, p: Params, body: bytes) -> Reply:
        req = parse(m.CorralDump, body)
        return ok(dump_core(self._machine(), req.path))

    def _corral_get_stats(self, p: Params, body: bytes) -> Reply:
        return ok(exit_stats(self._machine()))

    def _corral_patch_stats(self, p: Params, body: bytes) -> Reply:
        req = parse(m.CorralStats, body)
        machine = self._machine()
        machine.observe_exits(req.enabled)
        return ok(exit_stats(machine))

    def _corral_receive(self, p: Params, body: bytes) -> Reply:
        return ok(m.ReceiveInfo(address=self.vmm.receive(parse(m.CorralReceive, body))))

    def _corral_gdb(self, p: Params, body: bytes) -> Reply:
        req = parse(m.CorralGdb, body)
        machine = self._machine()
        if self.vmm.gdb is not None:
            raise FirecrackerError(f"a gdb stub already serves this VM on {self.vmm.gdb.where}")
        try:
            stub = GdbStub(machine, GdbAddress.parse(req.address))
        except CorralError as exc:
            raise FirecrackerError(f"gdb: {exc}") from None
        self.vmm.gdb = stub
        return ok(m.GdbInfo(address=stub.where))


def _r(
    method: str,
    path: str,
    summary: str,
    handler: Handler,
    body: type[BaseModel] | Literal["json"] | None = None,
    reply: type[BaseModel] | Literal["json"] | None = None,
    **kw: Any,
) -> Route:
    return Route(method, path, summary, handler, body, reply, **kw)


R = Router
ROUTES: list[Route] = [
    _r("GET", "/", "Returns general information about an instance.", R._get_root, reply=m.InstanceInfo),
    _r("GET", "/version", "Gets the Firecracker API version.", R._get_version, reply=m.FirecrackerVersion),
    _r("GET", "/vm/config", "Gets the full VM configuration.", R._get_vm_config, reply=m.FullVmConfiguration),
    _r("PUT", "/actions", "Creates a synchronous action.", R._put_actions, m.InstanceActionInfo),
    _r(
        "GET",
        "/machine-config",
        "Gets the machine configuration.",
        R._get_machine_config,
        reply=m.MachineConfiguration,
    ),
    _r(
        "PUT",
        "/machine-config",
        "Updates the machine configuration (pre-boot).",
        R._put_machine_config,
        m.MachineConfiguration,
    ),
    _r(
        "PATCH",
        "/machine-config",
        "Partially updates the machine configuration (pre-boot).",
        R._patch_machine_config,
        m.MachineConfigurationUpdate,
    ),
    _r(
        "PUT",
        "/boot-source",
        "Creates or updates the boot source (pre-boot).",
        R._put_boot_source,
        m.BootSource,
    ),
    _r("PUT", "/drives/{drive_id}", "Creates or updates a drive (pre-boot).", R._put_drive, m.Drive),
    _r(
        "PATCH",
        "/drives/{drive_id}",
        "Updates a drive's properties (post-boot).",
        R._patch_drive,
        m.PartialDrive,
    ),
    _r(
        "PUT",
        "/network-interfaces/{iface_id}",
        "Creates a network interface (pre-boot).",
        R._put_net,
        m.NetworkInterface,
    ),
    _r(
        "PATCH",
        "/network-interfaces/{iface_id}",
        "Updates a network interface's rate limiters (post-boot).",
        R._patch_net,
        m.PartialNetworkInterface,
    ),
    _r("PUT", "/vsock", "Creates or updates the vsock device (pre-boot).", R._put_vsock, m.Vsock),
    _r("PUT", "/entropy", "Creates an entropy device (pre-boot).", R._put_entropy, m.EntropyDevice),
    _r("GET", "/balloon", "Returns the balloon device configuration.", R._get_balloon, reply=m.Balloon),
    _r("PUT", "/balloon", "Creates or updates a balloon device (pre-boot).", R._put_balloon, m.Balloon),
    _r("PATCH", "/balloon", "Updates the balloon's target size.", R._patch_balloon, m.BalloonUpdate),
    _r(
        "GET",
        "/balloon/statistics",
        "Returns the latest balloon statistics.",
        R._get_balloon_stats,
        reply=m.BalloonStats,
    ),
    _r(
        "PATCH",
        "/balloon/statistics",
        "Updates the balloon statistics polling interval.",
        R._patch_balloon_stats,
        m.BalloonStatsUpdate,
    ),
    _r("PUT", "/logger", "Initializes the logger (pre-boot).", R._put_logger, m.Logger),
    _r("PUT", "/metrics", "Initializes the metrics system (pre-boot).", R._put_metrics, m.Metrics),
    _r("PUT", "/serial", "Configures the serial console (pre-boot).", R._put_serial, m.SerialDevice),
    _r("PUT", "/mmds/config", "Sets the MMDS configuration (pre-boot).", R._put_mmds_config, m.MmdsConfig),
    _r("GET", "/mmds", "Gets the MMDS data store.", R._get_mmds, reply=JSON),
    _r("PUT", "/mmds", "Creates the MMDS data store.", R._put_mmds, JSON),
    _r("PATCH", "/mmds", "Updates the MMDS data store (RFC 7396 merge patch).", R._patch_mmds, JSON),
    _r("PATCH", "/vm", "Pauses or resumes the microVM.", R._patch_vm, m.Vm),
    _r(
        "PUT",
        "/snapshot/create",
        "Creates a Full or Diff snapshot (post-boot).",
        R._put_snapshot_create,
        m.SnapshotCreateParams,
    ),
    _r("PUT", "/snapshot/load", "Loads a snapshot (pre-boot).", R._put_snapshot_load, m.SnapshotLoadParams),
    # corral's own, beside Firecracker's
    _r(
        "GET",
        "/corral/status",
        "Whether the VM runs, is paused or is suspended to RAM, and its size.",
        R._corral_status,
        reply=MachineStatus,
        tag="corral",
    ),
    _r("PUT", "/corral/stop", "Stops the VM (as if its power were cut).", R._corral_stop, tag="corral"),
    _r(
        "PUT",
        "/corral/wake",
        "Wakes a guest suspended to RAM (ACPI S3): vCPU 0 enters its FACS waking vector.",
        R._corral_wake,
        tag="corral",
    ),
    _r(
        "PUT",
        "/corral/snapshot",
        "Writes a corral snapshot directory (corral restore, corral clone); a running VM runs on.",
        R._corral_snapshot,
        m.CorralSnapshot,
        SnapshotStats,
        tag="corral",
    ),
    _r(
        "GET",
        "/corral/balloon",
        "The balloon, host memory behind guest RAM, and the guest's memory statistics.",
        R._corral_get_balloon,
        reply=BalloonInfo,
        tag="corral",
    ),
    _r(
        "PATCH",
        "/corral/balloon",
        "Sets the balloon's target in bytes and reports it.",
        R._corral_patch_balloon,
        m.CorralBalloon,
        BalloonInfo,
        tag="corral",
    ),
    _r(
        "PUT",
        "/corral/migrate",
        "Live-migrates the VM to `corral receive`; streams JSON lines: each round's progress, "
        "then the result or the fault.",
        R._corral_migrate,
        m.CorralMigrate,
        stream=m.MigrationEvent,
        tag="corral",
    ),
    _r(
        "GET",
        "/corral/openapi.json",
        "This API's OpenAPI 3 document.",
        R._corral_openapi,
        reply=JSON,
        tag="corral",
    ),
    _r(
        "PUT",
        "/corral/dump",
        "Writes an ELF core of the guest (gdb, crash) to a new file; a running VM runs on.",
        R._corral_dump,
        m.CorralDump,
        DumpStats,
        tag="corral",
    ),
    _r(
        "GET",
        "/corral/stats",
        "Exit statistics per vCPU: by reason, port, MMIO address and device, with the time spent.",
        R._corral_get_stats,
        reply=ExitStats,
        tag="corral",
    ),
    _r(
        "PATCH",
        "/corral/stats",
        "Starts or stops counting exits, and reports the statistics.",
        R._corral_patch_stats,
        m.CorralStats,
        ExitStats,
        tag="corral",
    ),
    _r(
        "PUT",
        "/corral/receive",
        "Waits for one live migration on a TCP port (pre-boot, into a fresh VM); the guest runs "
        "once it has arrived, and a failed migration ends the process.",
        R._corral_receive,
        m.CorralReceive,
        m.ReceiveInfo,
        tag="corral",
    ),
    _r(
        "PUT",
        "/corral/gdb",
        "Starts a GDB remote-protocol stub for the VM (gdb: target remote ADDRESS).",
        R._corral_gdb,
        m.CorralGdb,
        m.GdbInfo,
        tag="corral",
    ),
]


@functools.cache
def openapi() -> dict[str, Any]:
    """The OpenAPI 3 document of ROUTES (built once, on first use: it walks every model)."""
    return document(ROUTES, FIRECRACKER_API_VERSION)


def match(method: str, tokens: list[str], path: str) -> tuple[Route, Params]:
    """The route for `method` and the path's segments, with the ids it carries (checked before
    the body is read); Firecracker's fault when there is none."""
    near = False  # a route of this method under the same first segment takes an id
    for route in ROUTES:
        if route.method != method:
            continue
        segs = route.segments
        if segs[:1] == tokens[:1] and len(segs) == 2 and segs[1].startswith("{"):
            near = True
        if len(segs) != len(tokens):
            continue
        params: Params = {}
        for want, got in zip(segs, tokens, strict=True):
            if want.startswith("{"):
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            for name, value in params.items():
                try:
                    params[name] = m.check_id(value)
                except m.IdError as exc:
                    raise FirecrackerError(str(exc)) from None
            return route, params
    if near and len(tokens) == 1:
        raise FirecrackerError(m.EMPTY_ID)
    if method == "PUT" and tokens == ["snapshot"]:
        raise FirecrackerError("Missing snapshot operation type.")
    raise FirecrackerError(invalid_path(method, path).body["fault_message"])


# --- helpers -----------------------------------------------------------------------------------


def ok(model: BaseModel) -> Reply:
    return Reply(200, m.dump(model))


def no_content() -> Reply:
    return Reply(204)


def invalid_path(method: str, path: str) -> Reply:
    return fault(f"Invalid request method and/or path: {method} {path}.")


def deserialize_error(detail: str) -> str:
    return f"An error occurred when deserializing the json body of a request: {detail}."


def parse(model: type[B], body: bytes) -> B:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise FirecrackerError(m.body_error(exc, model)) from None


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # (nesting deeper than the parser goes)
        raise FirecrackerError(deserialize_error(f"the body is not JSON ({exc})")) from None


def same_id(from_path: str, from_body: str) -> None:
    if from_path != from_body:
        raise FirecrackerError("The id from the path does not match the id from the body!")


__all__ = ["ROUTES", "Route", "Router", "fault", "match", "openapi"]
