import os
import shutil

import pytest


def _kvm_usable() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission on /dev/kvm"
    return None


def pytest_collection_modifyitems(config, items):
    kvm_reason = _kvm_usable()
    for item in items:
        if kvm_reason and "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=kvm_reason))
        if "qemu" in item.keywords and not shutil.which("qemu-system-x86_64"):
            item.add_marker(pytest.mark.skip(reason="qemu-system-x86_64 not installed"))
