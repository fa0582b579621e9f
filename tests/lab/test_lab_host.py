"""The lab works: a real SVM-backed /dev/kvm, kvm_amd, corral sees hardware virtualization, and
corral boots the probe guest there."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from labhost import CORRAL, PYTHON, VENV_BIN



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


TESTS_DIR = Path(__file__).resolve().parents[1]
# every probe scenario under corral in the lab, on real SVM: (cmdline, corral options, RESULT checks)
PROBE_SCENARIOS = {
    "hello": ("hello", "", {"hello": "1"}),
    "smp": ("smp", "--cpus 2", {"cpus": "2"}),
    "timer": ("timer", "", {}),
    "pio-bench": ("pio-bench 20000", "", {"pio_exits": "20000"}),
    "mmio-bench": ("mmio-bench 20000", "", {"mmio_exits": "20000"}),
    "mem-touch": ("mem-touch 64M", "--memory 256M", {"ok": "1"}),
    "idle": ("idle", "", {}),
    "blk-check": ("blk-check", "--disk /tmp/lab-probe.img,serial=lab-1", {"blk_ok": "1", "blk_serial": "lab-1"}),
    "blk-bench": ("blk-bench rand4k 2000", "--disk /tmp/lab-probe.img", {"blk_ops": "2000", "blk_errors": "0"}),
    "net-bench": ("net-bench 2000", "--net tap=crlp0", {"net_tx_frames": "2000"}),
}


@pytest.mark.parametrize("name", list(PROBE_SCENARIOS))
def test_probe_scenarios_under_corral_in_lab(lab, probe_build, name):
    probe = _probe_path(probe_build)
    cmdline, options, expect = PROBE_SCENARIOS[name]
    prepare = ""
    if "lab-probe.img" in options:      # the patterned disk blk-check reads (tests/virtio_fixtures.py)
        prepare = (f"{PYTHON} -c 'import sys; sys.path.insert(0, \"{TESTS_DIR}\"); from pathlib import Path; "
                   "from virtio_fixtures import patterned_image; patterned_image(Path(\"/tmp/lab-probe.img\"), 4096)' && ")
    if name == "idle":                  # idle never exits: still running when stopped through --api
        stop = f"{PYTHON} -c 'import sys; from corral.api import call; call(sys.argv[1], {{\"op\": \"stop\"}})'"
        run = (f"{CORRAL} run --kernel {probe} --cmdline idle --api /tmp/idle.sock > /tmp/idle.out 2>&1 & VM=$!; "
               "for i in $(seq 240); do grep -q 'probe: idle' /tmp/idle.out && break; sleep 0.5; done; sleep 2; "
               f"kill -0 $VM && echo STILL_RUNNING; {stop} /tmp/idle.sock; wait $VM; echo IDLE_EXIT=$?; cat /tmp/idle.out")
    else:
        run = f"{CORRAL} run --kernel {probe} --cmdline '{cmdline}' {options}"
    res = lab.run(prepare + run + " </dev/null", timeout=300)
    results = dict(kv for line in res.output.splitlines() if line.startswith("RESULT ")
                   for kv in re.findall(r"(\w+)=(\S+)", line))
    if name == "idle":
        assert "STILL_RUNNING" in res.output and "probe: idle" in res.output, res.output
        assert "stopped through the control socket" in res.output, res.output
        return
    assert res.status == 0, res.output
    for key, value in expect.items():
        assert results.get(key) == value, res.output
    if name == "timer":
        assert int(results.get("timer_ticks", "0")) > 0, res.output


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
