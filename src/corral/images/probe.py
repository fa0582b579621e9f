"""Build the probe test guest with the host's gcc, ld and objcopy.

Its sources ship inside the package (corral/guest/, package data), so an installed wheel builds
the probe as a checkout does; $CORRAL_GUEST_SRC points at another copy (a modified probe).
The result is one ELF32 file that boots through Multiboot v1 and through PVH (see
corral/guest/README.md for its command line and output).  Builds are cached by content:

    $XDG_CACHE_HOME/corral/probe/<first 16 hex of sha256(build recipe + every guest source)>/probe.elf

Each build runs in a temporary directory beside the cache entry, which is renamed into place
only when complete, so a half-built file is never visible.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from corral.errors import ConfigError

# Keep in sync with corral/guest/Makefile (which exists for building by hand).
CFLAGS = [
    "-m64",
    "-O2",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mcmodel=small",
    "-fcf-protection=none",
    "-fno-delete-null-pointer-checks",
    "--param=min-pagesize=0",
    "-Wall",
    "-Wextra",
    "-Werror",
]
ASFLAGS = ["-m64", "-fno-pic", "-fno-pie"]
LDFLAGS = [
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "-static",
    "-z",
    "max-page-size=0x1000",
    "-z",
    "noexecstack",
    "--no-warn-rwx-segments",
    "--build-id=none",
]
LINKER_SCRIPT = "probe.ld"
OUTPUT_NAME = "probe.elf"
SOURCE_SUFFIXES = (".c", ".S", ".h", ".ld")
_RECIPE_VERSION = "probe-build-1"
_STDERR_TAIL = 3000
# Package data beside this module. A plain path rather than importlib.resources: gcc needs real
# files, and pip installs a wheel as files.
PACKAGED_SOURCES = Path(__file__).resolve().parents[1] / "guest"


def probe_source_dir() -> Path:
    """The probe's source directory: $CORRAL_GUEST_SRC, else the package's corral/guest/."""
    env = os.environ.get("CORRAL_GUEST_SRC")
    src = Path(env).expanduser() if env else PACKAGED_SOURCES
    if not (src / LINKER_SCRIPT).is_file():
        hint = (
            "CORRAL_GUEST_SRC"
            if env
            else "the corral installation (reinstall corral, or set CORRAL_GUEST_SRC)"
        )
        raise ConfigError(
            f"the probe guest sources are not at {src}: check {hint}; it must hold "
            f"{LINKER_SCRIPT} and the .c/.S files"
        )
    return src


def _sources(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(SOURCE_SUFFIXES))


def source_digest(src: Path | None = None) -> str:
    """First 16 hex digits of the sha256 over the build recipe and every guest source file."""
    src = src or probe_source_dir()
    h = hashlib.sha256()
    h.update(repr((_RECIPE_VERSION, CFLAGS, ASFLAGS, LDFLAGS)).encode())
    for path in _sources(src):
        data = path.read_bytes()
        h.update(f"\0{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def probe_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "corral" / "probe"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ConfigError(
            f"building the probe guest needs '{name}', which is not on PATH: "
            f"install gcc and binutils (apt-get install gcc binutils)"
        )
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-_STDERR_TAIL:]
        raise ConfigError(
            f"building the probe guest failed: `{' '.join(cmd)}` exited with {proc.returncode}:\n{tail}"
        )


def _compile(src: Path, out: Path) -> Path:
    gcc, ld, objcopy = _tool("gcc"), _tool("ld"), _tool("objcopy")
    objs = []
    for path in _sources(src):
        if path.suffix == ".c":
            flags = CFLAGS
        elif path.suffix == ".S":
            flags = ASFLAGS
        else:
            continue
        obj = out / (path.stem + ".o")
        _run([gcc, *flags, "-I", str(src), "-c", str(path), "-o", str(obj)], src)
        objs.append(str(obj))
    elf64 = out / "probe64.elf"
    _run([ld, *LDFLAGS, "-T", str(src / LINKER_SCRIPT), "-o", str(elf64), *objs], src)
    final = out / OUTPUT_NAME
    _run([objcopy, "-O", "elf32-i386", str(elf64), str(final)], src)
    return final


def build_probe(force: bool = False) -> Path:
    """Build (or find cached) probe.elf and return its path."""
    src = probe_source_dir()
    entry = probe_cache_dir() / source_digest(src)
    target = entry / OUTPUT_NAME
    if target.is_file() and not force:
        return target
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{os.getpid()}-", dir=entry.parent))
    try:
        _compile(src, tmp)
        for leftover in tmp.glob("*.o"):
            leftover.unlink()
        if entry.exists() and (force or not target.is_file()):
            old = entry.with_name(f".{entry.name}.old-{os.getpid()}")
            os.replace(entry, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process finished the same build first: use its (identical) result.
            if not target.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
