"""Debian packages without installing them: `apt-get download` + `dpkg-deb -x`.

A reusable helper (the lab harness uses it too):

    fetch_debs(["linux-image-6.1.0-56-cloud-amd64", "busybox-static"], dest) -> {name: Path}
    extract_deb(deb, root) -> root
    resolve_kernel_package("cloud") -> "linux-image-6.1.0-56-cloud-amd64"

Nothing needs root and nothing is installed system-wide. apt's own signature checks cover the
downloads; corral's image cache adds its own checksums on what it builds from them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote

from corral.errors import ConfigError, HostError
from corral.images.cache import atomic_move, sweep_stale

KERNEL_METAPACKAGES = {
    "cloud": "linux-image-cloud-amd64",
    "generic": "linux-image-amd64",
}

_NETWORK_PATTERNS = (
    "Temporary failure resolving",
    "Could not resolve",
    "Could not connect",
    "Unable to connect",
    "Connection refused",
    "Connection timed out",
    "Connection failed",
    "Network is unreachable",
    "No route to host",
    "Could not wait for server fd",
)


class AptError(ConfigError):
    """An apt command failed; `kind` is what classify_apt_error() made of its output."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify_apt_error(output: str) -> str:
    """Sort apt's error output into "network", "stale" (lists out of date: 404),
    "unknown-package" or "other"."""
    if (
        "Unable to locate package" in output
        or "No packages found" in output
        or "has no installation candidate" in output
    ):
        return "unknown-package"
    if "Failed to fetch" in output and re.search(r"\b404\b", output):
        return "stale"
    if any(p in output for p in _NETWORK_PATTERNS):
        return "network"
    if "Failed to fetch" in output:
        return "network"
    return "other"


def _network_detail(output: str) -> str:
    """A short reason from apt's "E: Failed to fetch URL  reason" line."""
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("E: Failed to fetch"):
            rest = line[len("E: Failed to fetch") :].strip()
            parts = rest.split(None, 1)  # URL, then the reason
            reason = parts[1].strip() if len(parts) > 1 else rest
            return reason.split(" - ")[0].strip().rstrip(".")
    for line in output.splitlines():
        if any(p in line for p in _NETWORK_PATTERNS):
            return line.strip().removeprefix("E: ").split(" - ")[0].strip().rstrip(".")
    return "download failed"


def apt_error(output: str, packages: list[str]) -> AptError:
    """The one-line ConfigError for a failed apt command's output."""
    kind = classify_apt_error(output)
    if kind == "network":
        return AptError(
            f"cannot reach the Debian package archive ({_network_detail(output)}): "
            "check the network or apt sources",
            kind,
        )
    if kind == "unknown-package":
        m = re.search(r"Unable to locate package (\S+)", output)
        name = m.group(1) if m else ", ".join(packages)
        hint = (
            "run `apt-get update` as root, or check the name"
            if os.geteuid() != 0
            else "check the name and the apt sources"
        )
        return AptError(f"apt does not know the Debian package '{name}': {hint}", kind)
    if kind == "stale":
        return AptError(
            "the Debian package archive no longer has the version apt expects (404): "
            "run `apt-get update` as root",
            kind,
        )
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.startswith("E:")), "")
    return AptError(
        f"apt failed for {', '.join(packages)}: {last.removeprefix('E: ') or 'unknown error'}", kind
    )


def _apt_base(cmd: str) -> list[str]:
    exe = shutil.which(cmd)
    if exe is None:
        raise HostError(
            f"{cmd} not found: corral's Debian images need a Debian-based host (apt-get, apt-cache, dpkg-deb)"
        )
    args = [exe]
    if os.geteuid() == 0 and cmd == "apt-get":
        # Download as root into our own directory; apt's _apt sandbox user cannot write there.
        args += ["-o", "APT::Sandbox::User=root"]
    return args


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def _apt_update() -> None:
    res = _run(_apt_base("apt-get") + ["update", "-qq"])
    if res.returncode != 0:
        raise apt_error(res.stdout + res.stderr, ["(apt-get update)"])


def _with_update_retry(func, packages: list[str]):
    """Run func(); if apt does not know a package (or its lists are stale) and we are root,
    run `apt-get update` once and retry."""
    try:
        return func()
    except AptError as exc:
        if exc.kind not in ("unknown-package", "stale") or os.geteuid() != 0:
            raise
    _apt_update()
    return func()


# --- kernel package -----------------------------------------------------------------------------


def resolve_kernel_package(flavour: str) -> str:
    """ "cloud" / "generic" (or a metapackage name) -> the versioned linux-image package apt would
    install now, e.g. linux-image-6.1.0-56-cloud-amd64. A versioned name is returned as is."""
    if re.fullmatch(r"linux-image-\d.*", flavour):
        return flavour
    meta = KERNEL_METAPACKAGES.get(flavour, flavour)
    if meta not in KERNEL_METAPACKAGES.values() and not meta.startswith("linux-image-"):
        known = ", ".join(KERNEL_METAPACKAGES)
        raise ConfigError(f"unknown kernel flavour '{flavour}': choose one of {known}")

    def lookup() -> str:
        res = _run(_apt_base("apt-cache") + ["depends", meta])
        out = res.stdout + res.stderr
        if res.returncode != 0 or not res.stdout.strip():
            raise apt_error(out or "E: No packages found", [meta])
        for line in res.stdout.splitlines():
            m = re.match(r"\s*\|?Depends:\s*(linux-image-\d\S*)", line)
            if m:
                return m.group(1)
        raise ConfigError(f"cannot find the kernel package behind '{meta}' in `apt-cache depends`")

    return _with_update_retry(lookup, [meta])


# --- downloading ----------------------------------------------------------------------------------


def _package_sizes(packages: list[str]) -> dict[str, int]:
    """Package -> download size in bytes, from apt-cache (empty where unknown)."""
    res = _run(_apt_base("apt-cache") + ["show", "--no-all-versions", *packages])
    sizes: dict[str, int] = {}
    name = None
    for line in res.stdout.splitlines():
        if line.startswith("Package:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Size:") and name and name not in sizes:
            with contextlib.suppress(ValueError):
                sizes[name] = int(line.split(":", 1)[1])
    return sizes


def _deb_package_name(filename: str) -> str:
    return unquote(filename).split("_", 1)[0]


def _bare_name(spec: str) -> str:
    """ "pkg=1.2" / "pkg/bookworm" / "pkg:amd64" -> "pkg"."""
    return re.split(r"[=/:]", spec, maxsplit=1)[0]


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def _download(packages: list[str], workdir: Path, progress: bool) -> None:
    args = _apt_base("apt-get") + ["download", *packages]
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    show = progress and sys.stderr.isatty()
    if not show:
        res = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise apt_error(res.stdout + res.stderr, packages)
        return

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TransferSpeedColumn,
    )

    sizes = _package_sizes(packages)
    total = sum(sizes.get(_bare_name(p), 0) for p in packages) or None
    label = ", ".join(f"{_bare_name(p)}" for p in packages)
    if len(label) > 60:
        label = f"{len(packages)} Debian packages"
    proc = subprocess.Popen(
        args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    captured: list[str] = []

    def pump(stream) -> None:
        for line in stream:
            captured.append(line)

    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for t in threads:
        t.start()
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]downloading[/bold] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    ]
    try:
        with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task(label, total=total)
            while proc.poll() is None:
                bar.update(task, completed=_dir_bytes(workdir))
                time.sleep(0.1)
            done = _dir_bytes(workdir)
            bar.update(task, completed=done if proc.returncode else (total or done), total=total or done)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    for t in threads:
        t.join()
    if proc.returncode != 0:
        raise apt_error("".join(captured), packages)


def fetch_debs(packages: list[str], dest: Path, *, progress: bool = True) -> dict[str, Path]:
    """Download the given Debian packages (current candidate versions, no dependencies) into
    `dest` and return {package: path of its .deb}.

    `apt-get download` runs as the current user in a temporary directory inside `dest`; each .deb
    is renamed into `dest` only once every download succeeded, so a failure or interruption leaves
    nothing half-written. A rich progress bar is shown on a terminal unless progress=False.
    Raises ConfigError with one clear line when the archive cannot be reached or apt does not
    know a package (after one `apt-get update` if we are root).
    """
    if not packages:
        return {}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    workdir = Path(tempfile.mkdtemp(prefix=f".debs.tmp-{os.getpid()}-", dir=dest))
    try:
        _with_update_retry(lambda: _download(list(packages), workdir, progress), list(packages))
        found = {_deb_package_name(p.name): p for p in workdir.glob("*.deb")}
        result: dict[str, Path] = {}
        for spec in packages:
            name = _bare_name(spec)
            if name not in found:
                raise ConfigError(f"apt-get download did not produce a .deb for '{spec}'")
            result[spec] = dest / found[name].name
        for spec, final in result.items():
            atomic_move(found[_bare_name(spec)], final)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- extracting -----------------------------------------------------------------------------------


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files into `dest` (like `dpkg-deb -x`) and return `dest`.

    When `dest` does not exist it appears only once extraction succeeded; otherwise the package's
    files are merged into it (so several packages can share one root).
    """
    deb, dest = Path(deb), Path(dest)
    if not deb.is_file():
        raise ConfigError(f"no such package file: {deb}")
    exe = shutil.which("dpkg-deb")
    if exe is None:
        raise HostError("dpkg-deb not found: corral's Debian images need a Debian-based host")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    try:
        res = subprocess.run([exe, "-x", str(deb), str(tmp)], capture_output=True, text=True)
        if res.returncode != 0:
            raise ConfigError(
                f"cannot unpack {deb.name}: {res.stderr.strip().splitlines()[-1:] or '?'}"
                f": delete it and fetch again"
            )
        if not dest.exists():
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
            return dest
        _merge_tree(tmp, dest)
        return dest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge_tree(src: Path, dest: Path) -> None:
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        target = dest / rel
        target.mkdir(parents=True, exist_ok=True)
        for d in list(dirs):
            s = Path(root) / d
            if s.is_symlink():  # os.walk lists symlinks to directories as dirs
                dirs.remove(d)
                _replace(s, target / d)
        for f in files:
            _replace(Path(root) / f, target / f)


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(src, dst)
