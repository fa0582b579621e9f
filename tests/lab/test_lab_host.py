"""The lab works: a real SVM-backed /dev/kvm, kvm_amd, corral sees hardware virtualization, and
corral boots the probe guest there."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from support.labhost import CORRAL, PYTHON, VENV_BIN
from support.results import parse_output
from support.scenarios import SCENARIOS, Outcome, Scenario

KVM_API_SNIPPET = (
    "import fcntl, os; fd = os.open('/dev/kvm', os.O_RDWR); print('api', fcntl.ioctl(fd, 0xAE00, 0))"
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
    res = lab.run(f'{PYTHON} -c "{KVM_API_SNIPPET}"', timeout=120)
    assert res.status == 0, res.output
    assert "api 12" in res.output, res.output


def test_corral_doctor_reports_svm(lab):
    res = lab.run(f"{CORRAL} doctor", timeout=180)
    assert res.status == 0, res.output
    assert re.search(r"virtualization\W+hardware \(AMD-V\)", res.output), res.output
    assert "PVM" not in res.output, res.output


def test_tmpfs_is_writable_and_host_root_is_not(lab):
    res = lab.run(
        f"echo x > /tmp/lab-probe && cat /tmp/lab-probe && ! touch {VENV_BIN}/.lab-write 2>/dev/null",
        timeout=30,
    )
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


TESTS_DIR = Path(__file__).resolve().parents[1]  # on PYTHONPATH, `support` imports from there
# the probe scenarios the lab boots under corral on real SVM (support/scenarios.py, with the
# lab's differences there), each once, with its first vCPU count; and idle, which never exits
LAB_SCENARIOS = [name for name, sc in SCENARIOS.items() if "lab" in sc.runners]
LAB_DISK = "/tmp/lab-probe.img"
LAB_TAP = "crlp0"


def _corral_options(sc: Scenario, cpus: int) -> str:
    opts = [f"--cpus {cpus}"] if cpus > 1 else []
    if sc.memory:
        opts.append(f"--memory {sc.memory}")
    if sc.disk:
        opts.append(f"--disk {LAB_DISK}" + (f",serial={sc.disk.serial}" if sc.disk.serial else ""))
    if sc.net:
        opts.append(f"--net tap={LAB_TAP}")
    return " ".join(opts)


@pytest.mark.parametrize("name", LAB_SCENARIOS + ["idle"])
def test_probe_scenarios_under_corral_in_lab(lab, probe_build, name):
    probe = _probe_path(probe_build)
    if name == "idle":  # idle never exits: still running when stopped through --api
        stop = f"{PYTHON} -c 'import sys; from corral.api import ControlClient; ControlClient(sys.argv[1]).stop()'"
        run = (
            f"{CORRAL} run --kernel {probe} --cmdline idle --api /tmp/idle.sock > /tmp/idle.out 2>&1 & VM=$!; "
            "for i in $(seq 240); do grep -q 'probe: idle' /tmp/idle.out && break; sleep 0.5; done; sleep 2; "
            f"kill -0 $VM && echo STILL_RUNNING; {stop} /tmp/idle.sock; wait $VM; echo IDLE_EXIT=$?; cat /tmp/idle.out"
        )
        res = lab.run(run + " </dev/null", timeout=300)
        assert "STILL_RUNNING" in res.output and "probe: idle" in res.output, res.output
        assert "stopped through the control socket" in res.output, res.output
        return
    sc = SCENARIOS[name].on("lab")
    cpus = sc.cpus[0]
    prepare = ""
    if sc.disk:  # the patterned disk blk-check reads (support/disks.py)
        prepare = (
            f"PYTHONPATH={TESTS_DIR} {PYTHON} -c 'from pathlib import Path; "
            "from support.disks import patterned_image; "
            f'patterned_image(Path("{LAB_DISK}"), {sc.disk.sectors})\' && '
        )
    run = f"{CORRAL} run --kernel {probe} --cmdline '{sc.cmdline}' {_corral_options(sc, cpus)}"
    res = lab.run(prepare + run + " </dev/null", timeout=300)
    results, progress = parse_output(res.output)
    # status and RESULT values; the table's whole-run checks need this host's view of the run
    sc.verify(Outcome(res.status, results, progress, res.output, cpus), checks=False)


def test_timings(lab, record_property):
    """Not a pass/fail check: what the lab costs (shown with -s, and in the junit properties)."""
    timings = {"lab_boot_s": lab.boot_seconds}
    for name, cmd in (
        ("python_pass_s", f"{PYTHON} -c pass"),
        ("corral_doctor_s", f"{CORRAL} doctor >/dev/null"),
    ):
        t0 = time.monotonic()
        res = lab.run(cmd, timeout=180)
        timings[name] = time.monotonic() - t0
        assert res.status == 0, res.output
    for k, v in timings.items():
        record_property(k, round(v, 2))
    print("lab timings: " + ", ".join(f"{k}={v:.2f}" for k, v in timings.items()))
