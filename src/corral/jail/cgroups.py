"""cgroup limits for one jailed VM, on cgroup v2 where the controller is there, else on its v1
hierarchy: hosts mix them (this project's machines mount every controller as v1 and an empty
cgroup2 at /sys/fs/cgroup/unified), so each `FILE=VALUE` goes where its controller lives.

Each VM gets `corral/<id>` under every hierarchy it uses; the jail writes the values, moves
the VMM in before it runs anything of its own, and removes the directories when it ends. What
was applied is returned as text, for the jail's one report line.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import ConfigError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _v2_root() -> Path | None:
    for candidate in (CGROUP_ROOT, CGROUP_ROOT / "unified"):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    return None


def _v1_mount(controller: str) -> Path | None:
    """The v1 hierarchy a controller is mounted on (cpu may share one with cpuacct)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "cgroup" and controller in parts[3].split(","):
                return Path(parts[1])
    return None


@dataclass
class CgroupSet:
    """The cgroups made for one VM: created, filled, joined, removed."""

    jail_id: str
    dirs: list[Path] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)

    def apply(self, settings: tuple[tuple[str, str], ...]) -> None:
        """Create the VM's cgroups and write each FILE=VALUE; a ConfigError names the first
        that this host cannot take (nothing is left behind: call remove())."""
        v2 = _v2_root()
        v2_controllers = set((v2 / "cgroup.controllers").read_text().split()) if v2 else set()
        for key, value in settings:
            controller = key.split(".", 1)[0]
            if v2 is not None and controller in v2_controllers:
                d = self._v2_dir(v2, controller)
                version = 2
            else:
                mount = _v1_mount(controller)
                if mount is None:
                    where = f"{v2} has {', '.join(sorted(v2_controllers)) or 'none'}" if v2 else "no cgroup2"
                    raise ConfigError(
                        f"--cgroup {key}: no '{controller}' controller on this host (v1: none; v2: {where})"
                    )
                d = self._dir(mount / "corral" / self.jail_id, cpuset=controller == "cpuset")
                version = 1
            target = d / key
            if not target.exists():
                raise ConfigError(f"--cgroup {key}: cgroup v{version} has no file {key} ({d})")
            try:
                target.write_text(value)
            except OSError as exc:
                raise ConfigError(f"--cgroup {key}={value}: the kernel refused it: {exc.strerror}") from None
            self.applied.append(f"cgroup v{version} {key}={value}")

    def _v2_dir(self, root: Path, controller: str) -> Path:
        parent = root / "corral"
        parent.mkdir(exist_ok=True)
        for d in (root, parent):  # a controller reaches a v2 cgroup only if its parent enables it
            with contextlib.suppress(OSError):
                (d / "cgroup.subtree_control").write_text(f"+{controller}")
        return self._dir(parent / self.jail_id)

    def _dir(self, d: Path, cpuset: bool = False) -> Path:
        if d not in self.dirs:
            d.parent.mkdir(exist_ok=True)
            d.mkdir()
            self.dirs.append(d)
            if cpuset:  # a v1 cpuset takes no task until it has cpus and mems: the parent's
                for c in (d.parent, d):
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        if not (c / f).read_text().strip():
                            (c / f).write_text((c.parent / f).read_text())
        return d

    def join(self, pid: int) -> None:
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Remove the VM's cgroups (once its processes are gone; retried briefly)."""
        for d in reversed(self.dirs):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.dirs.clear()
