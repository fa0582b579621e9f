"""What the operator asks of a jail: its id, uid/gid, network namespace, cgroup limits and
rlimits, as one validated model shared by `corral jail` and `corral run --jail`.

The syntax follows Firecracker's jailer: `--cgroup FILE=VALUE` names a cgroup file (its
controller is the part before the first dot: `memory.max=512M`, `pids.max=64`), `--rlimit
NAME=N` a resource limit (`nofile=1024`, `fsize=1G`). Everything here is checked before any
namespace or mount exists, so a typo is one line and nothing to clean up.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from corral.config import parse_size
from corral.errors import ConfigError

ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
CGROUP_KEY_RE = re.compile(r"[a-z_0-9]+\.[a-z_0-9.]+")
UID_RANGE = range(900_000, 900_000 + 65_536)  # per-VM uids chosen by the jail when none is given

RLIMITS = {
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
    "nproc": resource.RLIMIT_NPROC,
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "memlock": resource.RLIMIT_MEMLOCK,
    "stack": resource.RLIMIT_STACK,
}
# Applied unless the operator says otherwise. nproc counts the VM uid's threads (one per vCPU,
# the device loop, the control socket's): a fork bomb stops there. No core dumps.
DEFAULT_RLIMITS = {"nofile": 2048, "nproc": 512, "core": 0}
SIZED = {"fsize", "as", "memlock", "stack"}  # values that may be written 1G


def parse_rlimit(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    if not eq or name not in RLIMITS:
        raise ConfigError(f"--rlimit {text!r}: use NAME=N with NAME one of {', '.join(RLIMITS)}")
    try:
        n = parse_size(value, default_unit="") if name in SIZED else int(value, 10)
    except (ConfigError, ValueError):
        raise ConfigError(f"--rlimit {text!r}: {value!r} is not a number") from None
    if n < 0 or n > 1 << 62:
        raise ConfigError(f"--rlimit {text!r}: {value!r} is out of range")
    return name, n


def parse_cgroup(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not CGROUP_KEY_RE.fullmatch(key) or ".." in key:
        raise ConfigError(f"--cgroup {text!r}: use FILE=VALUE, e.g. memory.max=512M or pids.max=64")
    if not value or len(value) > 256 or any(c in value for c in "\n\0"):
        raise ConfigError(f"--cgroup {text!r}: the value must be one line of at most 256 characters")
    return key, value


class JailOptions(BaseModel):
    """One VM's jail. `uid`/`gid` None: a free uid from UID_RANGE, gid the same number."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default="", description="the jail's name: [A-Za-z0-9-]{1,64}; empty: a random one")
    uid: int | None = Field(default=None, ge=1, lt=1 << 32, description="the VMM's uid (never 0)")
    gid: int | None = Field(default=None, ge=1, lt=1 << 32, description="the VMM's gid (never 0)")
    netns: Path | None = Field(default=None, description="a network namespace to join (/var/run/netns/X)")
    cgroups: tuple[tuple[str, str], ...] = Field(default=(), description="cgroup FILE=VALUE pairs")
    rlimits: tuple[tuple[str, int], ...] = Field(default=(), description="rlimits over DEFAULT_RLIMITS")
    chroot_base: Path = Field(default=Path("/srv/jailer"), description="jails live under BASE/corral/ID")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if v and not ID_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a jail id: use 1 to 64 letters, digits and dashes")
        return v

    @classmethod
    def parse(
        cls,
        *,
        id: str = "",
        uid: int | None = None,
        gid: int | None = None,
        netns: Path | None = None,
        cgroups: tuple[str, ...] = (),
        rlimits: tuple[str, ...] = (),
        chroot_base: Path | None = None,
    ) -> JailOptions:
        """From the command line's strings; a ConfigError names the option."""
        if id and not ID_RE.fullmatch(id):
            raise ConfigError(f"--id {id!r}: use 1 to 64 letters, digits and dashes")
        for flag, v in (("--uid", uid), ("--gid", gid)):
            if v is not None and not 1 <= v < 1 << 32:
                raise ConfigError(f"{flag} {v}: give a uid/gid from 1 to 4294967295 (never root)")
        if netns is not None and not netns.exists():
            raise ConfigError(f"--netns {netns}: no such network namespace (ip netns add NAME makes one)")
        base = chroot_base or Path("/srv/jailer")
        if not base.is_absolute():
            raise ConfigError(f"--chroot-base {base}: give an absolute directory")
        return cls(
            id=id,
            uid=uid,
            gid=gid,
            netns=netns,
            cgroups=tuple(parse_cgroup(c) for c in cgroups),
            rlimits=tuple(parse_rlimit(r) for r in rlimits),
            chroot_base=base,
        )

    def limits(self) -> dict[str, int]:
        """The rlimits to set: the defaults, overridden by the operator's."""
        return {**DEFAULT_RLIMITS, **dict(self.rlimits)}
