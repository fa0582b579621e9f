"""The daemon's state directory: one directory per VM, the record a restarted daemon starts from.

    STATE/                  0700, the daemon's API socket (corral.sock) by default
    STATE/vms/ID/           0700, one VM:
        vm.json             the daemon's record (models.VmRecord): source, limits, cgroups, taps
        config.json         the Firecracker config the VM booted from (`--config-file`)
        pid                 "PID STARTTIME": the process, and its start time from /proc, so a
                            pid reused by another process is never taken for the VM
        api.sock            the VM's Firecracker API
        console             the VM process's stdout + stderr: the guest's serial console
        log                 the VM's log (`--log-path`)
        exit.json           how the process ended, when the daemon saw it end (its parent)
        stopped             present once a stop was asked for: the VM is `stopped`, not `dead`

Files are written whole (a temporary file renamed over), read with a size cap, and a VM
directory whose record cannot be read is still listed (as `dead`, with the reason), never
silently skipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from corral.errors import CorralError

VM_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
READ_MAX = 1 << 20
DIR_MODE = 0o700


class StateError(CorralError):
    """The state directory cannot be used."""


class BadVmId(CorralError):
    """A VM id that breaks the rule."""


def check_vm_id(vm_id: str) -> str:
    """Firecracker's instance id rule (what `corral firecracker --id` takes): 1 to 64 ASCII
    letters, digits and hyphens."""
    if not VM_ID_RE.fullmatch(vm_id):
        shown = vm_id[:80] + ("..." if len(vm_id) > 80 else "")
        raise BadVmId(f"VM id {shown!r} is not valid: give 1 to 64 characters of A-Z, a-z, 0-9 and '-'")
    return vm_id


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), or None when
    no such process runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    fields = raw.rpartition(b")")[2].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class VmDir:
    """The files of one VM."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    record = property(lambda self: self.path / "vm.json")
    config = property(lambda self: self.path / "config.json")
    pid_file = property(lambda self: self.path / "pid")
    api_sock = property(lambda self: self.path / "api.sock")
    console = property(lambda self: self.path / "console")
    log = property(lambda self: self.path / "log")
    exit_file = property(lambda self: self.path / "exit.json")
    stopped = property(lambda self: self.path / "stopped")

    def write(self, path: Path, data: bytes | str) -> None:
        """Replace `path` (in this directory) whole, 0600."""
        raw = data.encode() if isinstance(data, str) else data
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def read(self, path: Path) -> bytes | None:
        """The file's bytes (at most READ_MAX), or None when it does not exist."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return os.read(fd, READ_MAX)
        finally:
            os.close(fd)

    def write_pid(self, pid: int) -> None:
        self.write(self.pid_file, f"{pid} {proc_start_time(pid) or 0}\n")

    def live_pid(self) -> int | None:
        """The VM's pid if that process still runs (the same process: its start time matches)."""
        pid, start = self.recorded_pid()
        if pid is None:
            return None
        now = proc_start_time(pid)
        return pid if now is not None and (start == 0 or now == start) else None

    def recorded_pid(self) -> tuple[int | None, int]:
        raw = self.read(self.pid_file)
        parts = raw.split() if raw else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) <= 1:
            return None, 0
        return int(parts[0]), int(parts[1])


class StateDir:
    """STATE/ and STATE/vms/, created 0700 (an existing one is narrowed to 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.vms = self.root / "vms"
        try:
            for d in (self.root, self.vms):
                d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                if d.is_symlink() or not d.is_dir():
                    raise StateError(f"{d} is not a directory: give another --state-dir")
                os.chmod(d, DIR_MODE)
        except OSError as exc:
            raise StateError(f"cannot use the state directory {self.root}: {exc.strerror}") from None

    def vm(self, vm_id: str) -> VmDir:
        return VmDir(self.vms / check_vm_id(vm_id))

    def new(self, vm_id: str) -> VmDir:
        """Make the directory of a new VM; refused when the id is taken."""
        d = self.vm(vm_id)
        try:
            d.path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            raise StateError(f"a VM with id {vm_id!r} exists: give another id, or remove it first") from None
        except OSError as exc:
            raise StateError(f"cannot create {d.path}: {exc.strerror}") from None
        return d

    def ids(self) -> list[str]:
        """Every VM directory, sorted (names that are no VM id are not ours and are skipped)."""
        try:
            names = os.listdir(self.vms)
        except OSError as exc:
            raise StateError(f"cannot list {self.vms}: {exc.strerror}") from None
        return sorted(n for n in names if VM_ID_RE.fullmatch(n) and (self.vms / n).is_dir())

    def delete(self, d: VmDir) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d.path)


__all__ = ["BadVmId", "StateDir", "StateError", "VmDir", "check_vm_id", "proc_start_time"]
