"""Start one VMM in its jail, wait for it, clean up. The order of the start sequence is the
security argument, so it is spelled out here, in one function per side:

On the host (the jailer, root): choose the VM's uid (a free one from UID_RANGE, held by a lock
file while the VM lives) unless given; make `<chroot-base>/corral/<id>/` (0700, root) with `root/`
(an empty mount point) and `run/` (the VM's, 0700: its sockets; the operator's socket paths
become symlinks into it); create the VM's cgroups; fork the VMM into a new PID namespace.

In the child, before it runs anything of the VM's: a new mount, IPC and UTS namespace (mounts
made private), the given network namespace joined, a tmpfs root filled from the plan
(corral.jail.rootfs: the interpreter and corral read-only, the VM's files, its device nodes),
`pivot_root` into it and the old root detached, the root remounted read-only and a chroot into
its subdirectory (no user namespaces from there); rlimits; the
supplementary groups dropped, then gid and uid (all three ids); PR_SET_NO_NEW_PRIVS; every fd
closed but stdin/out/err; a fresh environment; exec of `python -m corral ...`. The VMM is pid 1
of its namespace: it starts no processes, so there is nothing to reap, and when it exits the
kernel ends anything left in the namespace.

seccomp: the jail installs no filter. The VMM installs its own per-thread filters after start
(vCPU threads, the device loop, the API, as Firecracker does); PR_SET_NO_NEW_PRIVS, set here,
is what lets an unprivileged process install them. See the SECCOMP mark below.

Two callers share these steps: `Jail.start` (the jailer: host side, fork, `enter_jail`, exec)
and the daemon's fork server (corral.forkserver: the daemon runs `Jail.prepare` for the host
side, the warm template forks, and its child runs `enter_jail` and then the VMM in-process, with
no exec, so the template's pages stay shared). What crosses from one to the other is a
`JailSpec`, plain data.

Python 3.11 has no os.unshare/os.setns, so the namespace calls go through corral.jail.linux.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pydantic import BaseModel, ConfigDict

from corral.errors import ConfigError, FieldError, HostError
from corral.jail import debug, linux
from corral.jail.cgroups import CgroupSet
from corral.jail.mapping import RUN_DIR, Inner
from corral.jail.options import RLIMITS, UID_RANGE, JailOptions
from corral.jail.rootfs import INNER, Bind, Plan, build_root, corral_path, interpreter_binds, readable_by
from corral.jail.taps import delete_tap, make_tap, tap_exists

log = logging.getLogger("corral.jail")

UID_LOCKS = Path("/run/corral-jail/uids")


class JailError(HostError):
    """The jail could not be set up (a namespace, a mount, a cgroup): nothing of the VM ran."""


@dataclass
class JailReport:
    """What one jail was: for the one line the jailer prints, and for the tests."""

    id: str
    uid: int
    gid: int
    dir: Path
    pid: int = 0
    setup_ms: float = 0.0
    applied: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = "; ".join(self.applied) or "no cgroup limits"
        return (
            f"jail {self.id}: pid {self.pid}, uid {self.uid} gid {self.gid}, run dir {self.dir / 'run'}; "
            f"{extra}; set up in {self.setup_ms:.1f} ms"
        )


def _uids_in_use() -> set[int]:
    """The uids of running processes (a /proc/PID directory belongs to its process's uid)."""
    used = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                used.add(entry.stat().st_uid)
    return used


def _take_uid(wanted: int | None) -> tuple[int, int | None]:
    """A uid for the VM and the fd of the lock that holds it (None for an operator's uid)."""
    if wanted is not None:
        return wanted, None
    UID_LOCKS.mkdir(parents=True, exist_ok=True, mode=0o700)
    used = _uids_in_use()
    for uid in UID_RANGE:
        if uid in used:
            continue
        with contextlib.suppress(KeyError):
            pwd.getpwuid(uid)
            continue  # a real account: its files are not the VM's
        fd = os.open(UID_LOCKS / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if not _same_file(fd, UID_LOCKS / str(uid)):
            os.close(fd)  # its holder released it (and removed the file) as we opened it
            continue
        return uid, fd
    raise JailError(f"no free uid in {UID_RANGE.start}..{UID_RANGE.stop - 1}: give --uid")


class JailSpec(BaseModel):
    """What the child side needs to enter one jail: made on the host by `Jail.prepare`, applied
    by `enter_jail` in the forked child (of the jailer, or of the daemon's fork server)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    root: str  # the empty mount point the tmpfs root goes on (<dir>/root)
    plan: Plan
    uid: int
    gid: int
    argv: list[str]  # corral's arguments inside the jail (no program name)
    env: dict[str, str]
    rlimits: dict[str, int]
    netns: str | None = None
    taps: list[tuple[str, str]] = []
    cgroup_procs: list[str] = []  # cgroup.procs files the child moves itself into, first
    pdeathsig: bool = True  # die with the parent (the jailer); never for the fork server's VMs

    @property
    def namespaces(self) -> list[str]:
        """The namespaces the child gets (for reports)."""
        return ["mnt", "pid", "ipc", "uts"] + (["net"] if self.netns else [])


class JailStepError(Exception):
    """A child-side step failed: `step` says which (the jailer's one line names it)."""

    def __init__(self, step: str, exc: BaseException) -> None:
        super().__init__(f"{step}: {exc}")
        self.step = step


def enter_jail(spec: JailSpec, keep_fd: int) -> None:  # pragma: no cover - runs in a forked child
    """The child side, in order (see the module docstring): cgroups, namespaces, taps, the root,
    pivot_root + chroot, rlimits, ids, no_new_privs, every fd but 0-2 and `keep_fd` closed.
    Runs in a single-threaded child already in its new PID namespace; never in the caller's
    process. A failure raises JailStepError; what ran by then stays in the child's namespaces."""
    step = "joining the VM's cgroups"
    try:
        os.umask(0o022)  # the root's directories must be walkable by the VM's uid, whatever ours was
        for procs in spec.cgroup_procs:
            with open(procs, "w") as f:
                f.write("0")  # "0": the writing process itself, whatever its pid namespace
        step = "namespaces"
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)  # nothing leaks back out
        if spec.netns is not None:
            step = f"joining network namespace {spec.netns}"
            fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
            linux.setns(fd, linux.CLONE_NEWNET)
            os.close(fd)
        linux.sethostname(spec.id)
        for name, host_ip in spec.taps:
            step = f"making tap {name}"
            make_tap(name, spec.uid, spec.gid, host_ip)
        step = "building the root"
        build_root(spec.root, spec.plan, spec.uid, spec.gid)
        step = "pivot_root"
        os.chdir(spec.root)
        linux.pivot_root(".", ".")  # the old root ends up stacked on the new one...
        linux.umount2(".", linux.MNT_DETACH)  # ...and is detached from it
        os.chdir("/")
        linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID)
        os.chroot(INNER)  # see rootfs.build_root: no new user namespaces from in here
        os.chdir("/")
        step = "rlimits"
        for name, n in spec.rlimits.items():
            resource.setrlimit(RLIMITS[name], (n, n))
        step = "dropping privileges"
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if spec.pdeathsig:
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        # SECCOMP: no filter here. The VMM installs its per-thread filters itself once its
        # threads exist (no_new_privs above lets it); a jail-wide filter would go here.
        step = "closing fds"
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.umask(0o077)
    except BaseException as exc:  # noqa: BLE001 - the caller reports it and ends the child
        raise JailStepError(step, exc) from None


def release_uid(uid: int, fd: int | None) -> None:
    """Give back a uid _take_uid chose: its lock file goes, then the lock. With `fd` None (a
    daemon restarted since), the lock is taken first, so a uid a live holder keeps stays held."""
    path = UID_LOCKS / str(uid)
    if fd is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
    try:
        if _same_file(fd, path):
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Jail:
    """One VM's jail, from `prepare()` to `wait()` (which cleans up). `run()` does both. The
    daemon uses `prepare()` and `cleanup()` only: its fork server does the child side."""

    def __init__(self, options: JailOptions, inner: Inner, *, pdeathsig: bool = True) -> None:
        if os.geteuid() != 0:
            raise HostError(
                "the jail needs root (it makes namespaces and mounts, then drops to the VM's uid)"
            )
        self.options = options
        self.inner = inner
        self.pdeathsig = pdeathsig
        self.id = options.id or "vm-" + secrets.token_hex(4)
        self.dir = options.chroot_base / "corral" / self.id
        self.cgroups = CgroupSet(self.id)
        self.uid_lock: int | None = None
        self.uid = 0
        self.links: list[Path] = []
        self.made_dir = False
        self.made_taps: list[str] = []
        self.pid = 0
        self.report: JailReport | None = None

    def run(self) -> int:
        """Start the VMM in its jail and wait for it; its exit status (128+N for signal N)."""
        self.start()
        return self.wait()

    def start(self) -> JailReport:
        t0 = time.perf_counter()
        try:
            report = self._start(self.prepare(), t0)
        except BaseException:
            self._cleanup()
            raise
        self.report = report
        return report

    def prepare(self) -> JailSpec:
        """The host side (root): uid, directories, the VM's files and socket links, cgroups, the
        root's plan. On failure nothing is left (a JailError or the ConfigError naming it)."""
        try:
            return self._prepare()
        except OSError as exc:  # the host side of the set-up (the child's failures are JailErrors)
            self._cleanup()
            raise JailError(f"jail {self.id}: {exc}") from None
        except BaseException:
            self._cleanup()
            raise

    def _prepare(self) -> JailSpec:
        o = self.options
        uid, self.uid_lock = _take_uid(o.uid)
        self.uid = uid
        gid = o.gid if o.gid is not None else uid
        jails = self.options.chroot_base / "corral"
        if os.path.realpath(jails) != str(jails):
            raise ConfigError(
                f"--chroot-base: {jails} leads through a symbolic link: give the real directory"
            )
        try:
            self.dir.mkdir(parents=True, mode=0o700)
            self.made_dir = True
        except FileExistsError:
            raise ConfigError(
                f"--id {self.id}: a jail with this id exists ({self.dir}): give another"
            ) from None
        os.chmod(self.dir, 0o700)
        (self.dir / "root").mkdir(mode=0o755)
        run = self.dir / "run"
        run.mkdir(mode=0o700)
        os.chown(run, uid, gid)
        for name, data in self.inner.run_files.items():
            (run / name).write_bytes(data)
            os.chown(run / name, uid, gid)
        for path in self.inner.create:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.fchown(fd, uid, gid)
            os.close(fd)
        for field_name, path in self.inner.writes:
            if not readable_by(str(path), uid, gid, write=True):
                raise FieldError(
                    field_name, f"the jail's uid {uid} cannot write {path}: chown {uid} it, or give --uid"
                )
        for b in self.inner.binds:
            if not readable_by(b.host, uid, gid, write=False):
                raise ConfigError(
                    f"the jail's uid {uid} cannot read {b.host}: make it readable, or give --uid"
                )
        for host, name in self.inner.sockets.items():
            if host.is_symlink() or host.is_socket():
                host.unlink()  # a stale socket or link of an earlier VM
            elif host.exists():
                raise ConfigError(f"{host} exists and is not a socket: give another path")
            host.symlink_to(run / name)
            self.links.append(host)
        self.cgroups.apply(o.cgroups)
        self.made_taps = [name for name, _ in self.inner.taps if not tap_exists(name, o.netns)]

        plan = Plan(binds=[*interpreter_binds(), *self.inner.binds, Bind(str(run), RUN_DIR, writable=True)])
        plan.nodes = list(self.inner.nodes)
        env = {
            "PATH": "/nonexistent",
            "PYTHONPATH": corral_path(),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
            "TMPDIR": RUN_DIR,  # the one writable place (a snapshot load stages files there)
        }
        hook = debug.hook_for_jail()
        if hook is not None:  # the compromised-VMM simulation (tests only; see corral.jail.debug)
            plan.binds.append(Bind(str(hook.parent), debug.JAIL_DIR, writable=True))
            env[debug.HOOK_ENV] = f"{debug.JAIL_DIR}/{hook.name}"
        return JailSpec(
            id=self.id,
            root=str(self.dir / "root"),
            plan=plan,
            uid=uid,
            gid=gid,
            argv=list(self.inner.argv),
            env=env,
            rlimits=self.options.limits(),
            netns=None if o.netns is None else str(o.netns),
            taps=list(self.inner.taps),
            pdeathsig=self.pdeathsig,
        )

    def _start(self, spec: JailSpec, t0: float) -> JailReport:
        argv = [sys.executable, "-m", "corral", *spec.argv]
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.unshare(linux.CLONE_NEWPID)  # for the child only: it is pid 1 there
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child ends in exec or _exit
                os.close(err_r)
                os.close(go_w)
                self._child(spec, argv, err_w, go_r)
            linux.setns(own_pidns, linux.CLONE_NEWPID)  # this process's later children: as before
        except OSError as exc:
            raise JailError(f"jail {self.id}: {exc}") from None
        finally:
            os.close(own_pidns)
        self.pid = pid
        os.close(err_w)
        os.close(go_r)
        try:
            self.cgroups.join(pid)
        finally:
            os.write(go_w, b"g")
            os.close(go_w)
        with os.fdopen(err_r, "rb") as f:
            failure = f.read(4096)
        if failure:
            os.waitpid(pid, 0)
            self.pid = 0
            raise JailError(f"jail {self.id}: {failure.decode(errors='replace')}")
        report = JailReport(
            self.id,
            spec.uid,
            spec.gid,
            self.dir,
            pid,
            (time.perf_counter() - t0) * 1000,
            list(self.cgroups.applied),
        )
        log.debug("%s", report.line())
        return report

    def _child(
        self, spec: JailSpec, argv: list[str], err_w: int, go_r: int
    ) -> None:  # pragma: no cover - runs in the forked child
        step = "waiting for the jailer"
        try:
            os.read(go_r, 1)  # the jailer has put us in the VM's cgroups
            os.close(go_r)
            enter_jail(spec, err_w)
            step = f"exec {argv[0]}"
            os.execve(argv[0], argv, spec.env)
        except BaseException as exc:  # noqa: BLE001 - the child never returns into the jailer's code
            text = str(exc) if isinstance(exc, JailStepError) else f"{step}: {exc}"
            with contextlib.suppress(OSError):
                os.write(err_w, text.encode()[:4000])
            os._exit(127)

    def wait(self) -> int:
        """Wait for the VMM (Ctrl-C reaches it from the terminal; SIGTERM here kills it), clean up."""

        def kill(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # pid 1 of its namespace ignores SIGTERM

        main = threading.current_thread() is threading.main_thread()  # (a daemon waits elsewhere)
        if main:
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            old_term = signal.signal(signal.SIGTERM, kill)
        try:
            _, status = os.waitpid(self.pid, 0)
        finally:
            if main:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_term)
            self.pid = 0
            self._cleanup()
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def _cleanup(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = 0
        for link in self.links:
            with contextlib.suppress(OSError):
                if link.is_symlink() and str(os.readlink(link)).startswith(str(self.dir)):
                    link.unlink()
        self.links.clear()
        self.cgroups.remove()
        for name in self.made_taps:
            delete_tap(name, self.options.netns)
        self.made_taps = []
        if self.made_dir:  # never another VM's jail whose id we were given again
            shutil.rmtree(self.dir, ignore_errors=True)
            self.made_dir = False
        if self.uid_lock is not None:
            release_uid(self.uid, self.uid_lock)
            self.uid_lock = None

    def cleanup(self) -> None:
        """Undo `prepare()` once the VM's process is gone (the daemon's `rm`): the socket links,
        cgroups, taps the jail made, its directory and the uid's lock."""
        self._cleanup()
