"""A 32-bit Linux guest for the lab: Debian's 686 kernel (bookworm's linux-image-686, i386) and
an initramfs whose /init is a static 32-bit program built here (boot32_init.c), so a boot that
reaches userspace says so in a line the kernel did not write.

The host's apt knows only amd64, and its configuration is not ours to change: apt-get runs
with a private state under <cache>/apt-i386 (its own sources list, i386 only, main only) to
find and download the kernel package. Only the bzImage is taken from it (no modules: the
guest needs none). Built on the host before the lab boots; cached under
<cache>/boot32-<recipe>/ (vmlinuz, initrd.img), appearing whole or not at all.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from corral.errors import ConfigError, HostError
from corral.images.cache import atomic_dir
from corral.images.initramfs import CpioWriter

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
KERNEL_META = "linux-image-686"
INIT_SOURCE = Path(__file__).with_name("boot32_init.c")
CFLAGS = [
    "-m32",
    "-static",
    "-nostdlib",
    "-ffreestanding",
    "-fno-pic",
    "-no-pie",
    "-O2",
    "-fno-stack-protector",
]
CFLAGS += ["-fcf-protection=none", "-Wl,--build-id=none", "-Wl,-e,_start"]
BANNER = "BOOT32-INIT: userspace runs, pointer size 4, machine i686"


def _recipe() -> str:
    text = repr((SUITE, MIRROR, KERNEL_META, INIT_SOURCE.read_text(), CFLAGS))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_boot32_images(cache: Path) -> dict[str, Path]:
    """{"kernel", "initrd"} of the lab's 32-bit guest, built once."""
    final = cache / f"boot32-{_recipe()}"
    if (final / "vmlinuz").is_file() and (final / "initrd.img").is_file():
        return _entry(final)
    with tempfile.TemporaryDirectory(prefix="corral-boot32-") as tmp:
        init = Path(tmp) / "init"
        _build_init(init)
        deb = _download_kernel(cache / "apt-i386", Path(tmp))
        with atomic_dir(final) as out:
            _extract_vmlinuz(deb, out / "vmlinuz")
            cpio = CpioWriter()
            cpio.add_device("dev/console", "c", 5, 1)
            cpio.add_file("init", init.read_bytes(), 0o755)
            (out / "initrd.img").write_bytes(cpio.to_bytes())
            (out / "kernel-package").write_text(deb.name + "\n")
    for old in cache.glob("boot32-*"):  # entries of older recipes are dead weight
        if old != final and old.is_dir() and ".tmp" not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return _entry(final)


def _build_init(out: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise HostError("gcc not found: `apt-get install gcc` (make test does)")
    res = subprocess.run([gcc, *CFLAGS, "-o", str(out), str(INIT_SOURCE)], capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise HostError(f"gcc -m32 cannot build the 32-bit init ({last}): `apt-get install gcc-multilib`")


def _apt(
    state: Path, tool: str, *args: str, cwd: Path | None = None, arch: str = "i386", suite: str = SUITE
) -> str:
    """apt-get/apt-cache with a private state (one architecture, one suite, main only): the
    host's own apt is left alone. apt still checks the archive's signature with the host's keys
    and every downloaded package against the signed checksums."""
    exe = shutil.which(tool)
    if exe is None:
        raise HostError(f"{tool} not found: the 32-bit lab guest needs a Debian-based host")
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    sources = state / "sources.list"
    sources.write_text(f"deb [arch={arch}] {MIRROR} {suite} main\n")
    opts = {
        "APT::Architecture": arch,
        "APT::Architectures::": arch,
        "Dir::State::Lists": state / "lists",
        "Dir::State::status": state / "status",
        "Dir::Cache": state / "cache",
        "Dir::Etc::SourceList": sources,
        "Dir::Etc::SourceParts": state / "no-parts",
        "APT::Sandbox::User": "root",
    }
    cmd = [exe] + [x for k, v in opts.items() for x in ("-o", f"{k}={v}")] + list(args)
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}
    )
    if res.returncode != 0:
        last = ((res.stdout + res.stderr).strip().splitlines() or ["?"])[-1]
        raise ConfigError(f"{tool} {args[0]} ({arch}, {MIRROR} {suite}) failed: {last}")
    return res.stdout


def _download_kernel(state: Path, into: Path) -> Path:
    _apt(state, "apt-get", "update", "-qq")
    deps = _apt(state, "apt-cache", "depends", KERNEL_META)
    m = re.search(r"Depends:\s*(linux-image-\d\S*-686)\b", deps)
    if m is None:
        raise ConfigError(f"cannot find the kernel package behind {KERNEL_META} (i386)")
    _apt(state, "apt-get", "download", m.group(1), cwd=into)
    deb = next(into.glob(f"{m.group(1)}_*_i386.deb"), None)
    if deb is None:
        raise ConfigError(f"apt-get download did not produce {m.group(1)}")
    return deb


def _extract_vmlinuz(deb: Path, out: Path) -> None:
    """Only ./boot/vmlinuz-* from the package's data, streamed (the modules are not needed)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    found = False
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            if re.fullmatch(r"\./boot/vmlinuz-[^/]+", member.name) and member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                out.write_bytes(src.read())
                found = True
                break
    proc.stdout.close()
    proc.kill()
    proc.wait()
    if not found:
        raise ConfigError(f"{deb.name} has no /boot/vmlinuz-*")


def _entry(d: Path) -> dict[str, Path]:
    return {"kernel": d / "vmlinuz", "initrd": d / "initrd.img"}
