"""The lab works: a real SVM-backed /dev/kvm, kvm_amd, corral sees hardware virtualization, and
corral boots the probe guest there."""

from __future__ import annotations

import re
import time

import pytest

from labhost import CORRAL, PYTHON, VENV_BIN

pytestmark = pytest.mark.lab


KVM_API_SNIPPET = (
    "import fcntl, os; fd = os.open('/dev/kvm', os.O_RDWR); "
    "print('api', fcntl.ioctl(fd, 0xAE00, 0))"
)


def test_dev_kvm_exists(lab):
    res = lab.run("test -c /dev/kvm && ls -l /dev/kvm", timeout=30)
    assert res.status == 0, res.output


def test_kvm_amd_loaded(lab):
    res = lab.run("cat /proc/modules", timeout=30)
    assert res.status == 0, res.output
    names = {line.split()[0] for line in res.output.splitlines() if line.strip()}
    assert "kvm_amd" in names, res.output
    assert "kvm" in names, res.output


def test_cpu_has_svm(lab):
    res = lab.run("grep -m1 -o -w svm /proc/cpuinfo", timeout=30)
    assert res.status == 0 and res.output.strip() == "svm", res.output


def test_kvm_api_version(lab):
    res = lab.run(f"{PYTHON} -c \"{KVM_API_SNIPPET}\"", timeout=120)
    assert res.status == 0, res.output
    assert "api 12" in res.output, res.output


def test_corral_doctor_reports_svm(lab):
    res = lab.run(f"{CORRAL} doctor", timeout=180)
    assert res.status == 0, res.output
    assert re.search(r"virtualization\W+hardware \(AMD-V\)", res.output), res.output
    assert "PVM" not in res.output, res.output


def test_tmpfs_is_writable_and_host_root_is_not(lab):
    res = lab.run(f"echo x > /tmp/lab-probe && cat /tmp/lab-probe && ! touch {VENV_BIN}/.lab-write 2>/dev/null",
                  timeout=30)
    assert res.status == 0 and res.output.strip() == "x", res.output


def test_timeout_kills_the_command_and_the_lab_stays_usable(lab):
    t0 = time.monotonic()
    res = lab.run("sleep 60 & sleep 60; echo not-reached", timeout=2)
    assert res.status == 137, res
    assert "not-reached" not in res.output
    assert time.monotonic() - t0 < 20
    again = lab.run("echo still-here", timeout=30)
    assert again.status == 0 and again.output == "still-here\n", again


def _probe_path(probe_build) -> str:
    path, reason = probe_build
    if path is None:
        pytest.skip(reason)
    return str(path)


def test_probe_smp_under_corral_in_lab(lab, probe_build):
    probe = _probe_path(probe_build)
    res = lab.run(f"{CORRAL} run --kernel {probe} --cmdline smp --cpus 2", timeout=300)
    results = dict(kv for line in res.output.splitlines() if line.startswith("RESULT ")
                   for kv in re.findall(r"(\w+)=(\S+)", line))
    assert res.status == 0, res.output
    assert results.get("cpus") == "2", res.output


def test_timings(lab, record_property):
    """Not a pass/fail check: what the lab costs (shown with -s, and in the junit properties)."""
    timings = {"lab_boot_s": lab.boot_seconds}
    for name, cmd in (("python_pass_s", f"{PYTHON} -c pass"),
                      ("corral_doctor_s", f"{CORRAL} doctor >/dev/null")):
        t0 = time.monotonic()
        res = lab.run(cmd, timeout=180)
        timings[name] = time.monotonic() - t0
        assert res.status == 0, res.output
    for k, v in timings.items():
        record_property(k, round(v, 2))
    print("lab timings: " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
