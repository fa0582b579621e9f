"""`corral run` end to end as a user runs it: exit codes, and one clear line for bad input."""

import os
import shutil
import subprocess
import sysconfig

import pytest
from support.cli import ROOT, corral, one_clear_line
from support.results import parse_results

from corral.images.probe import build_probe


@pytest.mark.kvm
def test_smp_probe_prints_cpus_and_exits_zero():
    r = corral("run", "--image", "probe", "--cmdline", "smp", "--cpus", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert parse_results(r.stdout)["cpus"] == "2", r.stdout


@pytest.mark.kvm
def test_exit_status_is_the_guest_exit_port_value():
    r = corral("run", "--image", "probe", "--cmdline", "no-such-scenario")
    assert r.returncode == 2, r.stdout + r.stderr


def test_missing_kernel_file(tmp_path):
    line = one_clear_line(corral("run", "--kernel", str(tmp_path / "nope")))
    assert "does not exist" in line and "nope" in line


def test_file_that_is_no_kernel(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello, I am not a kernel\n" * 100)
    line = one_clear_line(corral("run", "--kernel", str(junk)))
    assert "not a bzImage" in line


@pytest.mark.parametrize("memory,needle", [("0", "too small"), ("10T", "too large"), ("lots", "not a size")])
def test_bad_memory(memory, needle):
    line = one_clear_line(corral("run", "--image", "probe", "--memory", memory))
    assert needle in line


def test_zero_cpus():
    line = one_clear_line(corral("run", "--image", "probe", "--cpus", "0"))
    assert "cpus must be between 1 and" in line


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--disk", "a.img,colour=red"],
            "--disk: 'a.img,colour=red' has an unknown key 'colour': "
            "use PATH[,ro][,serial=ID][,overlay=FILE]",
        ),
        (
            ["--net", "user"],
            "--net: 'user' is not a tap: only tap networking exists: "
            "use tap[=NAME][,mac=MAC][,host-ip=ADDR/LEN]",
        ),
        (
            ["--vsock", "cid=2,uds=/tmp/v"],
            "--vsock cid=2,uds=/tmp/v: cid: Input should be greater than or equal to 3",
        ),
        (["--virtio-console", "file="], "--virtio-console: 'file=' gives 'file' no value: use pty|file=PATH"),
    ],
)
def test_bad_option_names_the_flag_and_shows_its_syntax(tmp_path, args, expected):
    """The library names config fields; the command line shows the flag the user typed."""
    line = one_clear_line(corral("run", "--kernel", str(tmp_path / "vmlinux"), *args))
    assert line == f"corral: error: {expected}"


def test_unknown_image():
    line = one_clear_line(corral("run", "--image", "windows95"))
    assert "no image named 'windows95'" in line


def test_no_kvm_device(tmp_path):
    line = one_clear_line(corral("run", "--image", "probe", env={"CORRAL_KVM": str(tmp_path / "kvm")}))
    assert "does not exist" in line and "kvm" in line


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_no_permission_on_kvm(tmp_path):
    """As an unprivileged user (the system python, so /root need not be readable)."""
    site = sysconfig.get_paths()["purelib"]
    platsite = sysconfig.get_paths()["platlib"]
    os.chmod(tmp_path, 0o755)
    probe = tmp_path / "probe.elf"
    shutil.copy(build_probe(), probe)
    os.chmod(probe, 0o644)
    code = (
        f"import sys; sys.argv=['corral','run','--kernel',{str(probe)!r},'--cmdline','hello']; "
        "from corral.cli import main; main()"
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PYTHONPATH": f"{ROOT / 'src'}:{site}:{platsite}",
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
        },
    )
    if "ModuleNotFoundError" in r.stderr or "Permission denied: '" in r.stderr:
        pytest.skip(f"system python cannot import corral's dependencies here: {r.stderr[-200:]}")
    line = one_clear_line(r)
    assert "no permission to open /dev/kvm" in line


def test_doctor_reports_the_host():
    r = corral("doctor")
    assert r.returncode == 0, r.stderr
    assert "API version 12" in r.stdout and "IRQCHIP" in r.stdout
    assert "firmware seabios: " in r.stdout and "firmware ovmf: " in r.stdout  # installed, or Debian's
    assert "vCPU exit loop: " in r.stdout
    for name, module in (("vhost-net", "vhost_net"), ("vhost-vsock", "vhost_vsock")):
        there = os.path.exists(f"/dev/{name}") or os.path.isdir(f"/sys/module/{module}")
        assert f"{name} {'present' if there else 'absent'}" in r.stdout, r.stdout
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert "PVM" in r.stdout and "stock Linux kernel cannot boot" in " ".join(r.stdout.split())
