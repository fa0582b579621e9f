"""seccomp on by default: every thread of a running `corral run` is filtered, the VM works
through its verbs under the filters (snapshot, balloon, vsock, a reboot), a forbidden call from
any thread kind ends the VM with exit 148 and one line naming the call, and --no-seccomp says
it is for debugging. (Every other kvm test runs under the filters too: tests/kvm/conftest.py for
the library's VMs, the CLI's default for the rest.)"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.cli import ROOT, cli_env, corral, start_vm

from corral import seccomp
from corral.api import ControlClient


def multiboot_kernel(code: bytes) -> bytes:
    """`code` behind a Multiboot header with address fields, loaded at 1 MiB."""
    magic, flags, load = 0x1BADB002, 1 << 16, 0x100000
    end = load + 32 + len(code)
    header = struct.pack(
        "<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF, load, load, end, end, load + 32
    )
    return header + code


def threads(pid: int) -> dict[str, list[str]]:
    """comm -> the Seccomp mode of each thread with that name."""
    out: dict[str, list[str]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue  # a thread that just ended
        mode = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Seccomp:"))
        out.setdefault(comm, []).append(mode)
    return out


def threads_once_running(pid: int, *names: str, timeout: float = 20) -> dict[str, list[str]]:
    """threads(pid), once every thread in `names` has started (the control socket answers
    from just before the machine starts its vCPUs and loop)."""
    deadline = time.monotonic() + timeout
    while not all(n in (seen := threads(pid)) for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


def stop(proc: subprocess.Popen, api: Path) -> tuple[int, str]:
    ControlClient(api).stop()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err.decode()


def test_every_thread_is_filtered_and_the_verbs_work(tmp_path):
    api = tmp_path / "vm.sock"
    vsock = tmp_path / "v.sock"
    proc = start_vm(api, "mem-touch 16M forever", "--cpus", "2", "--balloon", "--vsock", f"cid=3,uds={vsock}")
    try:
        vm = ControlClient(api)
        assert vm.status().state == "running"
        names = ("corral-vmm", "corral-api", "corral-vcpu0", "corral-vcpu1", "corral-devices")
        seen = threads_once_running(proc.pid, *names)
        for name in names:
            assert name in seen, seen
        assert all(mode == "2" for modes in seen.values() for mode in modes), seen
        # the verbs, served on the API's threads under its filter
        vm.pause()
        vm.resume()
        vm.snapshot(tmp_path / "snap")
        assert (tmp_path / "snap" / "manifest.json").is_file()
        vm.balloon(8 << 20)
        # a host program reaches the vsock device (the loop thread accepts it)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(vsock))
            s.sendall(b"CONNECT 1234\n")
        assert vm.status().state == "running"
    finally:
        if proc.poll() is None:
            rc, err = stop(proc, api)
        else:
            rc, err = proc.returncode, proc.stderr.read().decode()
    assert "forbidden system call" not in err, err
    assert rc == 0, err

    # the snapshot restores, under the filters too
    api2 = tmp_path / "vm2.sock"
    restored = subprocess.Popen(
        [sys.executable, "-m", "corral", "restore", str(tmp_path / "snap"), "--api", str(api2),
         "--vsock", f"cid=3,uds={tmp_path / 'v2.sock'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not api2.exists():
        assert restored.poll() is None and time.monotonic() < deadline, restored.stderr.read().decode()
        time.sleep(0.05)
    assert ControlClient(api2).status().state == "running"
    seen = threads_once_running(restored.pid, "corral-vmm", "corral-vcpu0", "corral-vcpu1", "corral-devices")
    assert all(m == "2" for modes in seen.values() for m in modes), seen
    rc, err = stop(restored, api2)
    assert rc == 0 and "forbidden" not in err, err


def test_the_cli_runs_smp_and_disk_scenarios_under_the_filters(tmp_path):
    r = corral("run", "--image", "probe", "--cmdline", "smp", "--cpus", "2")
    assert r.returncode == 0 and "RESULT cpus=2" in r.stdout, r.stderr
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    r = corral("run", "--image", "probe", "--cmdline", "blk-check", "--disk", f"{disk},serial=d1")
    assert "forbidden" not in r.stderr and "RESULT" in r.stdout, r.stdout + r.stderr


def _default_sigint() -> None:
    """The VMM's SIGINT as a terminal's user has it, whatever the test runner inherited (a
    non-interactive shell's background job ignores SIGINT, and an ignored signal stays ignored
    across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_a_rebooting_guest_is_rebuilt_under_the_vmm_filter(tmp_path):
    """The VMM thread builds the machine again on every reset, inside its filter."""
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(
        multiboot_kernel(b"\xb0\xfe\xe6\x64\xf4\xeb\xfd")
    )  # out 0x64, 0xfe (i8042 reset); hlt; jmp
    # -v logs every reboot: to a file, so the VMM never waits on a pipe nobody reads yet
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "-v", "run", "--kernel", str(kernel), "--memory", "32M"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=cli_env(),
            preexec_fn=_default_sigint,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # two rebuilds: seconds here, more on a loaded host
        while "rebooting (2)" not in (tmp_path / "err").read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "err").read_text()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            sig = [ln for ln in status.splitlines() if ln.startswith(("State", "Sig", "Shd"))]
            pytest.fail(f"SIGINT did not stop the VMM: {sig}\n{(tmp_path / 'err').read_text()[-3000:]}")
    finally:
        proc.kill()
        proc.wait()
    text = (tmp_path / "err").read_text()
    assert "forbidden system call" not in text, text
    assert "rebooting (2)" in text, text
    assert proc.returncode == 130, text


SELFTEST = "import sys; import corral.seccomp as s; s.SELFTEST = True; from corral.cli import main; main()"


@pytest.mark.parametrize("kind", ["vcpu", "loop", "api", "vmm"])
def test_a_forbidden_call_ends_the_vm_naming_it(tmp_path, kind):
    """The self-test hook (off unless the process sets corral.seccomp.SELFTEST) makes the
    thread open a packet socket right after entering its filter."""
    r = subprocess.run(
        [sys.executable, "-c", SELFTEST, "run", "--image", "probe", "--cmdline", "mem-touch 16M forever",
         "--api", str(tmp_path / "vm.sock"), "--rng"],  # a virtio device: the loop runs
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=cli_env({"CORRAL_SECCOMP_SELFTEST": kind}), cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == seccomp.EXIT_CODE, (r.returncode, r.stderr)
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("corral: error: seccomp:") and "forbidden system call: socket (#41)" in last


def test_the_selftest_hook_is_off_in_normal_use(tmp_path):
    r = corral("run", "--image", "probe", "--cmdline", "hello", env={"CORRAL_SECCOMP_SELFTEST": "vcpu"})
    assert r.returncode == 0, r.stderr


def test_no_seccomp_warns_and_filters_nothing(tmp_path):
    api = tmp_path / "vm.sock"
    proc = start_vm(api, "mem-touch 16M forever", "--no-seccomp")
    try:
        seen = threads_once_running(proc.pid, "corral-vcpu0")
        assert "corral-vcpu0" in seen
        assert all(m == "0" for modes in seen.values() for m in modes), seen
    finally:
        rc, err = stop(proc, api)
    assert "--no-seccomp" in err and "debugging only" in err
    assert rc == 0


def test_seccomp_report_counts_each_list_beside_firecracker():
    r = corral("seccomp-report")
    assert r.returncode == 0, r.stderr
    for c in seccomp.counts():
        row = next(ln for ln in r.stdout.splitlines() if ln.strip("│ ").startswith(c.kind + " "))
        assert str(c.syscalls) in row
        if c.firecracker is not None:
            assert str(c.firecracker) in row


def test_a_closed_stdout_stops_the_vm_with_one_line_not_the_filter(tmp_path):
    """The console's reader went away (`corral run | head`): the vCPU writing the guest's
    output gets EPIPE; the VM stops with a line saying so, not a traceback that dies on the
    filter (linecache's newfstatat) with 148."""
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "corral", "run", "--image", "probe", "--cmdline", "smp"],
            stdin=subprocess.DEVNULL, stdout=w_fd, stderr=subprocess.PIPE, env=cli_env(), timeout=60,
        )  # fmt: skip
    finally:
        os.close(w_fd)
    err = r.stderr.decode()
    assert "forbidden system call" not in err, err
    assert r.returncode == 1, err
    assert "the console's output (stdout) failed: Broken pipe: the VM was stopped" in err, err


def test_the_gdb_stub_and_its_session_run_filtered(tmp_path):
    api, gdb = tmp_path / "vm.sock", tmp_path / "gdb.sock"
    proc = start_vm(api, "mem-touch 16M forever", "--gdb", f"unix:{gdb}")
    try:
        seen = threads_once_running(proc.pid, "corral-gdb")
        assert seen.get("corral-gdb") == ["2"], seen
        with socket.socket(socket.AF_UNIX) as s:  # a debugger: its session gets a thread too
            s.settimeout(10)
            s.connect(str(gdb))
            s.sendall(b"$?#3f")
            reply = b""
            while b"#" not in reply:  # the ack and the stop reply may come apart
                chunk = s.recv(64)
                assert chunk, f"the stub hung up: {reply!r}"
                reply += chunk
            assert reply.startswith(b"+$"), reply
            seen = threads(proc.pid)
            assert seen.get("corral-gdb") == ["2", "2"], seen
            s.sendall(b"+$D#44")  # detach: the guest runs on
            s.recv(64)
        assert ControlClient(api).status().state == "running"
    finally:
        rc, err = stop(proc, api) if proc.poll() is None else (proc.returncode, proc.stderr.read().decode())
    assert "forbidden" not in err and rc == 0, err


def test_a_receiver_waits_and_handshakes_under_filters(tmp_path):
    """`corral receive` faces the network before any guest exists: its waiting thread is under
    the VMM's filter, and each connection's handshake under a narrower one of its own."""
    token = tmp_path / "token"
    token.write_text("0" * 64)
    token.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "receive", "--listen", "127.0.0.1:0", "--token-file", str(token),
         "--timeout", "30"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=cli_env(),
    )  # fmt: skip
    try:
        line = proc.stdout.readline().decode()
        assert "waiting for a migration on" in line, line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10):  # a silent peer
            seen = threads_once_running(proc.pid, "corral-vmm", "corral-mig-in")
            assert seen.get("corral-vmm") == ["2"] and seen.get("corral-mig-in") == ["2"], seen
        assert proc.poll() is None  # still listening
    finally:
        proc.kill()
        out = proc.communicate(timeout=10)[0].decode()
    assert "forbidden" not in out, out
