"""The initramfs corral builds around a static busybox, and the pieces it is made of.

- CpioWriter / parse_cpio: the kernel's "newc" cpio format (magic 070701), written in Python.
- Module dependencies: from a modules.dep file, or (Debian's packages ship none: depmod makes it
  at install time) from each .ko's own `.modinfo` "depends=" field; resolve_modules() puts the
  wanted modules and their dependencies in load order, skipping ones built into the kernel.
- build_initramfs(): /init, busybox and its applet links, the modules; gzip-compressed with fixed
  timestamps, so the same inputs give byte-identical output.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import ConfigError

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"

# What the debian image loads at boot, in the order asked for (dependencies come first anyway).
DEFAULT_MODULES = [
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "crc16",
    "crc32c_generic",
    "mbcache",
    "jbd2",
    "ext4",
]


# --- cpio ----------------------------------------------------------------------------------------


@dataclass
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


class CpioWriter:
    """Collects entries and renders a newc archive. Parent directories are added on demand;
    entries are written in the order added (directories before their contents)."""

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self._entries: list[CpioEntry] = []
        self._names: set[str] = set()

    @staticmethod
    def _norm(path: str) -> str:
        name = path.strip("/")
        if not name or ".." in name.split("/"):
            raise ValueError(f"bad cpio path {path!r}")
        return name

    def _add(self, entry: CpioEntry) -> None:
        if entry.name in self._names:
            raise ValueError(f"duplicate cpio entry {entry.name!r}")
        parent = entry.name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.add_dir(parent)
        entry.mtime = self.mtime
        self._names.add(entry.name)
        self._entries.append(entry)

    def __contains__(self, path: str) -> bool:
        return path.strip("/") in self._names

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = self._norm(path)
        if name in self._names:
            return
        self._add(CpioEntry(name, stat.S_IFDIR | mode, nlink=2))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(CpioEntry(self._norm(path), stat.S_IFREG | mode, bytes(data)))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(CpioEntry(self._norm(path), stat.S_IFLNK | 0o777, target.encode()))

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._add(CpioEntry(self._norm(path), fmt | mode, rdevmajor=major, rdevminor=minor))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, e in enumerate(self._entries, start=1):
            out += _encode(e, ino)
        out += _encode(CpioEntry(TRAILER, 0, nlink=1), 0)
        # The kernel accepts any length; pad to 512 like cpio(1) does.
        out += b"\0" * ((512 - len(out) % 512) % 512)
        return bytes(out)


def _encode(e: CpioEntry, ino: int) -> bytes:
    name = e.name.encode() + b"\0"
    fields = (
        ino,
        e.mode,
        e.uid,
        e.gid,
        e.nlink,
        e.mtime,
        len(e.data),
        0,
        0,
        e.rdevmajor,
        e.rdevminor,
        len(name),
        0,
    )
    header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
    out = header + name
    out += b"\0" * _pad4(len(out))
    out += e.data + b"\0" * _pad4(len(e.data))
    return out


def parse_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (gzip-compressed or not) up to its trailer."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}: {data[pos : pos + 6]!r}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = f
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += _pad4(pos)
        body = data[pos : pos + size]
        pos += size + _pad4(size)
        if name == TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, body, uid, gid, nlink, mtime, rmaj, rmin, ino))


# --- kernel modules ------------------------------------------------------------------------------


def module_name(path: str) -> str:
    """kernel/drivers/char/hw_random/virtio-rng.ko.xz -> virtio_rng"""
    base = path.rsplit("/", 1)[-1]
    for ext in (".xz", ".zst", ".gz"):
        base = base.removesuffix(ext)
    return base.removesuffix(".ko").replace("-", "_")


@dataclass
class ModuleIndex:
    paths: dict[str, str] = field(default_factory=dict)  # name -> path relative to modules dir
    deps: dict[str, list[str]] = field(default_factory=dict)  # name -> names it needs


def parse_modules_dep(text: str) -> ModuleIndex:
    """Parse depmod's modules.dep ("path: dep-path dep-path ...")."""
    idx = ModuleIndex()
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        name = module_name(path.strip())
        idx.paths[name] = path.strip()
        idx.deps[name] = [module_name(d) for d in rest.split()]
    return idx


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings in an ELF64 module's .modinfo section (first value per key)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise ValueError("not an ELF64 module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name_off,) = struct.unpack_from("<I", ko, base)
        offset, size = struct.unpack_from("<QQ", ko, base + 0x18)
        return name_off, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = ko.index(b"\0", str_off + name_off)
        if ko[str_off + name_off : end] == b".modinfo":
            info: dict[str, str] = {}
            for item in ko[offset : offset + size].split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep:
                    info.setdefault(key.decode(errors="replace"), value.decode(errors="replace"))
            return info
    return {}


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing .ko.xz (Debian 12 ships plain .ko; later ones xz)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise ConfigError(f"{path.name}: zstd-compressed modules are not supported")
    return data


def scan_modules(moddir: Path, wanted: list[str] | None = None) -> ModuleIndex:
    """Index the modules under moddir (lib/modules/<version>): modules.dep when present, else
    every .ko's .modinfo. With `wanted`, only the dependency closure of those names is read."""
    moddir = Path(moddir)
    dep_file = moddir / "modules.dep"
    if dep_file.is_file():
        return parse_modules_dep(dep_file.read_text())
    idx = ModuleIndex()
    for p in sorted(moddir.rglob("*.ko*")):
        name = module_name(p.name)
        idx.paths.setdefault(name, str(p.relative_to(moddir)))
    todo = list(wanted) if wanted is not None else list(idx.paths)
    while todo:
        name = todo.pop()
        if name in idx.deps or name not in idx.paths:
            continue
        depends = modinfo(read_module(moddir / idx.paths[name])).get("depends", "")
        idx.deps[name] = [d.replace("-", "_") for d in depends.split(",") if d]
        todo.extend(idx.deps[name])
    return idx


def read_builtin(moddir: Path) -> set[str]:
    f = Path(moddir) / "modules.builtin"
    return (
        {module_name(line.strip()) for line in f.read_text().splitlines() if line.strip()}
        if f.is_file()
        else set()
    )


def resolve_modules(idx: ModuleIndex, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(load order, skipped): every wanted module after its dependencies, each once.

    Modules the index does not have are skipped (built into the kernel, or absent); a dependency
    cycle raises ConfigError."""
    order: list[str] = []
    skipped: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ConfigError(f"kernel module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in idx.paths:
            if name not in skipped:
                skipped.append(name)
            state[name] = 2
            return
        state[name] = 1
        for dep in idx.deps.get(name, []):
            visit(dep, chain + (name,))
        state[name] = 2
        order.append(name)

    for w in wanted:
        visit(w, ())
    return order, skipped


# --- the image -----------------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/sh
# corral debian guest: /init (PID 1). Boot args after "--" on the kernel command line are run
# as a command instead of the interactive shell; the guest powers off when either ends.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root TERM=${TERM:-vt100}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
kver=$(uname -r)
for m in $(cat /etc/corral/modules); do
    insmod "/lib/modules/$kver/$m" 2>/dev/null || echo "corral: could not load ${m##*/}"
done
hostname corral
ip link set lo up 2>/dev/null
echo
echo "corral debian guest: $kver"
if [ $# -gt 0 ]; then
    "$@"
    echo "corral: command exited with status $?"
else
    echo "corral: root shell on the serial console; exit it to power off"
    setsid cttyhack sh -l
fi
sync
poweroff -f
"""

FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/shadow": "root::0:0:99999:7:::\n",
    "etc/group": "root:x:0:\ntty:x:5:\n",
    "etc/hostname": "corral\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tcorral\n",
    "etc/profile": 'export PS1="\\h:\\w\\$ "\nexport PATH=/sbin:/usr/sbin:/bin:/usr/bin\n',
    "etc/fstab": "",
}


def busybox_applets(busybox: Path) -> list[str]:
    """Applet install paths ("bin/sh", "sbin/insmod", ...) from `busybox --list-full`."""
    try:
        res = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConfigError(
            f"cannot run {busybox} --list-full ({exc}): is it a static x86-64 busybox?"
        ) from None
    return sorted({line.strip().lstrip("/") for line in res.stdout.splitlines() if line.strip()})


@dataclass
class InitramfsInfo:
    kernel_version: str
    modules: list[str]  # in load order
    skipped: list[str]  # wanted but not modular in this kernel
    size: int


def build_initramfs(
    modules_root: Path, busybox: Path, out: Path, wanted: list[str] | None = None
) -> InitramfsInfo:
    """Write a gzip-compressed newc initramfs to `out`.

    modules_root: the extracted kernel package's lib/modules/<version> directory.
    busybox: the static busybox binary (busybox-static's bin/busybox).
    """
    modules_root, busybox = Path(modules_root), Path(busybox)
    kver = modules_root.name
    wanted = DEFAULT_MODULES if wanted is None else wanted
    idx = scan_modules(modules_root, wanted)
    order, skipped = resolve_modules(idx, wanted)

    w = CpioWriter(mtime=0)
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "etc/corral",
        f"lib/modules/{kver}",
        "mnt",
    ):
        w.add_dir(d, 0o1777 if d == "tmp" else (0o700 if d == "root" else 0o755))
    w.add_device("dev/console", "c", 5, 1)
    w.add_device("dev/null", "c", 1, 3, 0o666)
    w.add_device("dev/ttyS0", "c", 4, 64, 0o620)
    w.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        if applet not in w:
            w.add_symlink(applet, "/bin/busybox")
    w.add_file("init", INIT_SCRIPT.encode(), 0o755)
    for name, text in FILES.items():
        w.add_file(name, text.encode(), 0o600 if name == "etc/shadow" else 0o644)

    load_list = []
    for name in order:
        rel = idx.paths[name]
        plain = rel
        for ext in (".xz", ".gz"):
            plain = plain.removesuffix(ext)
        w.add_file(f"lib/modules/{kver}/{plain}", read_module(modules_root / rel), 0o644)
        load_list.append(plain)
    w.add_file("etc/corral/modules", "".join(f"{m}\n" for m in load_list).encode())
    dep_lines = []
    for n in order:
        deps = " ".join(_plain(idx.paths[d]) for d in idx.deps.get(n, []) if d in idx.paths)
        dep_lines.append(f"{_plain(idx.paths[n])}: {deps}\n")
    w.add_file(f"lib/modules/{kver}/modules.dep", "".join(dep_lines).encode())
    if (modules_root / "modules.builtin").is_file():
        w.add_file(f"lib/modules/{kver}/modules.builtin", (modules_root / "modules.builtin").read_bytes())

    data = gzip.compress(w.to_bytes(), compresslevel=9, mtime=0)
    from corral.images.cache import atomic_write

    atomic_write(Path(out), data)
    return InitramfsInfo(kver, order, skipped, len(data))


def _plain(rel: str) -> str:
    for ext in (".xz", ".gz"):
        rel = rel.removesuffix(ext)
    return rel


__all__ = [
    "DEFAULT_MODULES",
    "INIT_SCRIPT",
    "CpioEntry",
    "CpioWriter",
    "InitramfsInfo",
    "ModuleIndex",
    "build_initramfs",
    "busybox_applets",
    "modinfo",
    "module_name",
    "parse_cpio",
    "parse_modules_dep",
    "read_builtin",
    "resolve_modules",
    "scan_modules",
]
