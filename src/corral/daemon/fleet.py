"""The daemon's VMs: each a `corral firecracker` process, driven through its own API socket.

The state directory is the truth: a VM is listed because its directory exists, and its state is
read from its process (alive, the same process by start time) and its API (running, paused).
A VM whose process has gone is `stopped` when a stop was asked for, else `dead`, with how it
ended when this daemon was its parent and saw it (exit.json), never dropped from the list.

Operations on one VM are serialized by a per-VM lock; operations on different VMs run at once.

Jailed VMs (`jail=True`, `corral serve`'s default as root): the daemon does the jail's host side
(corral.jail.Jail.prepare: a uid of its own, STATE/jail/corral/ID with root/ and run/, the VM's
files bound in at fixed paths) and the fork server's child enters the jail and runs the VM. The
VM's API socket is STATE/jail/corral/ID/run/api.sock, and STATE/vms/ID/api.sock a symlink to it;
the console is the fd the template opened. Paths the daemon sends to a jailed VM are inside its
jail: a snapshot is written into its run directory and then moved (checked: a regular file of
the VM's uid, one link) to the directory asked for; a clone gets the snapshot's files bound in
read-only. `rm` removes the jail's directory and gives back its uid.

Migration between daemons (`migrate`, on the source; `incoming`, on the target): the target
starts a VM process that waits for the guest (PUT /corral/receive, with a fresh token made for
this one migration and host resources its own client named), the source VM migrates itself there
(PUT /corral/migrate), and only once the target lists it running is the source removed. Until
the hand-over a failure leaves the source running and removes the waiting VM. A clone (`clone`)
is a snapshot kept in the clone's own directory (its memory stays mapped from there) and a
create from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from corral.config import HostResources
from corral.daemon.cgroups import CgroupError, Cgroups, LimitReport, VmGroup
from corral.daemon.launcher import JailingLauncher, Launcher, LaunchError
from corral.daemon.models import (
    CloneVm,
    CreateVm,
    Incoming,
    IncomingInfo,
    JailInfo,
    MigrateResult,
    MigrateVm,
    SnapshotInfo,
    VmInfo,
    VmRecord,
    VmState,
)
from corral.daemon.statedir import StateDir, VmDir, proc_start_time
from corral.daemon.vmapi import ApiError, HttpClient
from corral.errors import CorralError
from corral.firecracker.snapshot import _copy_data  # a sparse copy (a memory file is mostly holes)
from corral.jail import Jail, JailOptions, map_firecracker, release_uid
from corral.jail.mapping import RUN_DIR, map_snapshot_load
from corral.migration import MigrationStats

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for a new VM's API to answer
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
API_TIMEOUT = 5.0  # a VM's API that does not answer a state query in this is `unresponsive`
SNAPSHOT_TIMEOUT = 300.0
REAP_WAIT = 2.0  # seconds to wait for a child seen gone to be reapable
MAX_VMS = 4096
CONSOLE_TAIL = 1 << 20  # the console stream starts at most this far back
FILE_MAX = 64 << 20  # a console or log larger than this is cut down to its last FILE_KEEP bytes
FILE_KEEP = 1 << 20
SNAP_FILE, MEM_FILE = "vm.snap", "vm.mem"
MIGRATE_TIMEOUT = 600.0  # seconds a migration's stream may be silent (its last copy is one message)
ARRIVE_TIMEOUT = 30.0  # seconds for the target to report a migrated VM running
T = TypeVar("T")


class FleetError(CorralError):
    """A request the daemon refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NoSuchVm(FleetError):
    def __init__(self, vm_id: str) -> None:
        super().__init__(f"no VM with id {vm_id!r}: `corral vm ls` lists them", 404)


FC_STATE: dict[str, VmState] = {"Running": "running", "Paused": "paused", "Not started": "not-started"}


class Fleet:
    def __init__(
        self,
        state: StateDir,
        launcher: Launcher,
        cgroups: Cgroups | None = None,
        *,
        max_vms: int = MAX_VMS,
        start_timeout: float = START_TIMEOUT,
        jail: bool = False,
    ) -> None:
        if jail and not isinstance(launcher, JailingLauncher):
            raise FleetError("jailing VMs needs the fork server's launcher (drop --spawn, or give --no-jail)")
        self.state = state
        self.launcher = launcher
        self.jail = jail
        self.jail_base = state.root / "jail"  # jails live in STATE/jail/corral/ID
        self._jails: dict[str, Jail] = {}  # jails this daemon prepared (they hold their uid's lock)
        self.cgroups = cgroups
        self.max_vms = max_vms
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self._gone_since: dict[str, float] = {}  # launched VMs seen gone whose exit is not known yet
        self._vm_locks: dict[str, threading.Lock] = {}
        self._children: dict[str, int] = {}  # VMs whose process is this daemon's child
        self._creating = 0
        self.migration_host = "127.0.0.1"  # where a VM waiting for a migration listens

    # -- bookkeeping ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, vm_id: str) -> Iterator[VmDir]:
        d = self.state.vm(vm_id)
        with self._lock:
            lock = self._vm_locks.setdefault(vm_id, threading.Lock())
        with lock:
            if not d.path.is_dir():
                with self._lock:
                    if self._vm_locks.get(vm_id) is lock:
                        del self._vm_locks[vm_id]
                raise NoSuchVm(vm_id)
            yield d

    def _record(self, d: VmDir) -> VmRecord | None:
        raw = d.read(d.record)
        if raw is None:
            return None
        try:
            return VmRecord.model_validate_json(raw)
        except ValidationError:
            return None

    def reap(self) -> None:
        """Collect the exit status of child VM processes that ended (also keeps no zombies).
        One reaper at a time, so a caller that finds a VM gone finds its exit.json written."""
        with self._reap_lock:
            with self._lock:
                children = list(self._children.items())
            for vm_id, pid in children:
                code = self.launcher.exit_status(pid)
                if code is None:
                    if _running(pid):
                        continue
                    # Gone, but its reaper (the fork server) may not have told yet: wait a little
                    # before saying that how it ended is unknown.
                    first = self._gone_since.setdefault(vm_id, time.monotonic())
                    if time.monotonic() - first < REAP_WAIT:
                        continue
                    how = None
                else:
                    how = _describe_exit(code)
                d = self.state.vm(vm_id)
                if d.path.is_dir() and how is not None:
                    with contextlib.suppress(OSError):
                        d.write(d.exit_file, json.dumps({"how": how, "at": time.time()}))
                with self._lock:
                    self._children.pop(vm_id, None)
                self._gone_since.pop(vm_id, None)

    # -- queries ----------------------------------------------------------------------------------
    def ids(self) -> list[str]:
        return self.state.ids()

    def list(self) -> list[VmInfo]:
        self.reap()
        out = []
        for vm_id in self.ids():
            with contextlib.suppress(NoSuchVm):
                out.append(self.info(vm_id))
        return out

    def info(self, vm_id: str) -> VmInfo:
        d = self.state.vm(vm_id)
        if not d.path.is_dir():
            raise NoSuchVm(vm_id)
        pid = d.live_pid()
        self.reap()  # after the look at the process: one that just ended has its exit.json now
        deadline = time.monotonic() + REAP_WAIT
        while pid is None and vm_id in self._children and time.monotonic() < deadline:
            time.sleep(0.01)  # a killed leader shows as a zombie before its threads are all gone
            self.reap()
        rec = self._record(d)
        state, exit_info = self._state(d, pid, rec)
        base = VmInfo(id=vm_id, state=state, pid=pid, exit=exit_info, dir=str(d.path))
        if rec is None:
            return base
        return base.model_copy(
            update={
                "created": rec.created,
                "source": rec.source,
                "snapshot": rec.snapshot,
                "vcpus": rec.vcpus,
                "mem_mib": rec.mem_mib,
                "limits": rec.limits,
                "cgroups": rec.cgroups,
                "jail": rec.jail,
                "gdb": rec.gdb,
            }
        )

    def _state(self, d: VmDir, pid: int | None, rec: VmRecord | None) -> tuple[VmState, str | None]:
        if rec is None:
            if pid is None:
                return "dead", "its record (vm.json) is missing or unreadable"
            return "starting", None
        if pid is None:
            if d.recorded_pid()[0] is None and time.time() - rec.created < self.start_timeout:
                return "starting", None
            ended = d.read(d.exit_file)
            how = None
            if ended:
                with contextlib.suppress(ValueError, AttributeError):
                    how = str(json.loads(ended).get("how"))
            how = how or "exit status unknown: the process ended while this daemon was not its parent"
            return ("stopped" if d.stopped.exists() else "dead"), how
        if not d.api_sock.exists():
            return "starting", None
        try:
            reply = self._api(d, API_TIMEOUT).call("GET", "/")
        except ApiError as exc:
            return "unresponsive", str(exc)
        return FC_STATE.get(str(reply.get("state")) if isinstance(reply, dict) else "", "unresponsive"), None

    def _api(self, d: VmDir, timeout: float = 30.0) -> HttpClient:
        return HttpClient(str(d.api_sock), timeout=timeout)

    # -- create -----------------------------------------------------------------------------------
    def create(self, req: CreateVm) -> VmInfo:
        vm_id, _ = self._new(req.id, lambda d: self._create(d, req))
        return self.info(vm_id)

    def _new(self, vm_id: str | None, make: Callable[[VmDir], T]) -> tuple[str, T]:
        """A new VM directory and what `make` does with it, under the VM's lock; undone (the
        process ended, the directory removed) when `make` fails."""
        vm_id = vm_id or f"vm-{secrets.token_hex(4)}"
        with self._lock:
            if len(self.ids()) + self._creating >= self.max_vms:
                raise FleetError(f"this daemon holds {self.max_vms} VMs: remove some first")
            self._creating += 1
        try:
            d = self.state.new(vm_id)
            with self._lock:
                lock = self._vm_locks.setdefault(vm_id, threading.Lock())
            with lock:  # a delete of this id waits until the create is done or undone
                try:
                    out = make(d)
                except BaseException:
                    self._destroy(d, force=True)
                    raise
        finally:
            with self._lock:
                self._creating -= 1
        return vm_id, out

    def _create(self, d: VmDir, req: CreateVm, incoming: tuple[Incoming, str] | None = None) -> str | None:
        """Launch the VM; with `incoming` (the request and a fresh token), one that waits for a
        live migration: returns the HOST:PORT it listens on."""
        rec = VmRecord(id=d.id, created=time.time(), source="config", limits=req.limits)
        args = ["firecracker", "--api-sock", str(d.api_sock), "--id", d.id, "--log-path", str(d.log)]
        if req.config is not None:
            if req.config.boot_source is None:
                raise FleetError("config: boot-source is required: give the kernel_image_path to boot")
            mc = req.config.machine_config
            rec.vcpus, rec.mem_mib = (mc.vcpu_count, mc.mem_size_mib) if mc else (1, 128)
            rec.taps = [
                i.host_dev_name
                for i in req.config.network_interfaces
                if not Path("/sys/class/net", i.host_dev_name).exists()
            ]
            config = req.vm_config()
            assert config is not None
            d.write(d.config, config.model_dump_json(by_alias=True, exclude_none=True, indent=1))
            args += ["--config-file", str(d.config)]
        elif incoming is not None:
            rec.source = "migration"
            rec.vcpus, rec.mem_mib = incoming[0].vcpus, incoming[0].mem_mib
            if self.jail:
                _check_jailed_grant(incoming[0].host)
        else:
            assert req.snapshot is not None
            snap = Path(req.snapshot).absolute()
            if not (snap / SNAP_FILE).is_file() or not (snap / MEM_FILE).is_file():
                raise FleetError(
                    f"snapshot: {snap} holds no {SNAP_FILE} + {MEM_FILE}: give a directory "
                    "`corral vm snapshot` wrote"
                )
            rec.source, rec.snapshot = "snapshot", str(snap)
            cfg = _json_file(snap / "config.json")
            mc = cfg.get("machine-config") if isinstance(cfg, dict) else None
            if isinstance(mc, dict):
                rec.vcpus, rec.mem_mib = mc.get("vcpu_count"), mc.get("mem_size_mib")
        group: VmGroup | None = None
        if self.cgroups is not None:
            try:
                group = self.cgroups.create(d.id, req.limits)
            except CgroupError as exc:
                raise FleetError(f"limits: {exc}") from None
            rec.cgroups = group.report
        elif req.limits != type(req.limits)():
            rec.cgroups = LimitReport(not_applied=["every limit: this daemon runs with --no-cgroups"])
        load_paths: tuple[str, str, str | None] | None = None
        if self.jail:
            pid, load_paths = self._launch_jailed(d, req, rec, group)
        else:
            d.write(d.record, rec.model_dump_json())
            for f in (d.log, d.console):
                d.write(f, b"")
            pid = self.launcher.launch(args, log_path=d.console)
        with self._lock:
            self._children[d.id] = pid
        if group is not None:
            try:
                self.cgroups.join(group, pid)  # type: ignore[union-attr]
            except CgroupError as exc:
                if proc_start_time(pid) is not None:
                    raise FleetError(str(exc)) from None
                # It ended before it could be moved (a fork-server child fails in milliseconds):
                # _wait_api below reports the VM's own reason.
        d.write_pid(pid)
        self._wait_api(d, pid)
        if req.snapshot is not None:
            snap = Path(req.snapshot).absolute()
            snap_file, mem_file = str(snap / SNAP_FILE), str(snap / MEM_FILE)
            if load_paths is not None:
                snap_file, mem_file = load_paths[0], load_paths[1]
            load: dict[str, Any] = {
                "snapshot_path": snap_file,
                "mem_backend": {"backend_type": "File", "backend_path": mem_file},
                "resume_vm": req.resume,
                "network_overrides": [o.model_dump() for o in req.network_overrides],
            }
            if req.vsock_override is not None:
                load["vsock_override"] = req.vsock_override.model_dump()
                if load_paths is not None and load_paths[2] is not None:
                    load["vsock_override"]["uds_path"] = load_paths[2]
            try:
                self._api(d, SNAPSHOT_TIMEOUT).call("PUT", "/snapshot/load", load)
            except ApiError as exc:
                raise FleetError(f"snapshot: the clone cannot load it: {exc}") from None
        if req.gdb is not None:
            self._start_gdb(d, rec, req.gdb)
        if incoming is None:
            return None
        ask = {
            "listen": f"{self.migration_host}:0",
            "token": incoming[1],
            "timeout_s": incoming[0].timeout_s,
            "host": json.loads(incoming[0].host.model_dump_json(exclude_defaults=True)),
        }
        try:
            return str(self._api(d).call("PUT", "/corral/receive", ask)["address"])
        except (ApiError, KeyError, TypeError) as exc:
            raise FleetError(f"the receiving VM: {exc}") from None

    def _launch_jailed(
        self, d: VmDir, req: CreateVm, rec: VmRecord, group: VmGroup | None
    ) -> tuple[int, tuple[str, str, str | None] | None]:
        """The jail's host side here, its child side in the fork server's child; the VM's pid
        and, for a clone, the in-jail paths its snapshot load names."""
        t0 = time.perf_counter()
        inner = map_firecracker(
            api_sock=d.api_sock,
            instance_id=d.id,
            config_file=d.config if req.config is not None else None,
            no_api=False,
            log_path=d.log,
            level=None,
            metrics_path=None,
            boot_timer=False,
            kvm_path="/dev/kvm",
        )
        load_paths = None
        if req.snapshot is not None:
            snap = Path(req.snapshot).absolute()
            vsock = None if req.vsock_override is None else Path(req.vsock_override.uds_path)
            taps = [o.host_dev_name for o in req.network_overrides]
            load_paths = map_snapshot_load(inner, snap / SNAP_FILE, snap / MEM_FILE, taps, vsock)
        jail = Jail(JailOptions(id=d.id, chroot_base=self.jail_base), inner, pdeathsig=False)
        with self._lock:
            self._jails[d.id] = jail
        spec = jail.prepare()
        if group is not None:  # the VM moves itself into its cgroups before anything else
            spec = spec.model_copy(update={"cgroup_procs": [str(p / "cgroup.procs") for _, p in group.dirs]})
        rec.jail = JailInfo(
            uid=spec.uid,
            gid=spec.gid,
            dir=str(jail.dir),
            root=spec.root,
            namespaces=spec.namespaces,
            cgroups=[str(p) for _, p in group.dirs] if group is not None else [],
        )
        d.write(d.record, rec.model_dump_json())  # before the launch: an `rm` after a crash finds the jail
        d.write(d.console, b"")
        host_ms = (time.perf_counter() - t0) * 1000
        assert isinstance(self.launcher, JailingLauncher)
        try:
            pid, child_ms = self.launcher.launch_jailed(spec.argv, log_path=d.console, jail=spec)
        except LaunchError as exc:
            raise FleetError(f"the VM's jail: {exc}") from None
        rec.jail.setup_ms = round(host_ms + child_ms, 3)
        d.write(d.record, rec.model_dump_json())
        return pid, load_paths

    def _wait_api(self, d: VmDir, pid: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc_start_time(pid) is None:
                self.reap()
                tail = _tail(d.console, 2000).strip().splitlines()
                why = tail[-1] if tail else "no output"
                raise FleetError(f"the VM process ended at start: {why}")
            if d.api_sock.exists():
                try:
                    self._api(d, 2.0).call("GET", "/")
                    return
                except ApiError:
                    pass
            if time.monotonic() > deadline:
                tail = _tail(d.console, 2000).strip().splitlines()
                last = f" (its last output: {tail[-1][:300]})" if tail else " (no output)"
                sock = "" if d.api_sock.exists() else "; its API socket was never made"
                raise FleetError(f"the VM's API did not answer within {self.start_timeout:.0f} s{sock}{last}")
            time.sleep(0.02)

    # -- verbs on a running VM --------------------------------------------------------------------
    def _running(self, d: VmDir) -> HttpClient:
        if d.live_pid() is None:
            raise FleetError(f"VM {d.id} is not running: {self.info(d.id).state}")
        return self._api(d)

    def set_paused(self, vm_id: str, paused: bool) -> VmInfo:
        with self._locked(vm_id) as d:
            try:
                self._running(d).call("PATCH", "/vm", {"state": "Paused" if paused else "Resumed"})
            except ApiError as exc:
                raise FleetError(f"VM {vm_id}: {exc}") from None
        return self.info(vm_id)

    def snapshot(self, vm_id: str, path: str) -> SnapshotInfo:
        target = Path(path).absolute()
        with self._locked(vm_id) as d:
            api = self._running(d)
            api.timeout = SNAPSHOT_TIMEOUT
            rec = self._record(d)
            jail = rec.jail if rec is not None else None
            try:
                target.mkdir(mode=0o700)
            except FileExistsError:
                raise FleetError(f"snapshot: {target} exists: give a new directory") from None
            except OSError as exc:
                raise FleetError(f"snapshot: cannot create {target}: {exc.strerror}") from None
            try:
                was = api.call("GET", "/").get("state")
                if was == "Running":
                    api.call("PATCH", "/vm", {"state": "Paused"})
                try:
                    if jail is None:
                        paths = {
                            "snapshot_path": str(target / SNAP_FILE),
                            "mem_file_path": str(target / MEM_FILE),
                        }
                        api.call("PUT", "/snapshot/create", paths)
                    else:
                        _snapshot_jailed(api, jail, target)
                    config = api.call("GET", "/vm/config")
                    VmDir(target).write(target / "config.json", json.dumps(config, indent=1))
                finally:
                    if was == "Running":
                        api.call("PATCH", "/vm", {"state": "Resumed"})
            except (ApiError, OSError, FleetError) as exc:
                for f in (SNAP_FILE, MEM_FILE, "config.json"):
                    with contextlib.suppress(OSError):
                        (target / f).unlink()
                with contextlib.suppress(OSError):
                    target.rmdir()
                raise FleetError(f"snapshot of {vm_id}: {exc}") from None
        return SnapshotInfo(
            path=str(target), snapshot_file=str(target / SNAP_FILE), mem_file=str(target / MEM_FILE)
        )

    def clone(self, vm_id: str, req: CloneVm) -> VmInfo:
        """A new VM from a snapshot of `vm_id` (which runs on), kept in the new VM's directory:
        its memory stays mapped from there, and `rm` removes it with the clone."""

        def make(d: VmDir) -> None:
            snap = self.snapshot(vm_id, str(d.path / "clone-of"))
            create = CreateVm(
                id=d.id,
                snapshot=snap.path,
                resume=req.resume,
                network_overrides=req.network_overrides,
                vsock_override=req.vsock_override,
                limits=req.limits,
            )
            self._create(d, create)

        new_id, _ = self._new(req.id, make)
        return self.info(new_id)

    def gdb(self, vm_id: str, address: str) -> VmInfo:
        with self._locked(vm_id) as d:
            self._running(d)
            rec = self._record(d)
            if rec is None:
                raise FleetError(f"VM {vm_id} has no record (vm.json): remove it")
            self._start_gdb(d, rec, address)
        return self.info(vm_id)

    def _start_gdb(self, d: VmDir, rec: VmRecord, address: str) -> None:
        if rec.jail is not None and not address.startswith("tcp:"):
            raise FleetError("gdb: a jailed VM serves gdb on TCP only: give tcp:[HOST:]PORT")
        try:
            rec.gdb = str(self._api(d).call("PUT", "/corral/gdb", {"address": address})["address"])
        except (ApiError, KeyError, TypeError) as exc:
            raise FleetError(f"VM {d.id}: {exc}") from None
        d.write(d.record, rec.model_dump_json())

    # -- live migration between daemons -----------------------------------------------------------
    def incoming(self, req: Incoming) -> IncomingInfo:
        """A VM that waits for one live migration, with a fresh token for it (the target's half
        of a daemon-to-daemon migration)."""
        token = secrets.token_hex(32)
        shell = CreateVm.model_construct(
            id=req.id, config=None, snapshot=None, resume=True, network_overrides=[],
            vsock_override=None, limits=req.limits, gdb=None,
        )  # fmt: skip
        vm_id, address = self._new(req.id, lambda d: self._create(d, shell, (req, token)))
        assert address is not None
        return IncomingInfo(vm=self.info(vm_id), address=address, token=token)

    def migrate(self, vm_id: str, req: MigrateVm) -> MigrateResult:
        """Live-migrate `vm_id` to the daemon at `req.to`: it makes a VM that waits for the
        guest, this VM streams it there, and, once it runs there, this VM is removed. Until the
        guest is handed over any failure leaves it running here, and the waiting VM is removed."""
        target_id = req.id or vm_id
        target = HttpClient(req.to, timeout=60.0, token=req.token)
        with self._locked(vm_id) as d:
            api = self._running(d)
            rec = self._record(d)
            ask = Incoming(
                id=target_id,
                host=req.host,
                limits=req.limits,
                vcpus=rec.vcpus if rec else None,
                mem_mib=rec.mem_mib if rec else None,
            )
            try:
                reply = target.call(
                    "POST", "/incoming", json.loads(ask.model_dump_json(exclude_defaults=True))
                )
                inc = IncomingInfo.model_validate(reply)
            except (ApiError, ValidationError) as exc:
                raise FleetError(f"migrate {vm_id} to {req.to}: {_one_line(exc)}; it runs on here") from None
            try:
                stats = _send_guest(api, _reachable(inc.address, req.to), inc.token, req.downtime_ms)
            except FleetError as exc:
                with contextlib.suppress(ApiError):
                    target.call("DELETE", f"/vms/{target_id}")
                raise FleetError(f"migrate {vm_id} to {req.to}: {exc}; it runs on here") from None
            d.write(d.stopped, b"")  # the guest runs there now; this process ends by itself
            arrived = _arrived(target, target_id)
            self._destroy(d, force=False)
        with self._lock:
            self._vm_locks.pop(vm_id, None)
        return MigrateResult(id=target_id, to=req.to, stats=stats, target=arrived)

    def stop(self, vm_id: str) -> VmInfo:
        with self._locked(vm_id) as d:
            d.write(d.stopped, b"")
            self._end_process(d)
        return self.info(vm_id)

    def remove(self, vm_id: str) -> None:
        with self._locked(vm_id) as d:
            self._destroy(d, force=False)
        with self._lock:
            self._vm_locks.pop(vm_id, None)

    # -- teardown ---------------------------------------------------------------------------------
    def _end_process(self, d: VmDir, grace: float = STOP_GRACE) -> None:
        """SIGTERM the VM process (it stops its guest and exits), SIGKILL it after `grace`."""
        pid = d.live_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._gone(pid, grace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._gone(pid, 5.0)
        self.reap()

    def _gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while proc_start_time(pid) is not None:
            self.reap()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _destroy(self, d: VmDir, *, force: bool) -> None:
        """End the VM's process (and any left in its cgroup), remove its cgroup, the taps made
        for it, and its directory."""
        rec = self._record(d)
        self._end_process(d, grace=0.0 if force else 2.0)
        left: list[str] = []
        if self.cgroups is not None:
            group = self.cgroups.group(d.id)
            for pid in self.cgroups.pids(group):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.cgroups.pids(group) and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.01)
            left = self.cgroups.remove(group)
        for tap in rec.taps if rec else []:
            _delete_link(tap)
        with self._lock:
            child = self._children.pop(d.id, None)
            jail = self._jails.pop(d.id, None)
        if jail is not None:
            jail.cleanup()  # its links, taps, directory and uid lock
        elif rec is not None and rec.jail is not None:  # prepared by a daemon before this one
            _remove_jail(self.jail_base, d.id, rec.jail)
        if child is not None:
            self.launcher.exit_status(child)  # reaps it, when the daemon is its parent
        self.state.delete(d)
        if left:
            raise FleetError(f"VM {d.id} removed, but its cgroups could not be: {', '.join(left)}", 500)

    def cap_files(self) -> None:
        """Keep each VM's console and log within FILE_MAX: a guest that prints without end
        must not fill the host's disk. The newest FILE_KEEP bytes are kept."""
        for vm_id in self.ids():
            d = self.state.vm(vm_id)
            for path in (d.console, d.log):
                _cap(path)

    # -- console ----------------------------------------------------------------------------------
    def console(self, vm_id: str, follow: bool) -> Iterator[bytes]:
        """The VM's console: the last CONSOLE_TAIL bytes, then (follow) what it writes next,
        until its process ends or the VM is removed."""
        d = self.state.vm(vm_id)
        try:
            f = open(d.console, "rb")
        except FileNotFoundError:
            raise NoSuchVm(vm_id) from None
        return _follow(f, d, follow)


def _follow(f: Any, d: VmDir, follow: bool) -> Iterator[bytes]:
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - CONSOLE_TAIL))
        while True:
            chunk = f.read(65536)
            if chunk:
                yield chunk
                continue
            if f.tell() > os.fstat(f.fileno()).st_size:  # cut down to its tail (_cap): go on there
                f.seek(0)
                continue
            if not follow or d.live_pid() is None or not d.path.is_dir():
                if chunk := f.read(65536):  # the last words before it ended
                    yield chunk
                return
            time.sleep(0.05)
    finally:
        f.close()


def _cap(path: Path) -> None:
    try:
        if os.stat(path).st_size <= FILE_MAX:
            return
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= FILE_MAX:
                return
            f.seek(size - FILE_KEEP)
            keep = f.read(FILE_KEEP)
            f.truncate(0)  # the VM appends (O_APPEND): its next write lands after what is kept
            f.seek(0)
            f.write(b"[corral: earlier output dropped]\n" + keep)
    except OSError:
        pass


def _send_guest(api: HttpClient, address: str, token: str, downtime_ms: int) -> MigrationStats:
    """Have the VM behind `api` migrate itself to `address` (PUT /corral/migrate)."""
    body = {"to": address, "token": token, "downtime_ms": downtime_ms}
    result = None
    try:
        for line in api.lines("PUT", "/corral/migrate", body, timeout=MIGRATE_TIMEOUT):
            if not isinstance(line, dict):
                continue
            if "fault_message" in line:
                raise FleetError(_one_line(line["fault_message"]))
            if "result" in line:
                result = MigrationStats.model_validate(line["result"])
    except (ApiError, ValidationError) as exc:
        raise FleetError(_one_line(exc)) from None
    if result is None:
        raise FleetError("the VM ended the migration's reply without a result")
    return result


def _reachable(address: str, to: str) -> str:
    """Where the source sends the guest: the port the target's VM listens on, at the host the
    target daemon was reached at (its VM may listen on a wildcard address)."""
    host, _, port = address.rpartition(":")
    if to.startswith("tcp:"):
        host = to[4:].rpartition(":")[0].strip("[]")
    return f"{host}:{port}"


def _arrived(target: HttpClient, vm_id: str) -> VmInfo:
    """The migrated VM as the target reports it, once it runs (or a FleetError saying how not)."""
    deadline = time.monotonic() + ARRIVE_TIMEOUT
    while True:
        try:
            info = VmInfo.model_validate(target.call("GET", f"/vms/{vm_id}"))
        except (ApiError, ValidationError) as exc:
            raise FleetError(
                f"the guest was handed over, but the target does not answer: {_one_line(exc)}"
            ) from None
        if info.state == "running":
            return info
        if info.state in ("dead", "stopped") or time.monotonic() > deadline:
            raise FleetError(
                f"the guest was handed over, but the target reports it {info.state}: {info.exit}"
            )
        time.sleep(0.05)


def _check_jailed_grant(host: HostResources) -> None:
    """A jailed VM sees only what its jail binds in: host files for a migrated guest are not
    bound yet, so such a grant is refused before anything starts."""
    if host.disks or host.nets or host.vsock is not None or host.kernel or host.initrd or host.firmware:
        raise FleetError(
            "host: this daemon jails its VMs, and a migrated guest's disks, taps, vsock and kernel "
            "are not bound into a jail yet: migrate to a daemon run with --no-jail"
        )


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:1000]


def _snapshot_jailed(api: HttpClient, jail: JailInfo, target: Path) -> None:
    """Snapshot a jailed VM into its run directory (the one place it writes), then move the
    two files to `target`: each must be a regular file of the VM's uid with one link (the VM
    may have put anything there), is the daemon's afterwards, readable (0644) so that a clone's
    uid can read it through its bind; `target` is 0700, so no one else reaches it."""
    tag = secrets.token_hex(4)
    names = {SNAP_FILE: f".snapshot-{tag}.snap", MEM_FILE: f".snapshot-{tag}.mem"}
    run = Path(jail.dir) / "run"
    try:
        api.call(
            "PUT",
            "/snapshot/create",
            {
                "snapshot_path": f"{RUN_DIR}/{names[SNAP_FILE]}",
                "mem_file_path": f"{RUN_DIR}/{names[MEM_FILE]}",
            },
        )
        for final, name in names.items():
            _claim(run / name, target / final, jail.uid)
    finally:
        for name in names.values():
            with contextlib.suppress(OSError):
                (run / name).unlink()


def _claim(src: Path, dest: Path, uid: int) -> None:
    """Move `src` (in a VM's run directory) to `dest` as the daemon's own file, 0644, if it is
    a regular file of `uid` with one link; across file systems, a copy that keeps its holes."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_nlink != 1:
            raise FleetError(f"snapshot: the VM left no plain file of its own as {src.name}")
        try:
            os.rename(src, dest)
            moved = os.stat(dest, follow_symlinks=False)
            if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):  # swapped under us
                dest.unlink()
                raise FleetError(f"snapshot: {src.name} changed while it was moved")
            out = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "rb", closefd=False) as fi, open(out, "r+b", closefd=False) as fo:
                fo.truncate(st.st_size)
                _copy_data(fi, fo, st.st_size)
        try:
            os.fchown(out, os.getuid(), os.getgid())
            os.fchmod(out, 0o644)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _remove_jail(base: Path, vm_id: str, jail: JailInfo) -> None:
    """Undo a jail whose Jail object is gone (the daemon restarted): its directory and uid."""
    d = base / "corral" / vm_id
    if str(d) == jail.dir and d.is_dir() and not d.is_symlink():
        shutil.rmtree(d, ignore_errors=True)
    release_uid(jail.uid, None)


def _describe_exit(code: int) -> str:
    """`code` as Popen.returncode has it: negative for the signal that ended the process."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by signal {-code} ({name})"
    return f"exited with status {code}"


def _running(pid: int) -> bool:
    """The process exists and is no zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read(n).decode(errors="replace")
    except OSError:
        return ""


def _json_file(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None


def _delete_link(name: str) -> None:
    """Remove a tap left behind (persistent) that was made for the VM."""
    if not Path("/sys/class/net", name).exists():
        return
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ip:
            ip.link("del", ifname=name)
    except Exception as exc:  # noqa: BLE001 (pyroute2's errors have no common base; log and go on)
        log.warning("cannot remove the tap %s: %s", name, exc)


__all__ = ["Fleet", "FleetError", "NoSuchVm"]
