"""Fixtures for the lab tests: one QEMU TCG lab host (emulated AMD SVM) per test session.

Lab tests carry @pytest.mark.lab and run when asked for: `make test` (the README's test command,
and CI) sets CORRAL_LAB=1, `make lab` runs them alone (`pytest -m lab`). A bare `pytest` skips
them: the lab takes about five minutes, and its first run downloads Debian's generic kernel.

On a failing lab test the report gets the lab's serial log (kernel console, QEMU's stderr and
the command channel) as an extra section.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from support.labhost import REPO, LabHost

LAB_KEY = pytest.StashKey[LabHost]()
LAB_NEW_KEY = pytest.StashKey[LabHost]()


def _lab_requested(config: pytest.Config) -> bool:
    if os.environ.get("CORRAL_LAB") == "1":
        return True
    markexpr = config.getoption("markexpr", "") or ""
    return "lab" in markexpr and "not lab" not in markexpr


def pytest_collection_modifyitems(config, items):
    requested = _lab_requested(config)
    no_qemu = shutil.which("qemu-system-x86_64") is None
    for item in items:
        if "lab" not in item.keywords:
            continue
        if not requested:
            item.add_marker(
                pytest.mark.skip(reason="lab tests run with `make lab` (pytest -m lab) or CORRAL_LAB=1")
            )
        elif no_qemu:
            item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 not installed"))


@pytest.fixture(scope="session")
def probe_build():
    """The probe guest, built on the host *before* the lab boots (the lab sees the host's files
    through a 9p share with cached metadata). Returns (path, None) or (None, reason)."""
    try:
        from corral.images.probe import build_probe
    except ImportError as exc:
        return None, f"corral.images.probe is not available yet: {exc}"
    try:
        return Path(build_probe()), None
    except Exception as exc:  # noqa: BLE001 - reported by the probe tests, not by every lab test
        return None, f"build_probe() failed: {type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def debian_build():
    """The debian image (bzImage, PVH vmlinux, initramfs), fetched on the host before the lab
    boots. Returns ({"bzimage", "vmlinux", "initrd"} paths, None) or (None, reason)."""
    try:
        from corral.images.debian_image import resolve_bzimage, resolve_pvh

        bz, initrd = resolve_bzimage()
        vmlinux, _ = resolve_pvh()
    except Exception as exc:  # noqa: BLE001 - reported by the Debian tests, not by every lab test
        return None, f"the debian image is not available: {type(exc).__name__}: {exc}"
    return {"bzimage": bz, "vmlinux": vmlinux, "initrd": initrd}, None


@pytest.fixture(scope="session")
def debian_rootfs():
    """The lab's small Debian with systemd (tests/support/lab_rootfs.py), built on the host
    before the lab boots. Returns ({"kernel", "initrd", "image"}, None) or (None, reason)."""
    from support.lab_rootfs import ensure_rootfs

    from corral.errors import ConfigError, HostError
    from corral.images.cache import cache_root

    try:
        return ensure_rootfs(cache_root() / "lab"), None
    except (ConfigError, HostError) as exc:
        return None, f"the Debian root filesystem cannot be built here: {exc}"


@pytest.fixture(scope="session")
def boot32_build():
    """Debian's 686 kernel and a 32-bit init (tests/support/lab_boot32.py), built on the host
    before the lab boots. Returns ({"kernel", "initrd"}, None) or (None, reason)."""
    from support.lab_boot32 import ensure_boot32_images

    from corral.errors import ConfigError, HostError
    from corral.images.cache import cache_root

    try:
        return ensure_boot32_images(cache_root() / "lab"), None
    except (ConfigError, HostError) as exc:
        return None, f"the 32-bit guest cannot be built here: {exc}"


@pytest.fixture(scope="session")
def compiled_checkout():
    """corral's bytecode, written on the host before a lab boots. The lab mounts the checkout
    read-only and runs with PYTHONDONTWRITEBYTECODE, so without it every corral command there
    compiles ~120 modules from source under TCG: 20-40 s for a `corral balloon` client, past
    the lab tests' 30 s timeouts. (Whether earlier tests had left the bytecode behind decided
    test_lab_devices' outcome.)"""
    compileall.compile_dir(REPO / "src" / "corral", quiet=1)


@pytest.fixture(scope="session")
def lab(request, compiled_checkout, probe_build, debian_build, debian_rootfs, boot32_build):
    """The booted lab host, shared by every lab test of the session."""
    from support.labhost import ensure_lab_images

    from corral.errors import ConfigError, HostError

    try:
        kernel, initrd = ensure_lab_images()
    except (ConfigError, HostError) as exc:  # no Debian archive or apt here: nothing to boot
        pytest.skip(f"the lab's kernel cannot be built on this host: {exc}")
    host = LabHost(kernel=kernel, initrd=initrd, extra_append=os.environ.get("CORRAL_LAB_APPEND", ""))
    t0 = time.monotonic()
    host.start()  # raises LabError with the serial log when the lab does not come up
    request.config.stash[LAB_KEY] = host
    sys.stderr.write(
        f"\n[lab] up in {time.monotonic() - t0:.1f} s (boot to command prompt {host.boot_seconds:.1f} s)\n"
    )
    try:
        yield host
    finally:
        host.close()
        host.cleanup()


@pytest.fixture(scope="session")
def lab_new(request, compiled_checkout, debian_build):
    """A second lab host on a newer QEMU (bookworm-backports', fetched into corral's cache by
    tests/support/lab_qemu.py), for what bookworm's QEMU 7.2 cannot emulate: hardware breakpoints
    in a nested guest. Boots only in sessions that run such a test; the others keep `lab`."""
    from support.lab_qemu import ensure_lab_qemu
    from support.labhost import ensure_lab_images, lab_cache_dir

    from corral.errors import ConfigError, HostError

    try:
        kernel, initrd = ensure_lab_images()
        qemu = ensure_lab_qemu(lab_cache_dir())
    except (ConfigError, HostError) as exc:  # no Debian archive or apt here
        pytest.skip(f"the lab on a newer QEMU cannot be set up on this host: {exc}")
    host = LabHost(
        qemu=str(qemu.binary),
        qemu_data=qemu.datadir,
        kernel=kernel,
        initrd=initrd,
        extra_append=os.environ.get("CORRAL_LAB_APPEND", ""),
    )
    t0 = time.monotonic()
    host.start()
    request.config.stash[LAB_NEW_KEY] = host
    sys.stderr.write(f"\n[lab_new] QEMU {qemu.version} up in {time.monotonic() - t0:.1f} s\n")
    try:
        yield host
    finally:
        host.close()
        host.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or "lab" not in item.keywords:
        return
    key = LAB_NEW_KEY if "lab_new" in getattr(item, "fixturenames", ()) else LAB_KEY
    host = item.config.stash.get(key, None)
    if host is None:
        return
    try:
        log = host.serial_log()
    except Exception as exc:  # noqa: BLE001 - never let the log hide the real failure
        log = f"(cannot read the lab's serial log: {exc})"
    report.sections.append(("lab serial log", log))


@pytest.fixture(scope="session")
def memtest_build():
    """memtest86+x64.bin from Debian's pinned memtest86+ package (tests/support/lab_memtest.py),
    fetched on the host. Returns (path, None) or (None, reason)."""
    from support.lab_memtest import ensure_memtest

    from corral.errors import ConfigError, HostError

    try:
        return ensure_memtest(), None
    except (ConfigError, HostError) as exc:
        return None, f"memtest86+ cannot be fetched here: {exc}"
