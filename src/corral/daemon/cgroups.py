"""Resource limits per VM through the host's cgroups, on whichever layout the host has.

Hosts differ: a pure cgroup v2 host mounts one unified hierarchy (at /sys/fs/cgroup) holding
every controller; a hybrid or legacy host mounts v1 hierarchies, one per controller
(/sys/fs/cgroup/{cpu,memory,pids,blkio}), often beside a v2 hierarchy that holds few or no
controllers (/sys/fs/cgroup/unified). So each limit is placed where its controller lives: the v2
hierarchy when the controller is enabled there, else the v1 hierarchy that carries it, else it
is not applied and the report says why. What was applied (file and value) and what was not is
returned, so `corral vm show` can say it.

A VM's group is `<the daemon's own cgroup>/<parent>/<vm id>` in each hierarchy used (nested
under the daemon's, so the daemon's own limits still bound its VMs), named from the VM id alone:
a daemon that restarts finds its VMs' groups again. The VM process is moved in right after it is
spawned, before it has built its guest (Python start-up alone takes longer than the move).
"""

from __future__ import annotations

import errno
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.errors import CorralError

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEVICE_RE = re.compile(r"[0-9]{1,6}:[0-9]{1,8}")
# The controllers a VM's group uses (v1 name where it differs: io is blkio there).
CONTROLLERS = ("cpu", "memory", "pids", "io")
V1_NAME = {"cpu": "cpu", "memory": "memory", "pids": "pids", "io": "blkio"}
RMDIR_TRIES = 250  # x 20 ms: the last threads of a killed VM may take a while to exit


class CgroupError(CorralError):
    """A cgroup that cannot be created, limited, joined or removed."""


class IoLimit(BaseModel):
    """io.max for one block device (MAJ:MIN): bytes and operations per second, each optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    device: Annotated[str, Field(pattern=f"^{DEVICE_RE.pattern}$")]
    rbps: Annotated[int, Field(ge=1, le=1 << 50)] | None = None
    wbps: Annotated[int, Field(ge=1, le=1 << 50)] | None = None
    riops: Annotated[int, Field(ge=1, le=1 << 40)] | None = None
    wiops: Annotated[int, Field(ge=1, le=1 << 40)] | None = None


class Limits(BaseModel):
    """What one VM may use: CPUs' worth of time (0.5 = half a core), memory, tasks, disk I/O."""

    model_config = ConfigDict(extra="forbid")

    cpus: Annotated[float, Field(gt=0, le=4096)] | None = None
    memory_mib: Annotated[int, Field(ge=16, le=1 << 30)] | None = None
    pids: Annotated[int, Field(ge=8, le=1 << 22)] | None = None
    io: Annotated[list[IoLimit], Field(max_length=16)] = []


class Applied(BaseModel):
    """One limit written: its v2 name (`cpu.max`), the value, where it went (`v1`/`v2`, file)."""

    limit: str
    value: str
    cgroup: Literal["v1", "v2"]
    file: str


class LimitReport(BaseModel):
    """What a VM's cgroups hold: the limits applied, and those not applied with the reason."""

    groups: list[str] = []
    applied: list[Applied] = []
    not_applied: list[str] = []


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: its version, mount point, controllers and the path in it
    of the daemon's own cgroup."""

    version: Literal[1, 2]
    mount: Path
    controllers: frozenset[str]
    own: str = "/"

    def base(self) -> Path:
        return self.mount / self.own.lstrip("/")

    def label(self) -> Literal["v1", "v2"]:
        return "v2" if self.version == 2 else "v1"


def discover(
    mountinfo: Path = Path("/proc/self/mountinfo"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> list[Hierarchy]:
    """The cgroup hierarchies this process sees, one per hierarchy (the first mount of each)."""
    own_v1: dict[str, str] = {}
    own_v2 = "/"
    try:
        for line in self_cgroup.read_text().splitlines():
            num, names, path = line.split(":", 2)
            if num == "0" and not names:
                own_v2 = path
            for c in names.split(","):
                own_v1[c] = path
        lines = mountinfo.read_text().splitlines()
    except (OSError, ValueError):
        return []
    found: list[Hierarchy] = []
    seen: set[frozenset[str] | str] = set()
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        root, mount, fstype, superopts = fields[3], Path(_unescape(fields[4])), after[0], after[2]
        if fstype == "cgroup2" and "v2" not in seen:
            seen.add("v2")
            try:
                ctrls = frozenset((mount / "cgroup.controllers").read_text().split())
            except OSError:
                ctrls = frozenset()
            found.append(Hierarchy(2, mount, ctrls, _relative(own_v2, root)))
        elif fstype == "cgroup":
            ctrls = frozenset(o for o in superopts.split(",") if o in V1_NAME.values())
            if ctrls and ctrls not in seen:
                seen.add(ctrls)
                own = own_v1.get(next(iter(ctrls)), "/")
                found.append(Hierarchy(1, mount, ctrls, _relative(own, root)))
    return found


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _relative(own: str, root: str) -> str:
    """The daemon's cgroup path inside a mount whose root is `root` (a container sees part)."""
    if root != "/" and (own == root or own.startswith(root + "/")):
        return own[len(root) :] or "/"
    return own


@dataclass
class VmGroup:
    """One VM's cgroups: the directory in each hierarchy used, and what was applied."""

    dirs: list[tuple[Hierarchy, Path]]
    report: LimitReport = field(default_factory=LimitReport)


class Cgroups:
    """Places VMs' groups under `parent` in each hierarchy that carries a controller a VM uses
    (and in the v2 hierarchy always, which tracks processes even without controllers)."""

    def __init__(self, hierarchies: list[Hierarchy] | None = None, parent: str = "corral") -> None:
        if not NAME_RE.fullmatch(parent):
            raise CgroupError(
                f"cgroup parent {parent!r} is not a plain name: give 1-64 of [A-Za-z0-9_.-], no slash"
            )
        self.hierarchies = discover() if hierarchies is None else hierarchies
        self.parent = parent

    def where(self, controller: str) -> Hierarchy | None:
        """The hierarchy that serves `controller` (cpu, memory, pids, io): v2 first."""
        for h in self.hierarchies:
            if h.version == 2 and controller in h.controllers:
                return h
        for h in self.hierarchies:
            if h.version == 1 and V1_NAME[controller] in h.controllers:
                return h
        return None

    def _used(self) -> list[Hierarchy]:
        used = [h for c in CONTROLLERS if (h := self.where(c)) is not None]
        used += [h for h in self.hierarchies if h.version == 2]
        return list(dict.fromkeys(used))

    def group(self, vm_id: str) -> VmGroup:
        """The (possibly not yet created) group of `vm_id`."""
        if not NAME_RE.fullmatch(vm_id):
            raise CgroupError(f"{vm_id!r} cannot name a cgroup")
        return VmGroup([(h, h.base() / self.parent / vm_id) for h in self._used()])

    def create(self, vm_id: str, limits: Limits) -> VmGroup:
        """Make `vm_id`'s groups and write `limits` into them; on failure nothing is left."""
        group = self.group(vm_id)
        try:
            for h, d in group.dirs:
                if h.version == 2:
                    self._enable_v2(h, d.parent)
                d.mkdir(parents=True, exist_ok=True)
                group.report.groups.append(str(d))
            self._apply(group, limits)
        except CgroupError:
            self.remove(group)
            raise
        except OSError as exc:
            self.remove(group)
            raise CgroupError(f"cannot create the cgroup for VM {vm_id}: {exc}") from None
        return group

    def _enable_v2(self, h: Hierarchy, parent: Path) -> None:
        """Enable in `parent`'s ancestors (from the daemon's own cgroup) the controllers a VM uses."""
        want = [c for c in CONTROLLERS if c in h.controllers and self.where(c) is h]
        if not want:
            return
        chain = [h.base(), parent]
        for d in chain:
            d.mkdir(exist_ok=True)
            try:
                enabled = set((d / "cgroup.subtree_control").read_text().split())
            except OSError:
                enabled = set()
            missing = [c for c in want if c not in enabled]
            if missing:
                try:
                    (d / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))
                except OSError as exc:
                    log.warning("cannot enable %s in %s: %s", missing, d, exc)

    def _apply(self, group: VmGroup, limits: Limits) -> None:
        report = group.report
        dirs = {id(h): d for h, d in group.dirs}
        wanted: list[tuple[str, str, bool]] = [
            ("cpu", "cpu.max", limits.cpus is not None),
            ("memory", "memory.max", limits.memory_mib is not None),
            ("pids", "pids.max", limits.pids is not None),
            ("io", "io.max", bool(limits.io)),
        ]
        for controller, name, asked in wanted:
            if not asked:
                continue
            h = self.where(controller)
            if h is None:
                report.not_applied.append(f"{name}: this host has no {controller} controller mounted")
                continue
            d = dirs[id(h)]
            writes = _writes(controller, h.version, limits)
            if writes and not (d / writes[0][0]).exists():
                report.not_applied.append(
                    f"{name}: {d} has no {writes[0][0]} (the controller is not enabled for it)"
                )
                continue
            for fname, value in writes:
                path = d / fname
                try:
                    path.write_text(value)
                except OSError as exc:
                    raise CgroupError(f"cannot set {name} ({path} = {value!r}): {exc.strerror}") from None
                report.applied.append(Applied(limit=name, value=value, cgroup=h.label(), file=str(path)))

    def join(self, group: VmGroup, pid: int) -> None:
        """Move process `pid` (all its threads) into the group in every hierarchy."""
        for _h, d in group.dirs:
            try:
                (d / "cgroup.procs").write_text(str(pid))
            except OSError as exc:
                raise CgroupError(f"cannot move process {pid} into {d}: {exc.strerror}") from None

    def pids(self, group: VmGroup) -> set[int]:
        """The processes left in the group (any hierarchy)."""
        found: set[int] = set()
        for _h, d in group.dirs:
            try:
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def remove(self, group: VmGroup) -> list[str]:
        """Remove the group's directories (its processes must be gone); returns those left."""
        left = []
        for _h, d in group.dirs:
            for _ in range(RMDIR_TRIES):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("cannot remove the cgroup %s: %s", d, exc.strerror)
                        left.append(str(d))
                        break
                    time.sleep(0.02)  # the last task is still exiting
            else:
                left.append(str(d))
        return left

    def stat(self, group: VmGroup) -> dict[str, int]:
        """Counters for metrics: memory in use, CPU throttling, tasks (where present)."""
        out: dict[str, int] = {}
        for h, d in group.dirs:
            if h.version == 2:
                _put_int(out, "memory_bytes", d / "memory.current")
                _put_int(out, "tasks", d / "pids.current")
                for k, v in _keyed(d / "cpu.stat").items():
                    if k in ("nr_throttled", "throttled_usec"):
                        out[k] = v
            else:
                _put_int(out, "memory_bytes", d / "memory.usage_in_bytes")
                _put_int(out, "tasks", d / "pids.current")
                stat = _keyed(d / "cpu.stat")
                if "nr_throttled" in stat:
                    out["nr_throttled"] = stat["nr_throttled"]
                if "throttled_time" in stat:
                    out["throttled_usec"] = stat["throttled_time"] // 1000
        return out


def _writes(controller: str, version: int, limits: Limits) -> list[tuple[str, str]]:
    """The files and values that express one limit on one layout."""
    if controller == "cpu":
        assert limits.cpus is not None
        quota = max(1000, round(limits.cpus * CPU_PERIOD_US))
        if version == 2:
            return [("cpu.max", f"{quota} {CPU_PERIOD_US}")]
        return [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]
    if controller == "memory":
        assert limits.memory_mib is not None
        value = str(limits.memory_mib << 20)
        return [("memory.max" if version == 2 else "memory.limit_in_bytes", value)]
    if controller == "pids":
        return [("pids.max", str(limits.pids))]
    # io
    if version == 2:
        out = []
        for lim in limits.io:
            keys = {k: getattr(lim, k) for k in ("rbps", "wbps", "riops", "wiops")}
            out.append(("io.max", " ".join([lim.device] + [f"{k}={v}" for k, v in keys.items() if v])))
        return out
    v1 = {"rbps": "read_bps", "wbps": "write_bps", "riops": "read_iops", "wiops": "write_iops"}
    return [
        (f"blkio.throttle.{v1[k]}_device", f"{lim.device} {getattr(lim, k)}")
        for lim in limits.io
        for k in v1
        if getattr(lim, k)
    ]


def _put_int(out: dict[str, int], key: str, path: Path) -> None:
    try:
        out[key] = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass


def _keyed(path: Path) -> dict[str, int]:
    try:
        pairs = (line.split() for line in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}


__all__ = ["Applied", "CgroupError", "Cgroups", "Hierarchy", "IoLimit", "LimitReport", "Limits", "discover"]
