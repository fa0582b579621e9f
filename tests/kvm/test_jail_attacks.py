"""A jailed VMM taken over, as an attacker would use it: code run inside the jailed VMM process
(the debug hook, corral.jail.debug) tries to reach the host and a second jailed VM, and every
attempt must be refused, while both guests run on. Plus: another local user cannot reach any
VM's control socket, jailed or not. Real probe VMs, real namespaces, a real second user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.cli import cli_env
from support.disks import patterned_image
from support.jail_hooks import PRELUDE

import corral
from corral.api import ControlClient
from corral.images.probe import build_probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")

UID_A, UID_B = 931_001, 931_002  # fixed, so the test can give each VM its files

_BODY = r"""
P = json.load(open("/debug/params.json"))

def finit():
    fd = os.open("/vm/kernel", os.O_RDONLY)
    try:
        c(libc.syscall(313, fd, b"", 0))
    finally:
        os.close(fd)

time.sleep(1.0)  # let the guest run first: it must run on through all of this
attempt("open /etc/shadow", lambda: open("/etc/shadow", "rb"))
attempt("open a root-only host file", lambda: open(P["host_file"], "rb"))
attempt("open the other VM's disk", lambda: open(P["b_disk"], "rb"))
attempt("read the other VM's memory", lambda: open(f"/proc/{P['b_pid']}/mem", "rb"))
attempt("connect to the other VM's API socket", connect(P["b_api"]))
attempt("connect to the other VM's run dir socket", connect(P["b_run_api"]))
attempt("signal the other VM", lambda: os.kill(P["b_pid"], 0))
attempt("ptrace the other VM", lambda: c(libc.ptrace(16, P["b_pid"], None, None)))
attempt("mount a file system", lambda: c(libc.mount(b"none", b"/run/corral", b"tmpfs", 0, None)))
# module loading: ENOSYS on a kernel without module support (this project's machines), else EPERM
attempt("init_module", lambda: c(libc.syscall(175, b"\0" * 64, 64, b"")))
attempt("finit_module", finit)
attempt("raw IP socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("packet socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
attempt("fork and exec a shell", lambda: in_child(lambda: os.execv("/bin/sh", ["sh", "-c", "id"])))
attempt("setuid(0)", lambda: os.setuid(0))
attempt("a user namespace", lambda: in_child(lambda: c(libc.unshare(0x10000000))))
attempt("write the root", lambda: open("/owned", "w"))
attempt("write its own kernel", lambda: open("/vm/kernel", "r+b"))
attempt("make a device node", lambda: os.mknod("/run/corral/kvm2", stat.S_IFCHR | 0o600, os.makedev(10, 232)))
attempt("chroot out", lambda: os.chroot("/run"))
out["own disk"] = len(open("/vm/disk0", "rb").read(512))  # the hook does run with the VM's rights
out["uid"], out["gid"], out["groups"] = os.getuid(), os.getgid(), os.getgroups()
out["pid"] = os.getpid()
out["no_new_privs"] = libc.prctl(39, 0, 0, 0, 0)
out["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)
out["env"] = sorted(os.environ)
for d in ("/", "/vm", "/dev"):
    out[d.strip("/") or "root"] = sorted(os.listdir(d))
out["state"] = machine.status().state
report(out)
machine.stop("attacks done")
"""
ATTACKS = PRELUDE + _BODY


class Jailed:
    """`corral jail ... -- run ...` in the background; its stderr collected, its jail line parsed."""

    def __init__(self, base: Path, uid: int, run_args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "jail", "--chroot-base", str(base), "--uid", str(uid), "--",
             "run", "--kernel", str(build_probe()), "--memory", "64M", *run_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=cli_env(env),
        )  # fmt: skip
        self.err: list[str] = []
        self.out = ""
        self._t = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._t.start()
        self._o = threading.Thread(target=self._read_out, daemon=True)
        self._o.start()

    def _read_out(self) -> None:
        self.out = self.proc.stdout.read()

    def jail_line(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.err:
                if line.startswith("corral: jail "):
                    return line
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.02)
        raise AssertionError("no jail line: " + "".join(self.err))

    @property
    def pid(self) -> int:
        return int(self.jail_line().split(" pid ")[1].split(",")[0])

    def finish(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        self._t.join(5)
        self._o.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _owned(path: Path, uid: int) -> Path:
    os.chown(path, uid, uid)
    return path


@pytest.fixture
def two_vms(tmp_path):
    base = tmp_path / "jails"
    disk_a = _owned(patterned_image(tmp_path / "a.img", 2048), UID_A)
    disk_b = _owned(patterned_image(tmp_path / "b.img", 2048), UID_B)
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(mode=0o700)
    _owned(hook_dir, UID_A)
    secret = tmp_path / "root-only"
    secret.write_text("host secret\n")
    secret.chmod(0o600)
    b = Jailed(base, UID_B, ["--cmdline", "mem-touch 16M forever", "--disk", str(disk_b),
                             "--api", str(tmp_path / "b.sock")])  # fmt: skip
    a = None
    try:
        b_pid = b.pid
        b_id = b.jail_line().split()[2].rstrip(":")
        (hook_dir / "params.json").write_text(json.dumps({
            "b_pid": b_pid, "b_disk": str(disk_b), "b_api": str(tmp_path / "b.sock"),
            "b_run_api": str(base / "corral" / b_id / "run" / "api.sock"), "host_file": str(secret),
        }))  # fmt: skip
        (hook_dir / "attacks.py").write_text(ATTACKS)
        # --no-seccomp: this is the jail's test, each attack seen refused by the jail alone (with
        # the filters on, the first forbidden call ends the VMM: the next test)
        a = Jailed(base, UID_A, ["--cmdline", "mem-touch 16M forever", "--disk", str(disk_a),
                                 "--api", str(tmp_path / "a.sock"), "--no-seccomp"],
                   env={"CORRAL_DEBUG_HOOK": str(hook_dir / "attacks.py")})  # fmt: skip
        yield a, b, hook_dir, tmp_path
    finally:
        for vm in (a, b):
            if vm is not None:
                vm.kill()


def test_a_taken_over_jailed_vmm_is_refused_everything(two_vms):
    a, b, hook_dir, tmp_path = two_vms
    assert a.finish() == 0, "".join(a.err)
    report = json.loads((hook_dir / "report.json").read_text())
    attacks = {
        k: v for k, v in report.items() if isinstance(v, str) and v.split()[0] in ("refused", "ALLOWED")
    }
    assert len(attacks) == 20, report
    allowed = {k: v for k, v in attacks.items() if not v.startswith("refused")}
    assert allowed == {}, f"the jail let these through: {allowed}"
    # the hook ran where a guest escape lands: inside the VMM, with the VM's own rights only
    assert report["own disk"] == 512 and report["state"] == "running"
    assert (report["uid"], report["gid"], report["groups"], report["pid"]) == (UID_A, UID_A, [], 1)
    assert report["no_new_privs"] == 1 and report["nofile"] == [2048, 2048]
    assert "HOME" not in report["env"] and "CORRAL_DEBUG_HOOK" in report["env"]
    assert report["vm"] == ["disk0", "kernel"], report["vm"]
    assert report["dev"] == ["kvm", "null", "urandom"], report["dev"]
    # nothing of the host's /etc, /proc or /tmp: a top directory is there only as the path to a
    # bound tree (a checkout under /tmp binds its venv at /tmp/...)
    bound_tops = {Path(p).parts[1] for p in (sys.prefix, sys.base_prefix, sys.executable, corral.__file__)}
    for top in ("etc", "proc", "tmp"):
        assert top not in report["root"] or top in bound_tops, (top, report["root"])
    # the guest ran inside the jail all along, and VM B never noticed
    assert "PROGRESS round=2" in a.out and "ok=0" not in a.out, a.out[-2000:]
    b_vm = ControlClient(tmp_path / "b.sock")
    assert b_vm.status().state == "running"
    b_vm.stop()
    b.finish()
    assert "PROGRESS round=2" in b.out and "ok=0" not in b.out


PTRACE_ATTACK = r"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall(101, 16, 1, 0, 0)  # ptrace(PTRACE_ATTACH, pid 1)
open("/debug/survived", "w").write("the VMM was not stopped")
"""


def test_a_taken_over_vmm_under_seccomp_is_stopped_at_its_first_forbidden_call(tmp_path):
    """The same hook, with the filters on (the default): the hook runs under the VMM thread's
    allow-list, so its ptrace ends the VM at once with exit 148 and one line naming the call."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(mode=0o700)
    _owned(hook_dir, UID_A)
    (hook_dir / "attack.py").write_text(PTRACE_ATTACK)
    a = Jailed(tmp_path / "jails", UID_A, ["--cmdline", "mem-touch 16M forever"],
               env={"CORRAL_DEBUG_HOOK": str(hook_dir / "attack.py")})  # fmt: skip
    try:
        rc = a.finish()
    finally:
        a.kill()
    err = "".join(a.err)
    assert rc == 148, err
    assert "forbidden system call: ptrace (#101)" in err, err
    assert not (hook_dir / "survived").exists()


def _connect_as_nobody(path: Path) -> subprocess.CompletedProcess:
    code = (
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1]); print('CONNECTED')\n"
        "except OSError as e:\n print('REFUSED', e.errno)\n"
    )
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", sys.executable, "-I", "-c",
         code, str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_another_local_user_cannot_reach_a_jailed_or_plain_vm(tmp_path):
    base = tmp_path / "jails"
    base.mkdir()
    tmp_path.chmod(0o755)  # nobody may walk to the sockets: only the sockets themselves refuse
    jailed = Jailed(base, UID_B, ["--cmdline", "mem-touch 16M forever", "--api", str(tmp_path / "j.sock")])
    plain = subprocess.Popen(
        [sys.executable, "-m", "corral", "run", "--kernel", str(build_probe()), "--memory", "64M",
         "--cmdline", "mem-touch 16M forever", "--api", str(tmp_path / "p.sock")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(),
    )  # fmt: skip
    try:
        line = jailed.jail_line()
        run_dir = Path(line.split(" run dir ")[1].split(";")[0])
        deadline = time.monotonic() + 30
        while not ((tmp_path / "p.sock").exists() and (run_dir / "api.sock").exists()):
            assert time.monotonic() < deadline and plain.poll() is None
            time.sleep(0.05)
        for sock in (tmp_path / "j.sock", run_dir / "api.sock", tmp_path / "p.sock"):
            r = _connect_as_nobody(sock)
            assert r.stdout.startswith("REFUSED 13"), (sock, r.stdout, r.stderr)  # EACCES
            assert ControlClient(sock).status().state == "running"  # the operator still can
    finally:
        jailed.kill()
        plain.terminate()
        plain.wait(10)
