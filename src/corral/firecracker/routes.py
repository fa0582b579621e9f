"""Firecracker's paths and methods onto the VMM: parse the body into its model, call the VMM,
shape the reply (204 / 200 with JSON / 400 with a fault message) as Firecracker does.

Requests are served one at a time, as Firecracker's single API thread does, so a pause cannot
race a snapshot. Paths of the spec that corral does not implement yet answer 400 saying so;
any other path answers Firecracker's "Invalid request method and/or path".
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from corral.errors import CorralError
from corral.firecracker import models as m
from corral.firecracker.server import Reply
from corral.firecracker.vmm import FIRECRACKER_API_VERSION, FatalError, FirecrackerError, FirecrackerVmm

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


def fault(message: str, status: int = 400) -> Reply:
    return Reply(status, {"fault_message": message})


class Router:
    """Serves Firecracker's API for one FirecrackerVmm."""

    def __init__(self, vmm: FirecrackerVmm) -> None:
        self.vmm = vmm
        self._lock = threading.Lock()
        self._deprecated = False  # the request used a deprecated field: say so, whatever the outcome

    def handle(self, method: str, target: str, body: bytes | None) -> Reply:
        """Answer one request; never raises for anything the client sent."""
        with self._lock:
            self._deprecated = False
            try:
                reply = self._route(method, target.split("?", 1)[0], body)
            except FatalError as exc:
                log.error("%s", exc)
                reply = Reply(400, {"fault_message": str(exc)}, fatal=True)
            except FirecrackerError as exc:
                reply = fault(str(exc), exc.status)
            except CorralError as exc:
                reply = fault(str(exc))
            if self._deprecated:
                reply.headers["Deprecation"] = "true"
            return reply

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
        if body is None and method in ("PUT", "PATCH"):
            return fault(f"Empty {method} request.")
        handler = self._handlers().get((method, top))
        if handler is None:
            return invalid_path(method, path)
        return handler(rest, body or b"", path)

    def _handlers(self) -> dict[tuple[str, str], Callable[[list[str], bytes, str], Reply]]:
        return {
            ("GET", ""): self._get_root,
            ("GET", "version"): self._get_version,
            ("GET", "vm"): self._get_vm,
            ("GET", "machine-config"): self._get_machine_config,
            ("GET", "balloon"): self._get_balloon,
            ("GET", "mmds"): self._get_mmds,
            ("PUT", "actions"): self._put_actions,
            ("PUT", "balloon"): self._put_balloon,
            ("PUT", "boot-source"): self._put_boot_source,
            ("PUT", "drives"): self._put_drive,
            ("PUT", "logger"): self._put_logger,
            ("PUT", "serial"): self._put_serial,
            ("PUT", "machine-config"): self._put_machine_config,
            ("PUT", "metrics"): self._put_metrics,
            ("PUT", "mmds"): self._put_mmds,
            ("PUT", "network-interfaces"): self._put_net,
            ("PUT", "snapshot"): self._put_snapshot,
            ("PUT", "vsock"): self._put_vsock,
            ("PUT", "entropy"): self._put_entropy,
            ("PATCH", "balloon"): self._patch_balloon,
            ("PATCH", "drives"): self._patch_drive,
            ("PATCH", "machine-config"): self._patch_machine_config,
            ("PATCH", "mmds"): self._patch_mmds,
            ("PATCH", "network-interfaces"): self._patch_net,
            ("PATCH", "vm"): self._patch_vm,
        }

    # -- reads ------------------------------------------------------------------------------------
    def _get_root(self, rest: list[str], body: bytes, path: str) -> Reply:
        return ok(self.vmm.instance_info()) if not rest else invalid_path("GET", path)

    def _get_version(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("GET", path)
        return Reply(200, {"firecracker_version": FIRECRACKER_API_VERSION})

    def _get_vm(self, rest: list[str], body: bytes, path: str) -> Reply:
        return ok(self.vmm.full_config()) if rest == ["config"] else invalid_path("GET", path)

    def _get_machine_config(self, rest: list[str], body: bytes, path: str) -> Reply:
        return ok(self.vmm.machine_config) if not rest else invalid_path("GET", path)

    def _get_balloon(self, rest: list[str], body: bytes, path: str) -> Reply:
        if not rest:
            return ok(self.vmm.get_balloon())
        if rest == ["statistics"]:
            return ok(self.vmm.balloon_stats())
        return invalid_path("GET", path)

    def _get_mmds(self, rest: list[str], body: bytes, path: str) -> Reply:
        return Reply(200, self.vmm.get_mmds()) if not rest else invalid_path("GET", path)

    # -- pre-boot resources -----------------------------------------------------------------------
    def _put_machine_config(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        cfg = parse(m.MachineConfiguration, body)
        self._deprecate(cfg.cpu_template is not None)
        self.vmm.put_machine_config(cfg)
        return no_content()

    def _patch_machine_config(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PATCH", path)
        upd = parse(m.MachineConfigurationUpdate, body)
        self._deprecate(upd.cpu_template is not None)
        self.vmm.patch_machine_config(upd)
        return no_content()

    def _put_boot_source(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        self.vmm.put_boot_source(parse(m.BootSource, body))
        return no_content()

    def _put_drive(self, rest: list[str], body: bytes, path: str) -> Reply:
        pid = path_id(rest, path, "PUT")
        drive = parse(m.Drive, body)
        same_id(pid, drive.drive_id)
        self.vmm.put_drive(drive)
        return no_content()

    def _patch_drive(self, rest: list[str], body: bytes, path: str) -> Reply:
        pid = path_id(rest, path, "PATCH")
        upd = parse(m.PartialDrive, body)
        same_id(pid, upd.drive_id)
        self.vmm.patch_drive(upd)
        return no_content()

    def _put_net(self, rest: list[str], body: bytes, path: str) -> Reply:
        pid = path_id(rest, path, "PUT")
        iface = parse(m.NetworkInterface, body)
        same_id(pid, iface.iface_id)
        self.vmm.put_net(iface)
        return no_content()

    def _patch_net(self, rest: list[str], body: bytes, path: str) -> Reply:
        pid = path_id(rest, path, "PATCH")
        upd = parse(m.PartialNetworkInterface, body)
        same_id(pid, upd.iface_id)
        self.vmm.patch_net(upd)
        return no_content()

    def _put_vsock(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        vsock = parse(m.Vsock, body)
        self._deprecate(vsock.vsock_id is not None)
        self.vmm.put_vsock(vsock)
        return no_content()

    def _put_entropy(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        self.vmm.put_entropy(parse(m.EntropyDevice, body))
        return no_content()

    def _put_balloon(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        self.vmm.put_balloon(parse(m.Balloon, body))
        return no_content()

    def _patch_balloon(self, rest: list[str], body: bytes, path: str) -> Reply:
        if not rest:
            self.vmm.patch_balloon(parse(m.BalloonUpdate, body))
        elif rest == ["statistics"]:
            self.vmm.patch_balloon_stats(parse(m.BalloonStatsUpdate, body))
        else:
            return invalid_path("PATCH", path)
        return no_content()

    def _put_logger(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        self.vmm.put_logger(parse(m.Logger, body))
        return no_content()

    def _put_metrics(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        self.vmm.put_metrics(parse(m.Metrics, body))
        return no_content()

    def _put_serial(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        self.vmm.put_serial(parse(m.SerialDevice, body))
        return no_content()

    def _put_mmds(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest == ["config"]:
            self.vmm.put_mmds_config(parse(m.MmdsConfig, body))
        elif not rest:
            self.vmm.put_mmds(parse_json(body))
        else:
            return invalid_path("PUT", path)
        return no_content()

    def _patch_mmds(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PATCH", path)
        self.vmm.patch_mmds(parse_json(body))
        return no_content()

    # -- actions, state, snapshots ----------------------------------------------------------------
    def _put_actions(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PUT", path)
        action = parse(m.InstanceActionInfo, body).action_type
        if action == "InstanceStart":
            self.vmm.instance_start()
        elif action == "SendCtrlAltDel":
            self.vmm.send_ctrl_alt_del()
        else:
            self.vmm.flush_metrics()
        return no_content()

    def _patch_vm(self, rest: list[str], body: bytes, path: str) -> Reply:
        if rest:
            return invalid_path("PATCH", path)
        if parse(m.Vm, body).state == "Paused":
            self.vmm.pause()
        else:
            self.vmm.resume()
        return no_content()

    def _put_snapshot(self, rest: list[str], body: bytes, path: str) -> Reply:
        if not rest:
            return fault("Missing snapshot operation type.")
        if rest == ["create"]:
            self.vmm.create_snapshot(parse(m.SnapshotCreateParams, body))
            return no_content()
        if rest != ["load"]:
            return invalid_path("PUT", path)
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


def path_id(rest: list[str], path: str, method: str) -> str:
    """The id in /drives/{id} (or /network-interfaces/{id}), checked before the body is read."""
    if not rest or not rest[0]:
        raise FirecrackerError(m.EMPTY_ID)
    if len(rest) > 1:
        raise FirecrackerError(f"Invalid request method and/or path: {method} {path}.")
    try:
        return m.check_id(rest[0])
    except m.IdError as exc:
        raise FirecrackerError(str(exc)) from None


def same_id(from_path: str, from_body: str) -> None:
    if from_path != from_body:
        raise FirecrackerError("The id from the path does not match the id from the body!")


__all__ = ["Router", "fault"]
