"""Markers by folder, and the skips they imply: everything under tests/kvm is `kvm` (needs a
usable /dev/kvm), under tests/qemu `qemu` (needs qemu-system-x86_64), under tests/lab `lab`
(tests/lab/conftest.py decides when the lab runs). A test file sets no marker of its own for
its folder; a test that needs more (a QEMU test on /dev/kvm) adds that marker itself."""

import os
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FOLDER_MARKS = {"kvm": pytest.mark.kvm, "qemu": pytest.mark.qemu, "lab": pytest.mark.lab}


def _kvm_usable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission on /dev/kvm"
    return None


def _folder(item: pytest.Item) -> str | None:
    try:
        return item.path.resolve().relative_to(TESTS).parts[0]
    except ValueError:
        return None


@pytest.hookimpl(tryfirst=True)  # before tests/lab/conftest.py looks for the lab marker
def pytest_collection_modifyitems(config, items):
    kvm_reason = _kvm_usable()
    for item in items:
        mark = FOLDER_MARKS.get(_folder(item))
        if mark is not None:
            item.add_marker(mark)
        if kvm_reason and "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=kvm_reason))
        if "qemu" in item.keywords and not shutil.which("qemu-system-x86_64"):
            item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 not installed"))
