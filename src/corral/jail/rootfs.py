"""The jail's root: what one VM may see, as a plan made on the host and applied in the child.

The plan is data (binds, device nodes), made before any namespace exists so a missing or
unreadable file is one clear line; `build_root` applies it inside the child's private mount
namespace on a small tmpfs, which vanishes with the namespace (nothing to clean on the host).
Every path is exposed at the same place it has on the host, symlinks on the way recreated as
symlinks, so the interpreter finds its stdlib, its venv and corral where it expects them.

Read-only: the interpreter, its stdlib and shared libraries, the venv's site-packages, corral,
the kernel/initrd and read-only disks. Writable: the VM's writable disks and overlays, its
console file, and its run directory (sockets). The root itself is remounted read-only.
"""

from __future__ import annotations

import os
import site
import stat
import sys
import sysconfig
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from corral.jail import linux

PACKAGE = Path(__file__).resolve().parents[1]  # corral itself, wherever it is installed


@dataclass(frozen=True)
class Bind:
    """`host` (a file or a directory) seen at `inside` in the jail."""

    host: str
    inside: str
    writable: bool = False
    exec_ok: bool = False  # shared libraries and the interpreter need exec; data never does


@dataclass(frozen=True)
class Node:
    """A device node `inside` with the rdev of `host`, owned by the VM (mode 0600) or shared."""

    host: str
    inside: str
    mode: int = 0o600


@dataclass
class Plan:
    binds: list[Bind] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)  # inside path -> target, as on the host


@cache
def interpreter_binds() -> tuple[Bind, ...]:
    """What the Python running corral needs, read-only: its binary (through the venv's symlink
    chain), stdlib, libpython's directory, the multiarch library directory (libc, and what
    ctypes, ssl and the extension modules load), the venv's site-packages and corral itself.
    (Not ldd: it costs a process per VM; these directories are where Python's libraries live.)"""
    real = os.path.realpath(sys.executable)
    binds = [Bind(real, real, exec_ok=True)]
    dirs = set()
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        dirs.add(str(sysconfig.get_config_var("LIBDIR")))
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for d in (f"/lib/{multiarch}", f"/usr/lib/{multiarch}") if multiarch else ():
        if os.path.isdir(d):
            dirs.add(d)
    for d in sorted(dirs):
        binds.append(Bind(d, d, exec_ok=True))
    binds.append(Bind("/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2", exec_ok=True))
    binds.append(Bind(sysconfig.get_path("stdlib"), sysconfig.get_path("stdlib"), exec_ok=True))
    if sys.prefix != sys.base_prefix:
        cfg = os.path.join(sys.prefix, "pyvenv.cfg")
        binds.append(Bind(cfg, cfg))
        binds.append(Bind(sys.executable, sys.executable, exec_ok=True))  # the venv's symlink chain
    for sp in site.getsitepackages():
        if os.path.isdir(sp):
            binds.append(Bind(sp, sp, exec_ok=True))
    pkg = str(PACKAGE)
    binds.append(Bind(pkg, pkg))
    seen: set[str] = set()
    unique = []
    for b in binds:  # a directory inside another bound one is already there
        if b.host in seen or any(b.host.startswith(s + "/") for s in seen):
            continue
        seen.add(b.host)
        unique.append(b)
    return tuple(unique)


def corral_path() -> str:
    """The directory holding the corral package (the jail's PYTHONPATH)."""
    return str(PACKAGE.parent)


def readable_by(path: str, uid: int, gid: int, write: bool) -> bool:
    """Whether uid/gid (no supplementary groups) may read, and if `write` write, `path`."""
    st = os.stat(path)
    if st.st_uid == uid:
        bits = (stat.S_IRUSR, stat.S_IWUSR)
    elif st.st_gid == gid:
        bits = (stat.S_IRGRP, stat.S_IWGRP)
    else:
        bits = (stat.S_IROTH, stat.S_IWOTH)
    return bool(st.st_mode & bits[0]) and (not write or bool(st.st_mode & bits[1]))


# --- applied in the child, inside its own mount namespace -------------------------------------


def _ensure(root: str, path: str, is_dir: bool, symlinks: dict[str, str], depth: int = 0) -> str:
    """Make `path` exist under `root` as a mount point; host symlinks on the way become the same
    symlinks in the jail, followed. Returns the real host path that the mount point stands for."""
    if depth > 40:
        raise OSError(f"too many symbolic links resolving {path}")
    cur = "/"
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        host = os.path.join(cur, part)
        jailed = root + host
        last = i == len(parts) - 1
        if os.path.islink(host):
            target = os.readlink(host)
            if not os.path.lexists(jailed):
                os.symlink(target, jailed)
            symlinks[host] = target
            rest = "/".join(parts[i + 1 :])
            resolved = os.path.normpath(
                os.path.join(cur, target, rest) if rest else os.path.join(cur, target)
            )
            return _ensure(root, resolved, is_dir, symlinks, depth + 1)
        if last and not is_dir:
            if not os.path.exists(jailed):
                os.close(os.open(jailed, os.O_CREAT | os.O_WRONLY, 0o644))
        elif not os.path.isdir(jailed):
            os.mkdir(jailed, 0o755)
        cur = host
    return path


INNER = "/jail"  # the VMM's root: a directory of the pivoted-to tmpfs, entered with chroot


def build_root(top: str, plan: Plan, uid: int, gid: int) -> None:
    """Mount a tmpfs at `top` and fill `top`/jail from `plan` (binds, remounted read-only where
    asked). The VMM's root is that subdirectory, not the mount's root: a process whose root is
    not its mount namespace's root is "chrooted" to the kernel, which then refuses it new user
    namespaces (unshare/clone CLONE_NEWUSER: EPERM), the usual first step of a kernel exploit."""
    linux.mount("corral-jail", top, "tmpfs", linux.MS_NOSUID, "mode=0755,size=1m,nr_inodes=4096")
    root = top + INNER
    os.mkdir(root, 0o755)
    mounted: list[str] = []
    for b in plan.binds:
        is_dir = os.path.isdir(b.host)
        target = _ensure(root, b.inside, is_dir, plan.symlinks)
        if any(target == m or target.startswith(m + "/") for m in mounted):
            continue  # reached through a symlink into something already there
        mounted.append(target)
        where = root + target
        linux.mount(b.host, where, None, linux.MS_BIND | (linux.MS_REC if is_dir else 0))
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NODEV
        flags |= 0 if b.writable else linux.MS_RDONLY
        flags |= 0 if b.exec_ok else linux.MS_NOEXEC
        linux.mount(None, where, None, flags)
    for n in plan.nodes:
        _ensure(root, os.path.dirname(n.inside), True, plan.symlinks)
        os.mknod(root + n.inside, stat.S_IFCHR | n.mode, os.stat(n.host).st_rdev)
        os.chmod(root + n.inside, n.mode)  # not the umask's
        if n.mode == 0o600:
            os.chown(root + n.inside, uid, gid)
