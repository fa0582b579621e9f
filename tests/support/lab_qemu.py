"""A newer QEMU for the lab tests that bookworm's QEMU 7.2 cannot host: Debian's
bookworm-backports build (qemu-system-x86 10.x), fetched on demand and run from corral's cache,
never installed on the host.

Why: QEMU 7.2's TCG SVM loads the nested guest's DR7 from the VMCB in helper_vmrun (and the
host's back in do_vmexit) by assignment, not with cpu_x86_update_dr7, so TCG's breakpoint list
never holds the breakpoints KVM arms for its guest and a hardware breakpoint (gdb `hbreak`,
KVM_GUESTDBG_USE_HW_BP) in an L2 guest never fires. QEMU fixed that in 9.1 ("target/i386:
disable/enable breakpoints on vmentry/vmexit", 8aa76496dfaa, June 2024); with bookworm-backports'
10.0 the lab's hbreak test passes (measured 2026-11-30).

How: apt-get with a private state (bookworm-backports, amd64; tests/support/lab_boot32.py's
helper) downloads qemu-system-x86, -common and -data; apt checks the archive's signature with
the host's keys and each .deb against the signed SHA-256 sums, and the entry records the sums of
the .debs it was built from. `dpkg-deb -x` unpacks them into <corral cache>/lab/qemu-<version>-
<recipe>/ (whole or not at all). The binary finds its modules and data beside itself (QEMU's
installs are relocatable), and `-L <its share/qemu>` makes that explicit; its BIOS comes from the
firmware path Debian builds in (/usr/share/seabios: bookworm's seabios). Bookworm's libraries
satisfy it (checked with ldd when the entry is built).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ConfigError, HostError
from corral.images.cache import atomic_dir

SUITE = "bookworm-backports"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
BINARY = "usr/bin/qemu-system-x86_64"
DATADIR = "usr/share/qemu"
# what the lab needs the newer QEMU for: the DR7 fix above came in 9.1
MIN_VERSION = (9, 1)


@dataclass(frozen=True)
class LabQemu:
    binary: Path
    datadir: Path
    version: str


def _recipe() -> str:
    text = repr((SUITE, PACKAGES, BINARY, DATADIR, "lab-qemu-v1"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _entry(d: Path) -> LabQemu:
    return LabQemu(d / BINARY, d / DATADIR, (d / "version").read_text().strip())


def ensure_lab_qemu(cache: Path) -> LabQemu:
    """The backports QEMU from the cache, or fetched and unpacked now (about 13 MB of .debs)."""
    recipe = _recipe()
    # any complete entry of this recipe: no apt look-up once fetched
    for cand in sorted(cache.glob(f"qemu-*-{recipe}"), reverse=True) if cache.is_dir() else []:
        if (cand / BINARY).is_file() and (cand / "version").is_file():
            return _entry(cand)
    from support.lab_boot32 import _apt

    state = cache / "apt-backports"

    def apt(tool: str, *args: str, cwd: Path | None = None) -> str:
        return _apt(state, tool, *args, cwd=cwd, arch="amd64", suite=SUITE)

    apt("apt-get", "update", "-qq")
    policy = apt("apt-cache", "policy", PACKAGES[0])
    m = re.search(r"Candidate:\s*(\S+)", policy)
    if m is None or m.group(1) == "(none)":
        raise ConfigError(f"{PACKAGES[0]} is not in {SUITE}: no newer QEMU for the lab")
    version = m.group(1)
    with tempfile.TemporaryDirectory(prefix="corral-labqemu-") as tmp:
        debs_dir = Path(tmp) / "debs"
        debs_dir.mkdir()
        apt("apt-get", "download", *PACKAGES, cwd=debs_dir)
        debs = sorted(debs_dir.glob("*.deb"))
        if len(debs) != len(PACKAGES):
            raise ConfigError(f"apt-get download gave {[d.name for d in debs]}, wanted {PACKAGES}")
        upstream = re.sub(r"^\d+:", "", version).split("+", 1)[0]
        final = cache / f"qemu-{upstream}-{recipe}"
        with atomic_dir(final) as out:
            for deb in debs:
                res = subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], capture_output=True, text=True)
                if res.returncode != 0:
                    raise HostError(f"dpkg-deb -x {deb.name} failed: {res.stderr.strip()}")
            shutil.rmtree(out / "usr" / "share" / "doc", ignore_errors=True)
            sums = "".join(f"{hashlib.sha256(d.read_bytes()).hexdigest()}  {d.name}\n" for d in debs)
            (out / "debs.sha256").write_text(sums)
            _check_runs(out / BINARY)
            (out / "version").write_text(version + "\n")
    for old in cache.glob("qemu-*"):  # entries of other versions or recipes are dead weight (~80 MB)
        if old != final and old.is_dir() and ".tmp-" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return _entry(final)


def _check_runs(binary: Path) -> None:
    """The unpacked QEMU loads with this host's libraries and is new enough."""
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    missing = re.findall(r"^\s*(\S+) => not found", ldd.stdout, re.M)
    if missing:
        raise HostError(f"the lab's newer QEMU needs libraries this host lacks: {', '.join(missing)}")
    res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"QEMU emulator version (\d+)\.(\d+)", res.stdout)
    if res.returncode != 0 or m is None:
        raise HostError(f"{binary} --version failed: {(res.stdout + res.stderr).strip()[:300]}")
    if (int(m.group(1)), int(m.group(2))) < MIN_VERSION:
        raise ConfigError(f"{SUITE} has QEMU {m.group(1)}.{m.group(2)}; the lab needs {MIN_VERSION} or later")
