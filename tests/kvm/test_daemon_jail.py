"""`corral serve` jails every VM by default (as root): real probe VMs created through the daemon
run in their own namespaces, root and uid, entered inside the fork server's child (no exec); their
consoles, pause/resume, snapshot + clone, stop and rm work through the jail; code run inside one
(the debug hook, honoured only in a source tree) cannot reach the host or the other VM; and after
rm nothing is left: jail directories, uid locks, cgroups, mounts. `--no-jail` runs them as before.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support.cli import corral
from support.daemon import Daemon
from support.jail_hooks import PRELUDE
from support.results import progress_rounds

from corral.jail.launch import UID_LOCKS

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail needs root")

# Run inside every VM of the daemon (the hook env is the daemon's); only vm-a attacks. The VM's
# hostname is its id (the jail's UTS namespace). Runs beside `corral firecracker`, from the start.
_BODY = r"""
me = socket.gethostname()
if me == "vm-a":
    P = json.load(open("/debug/params.json"))
    time.sleep(0.5)
    attempt("open /etc/shadow", lambda: open("/etc/shadow", "rb"))
    attempt("open a root-only host file", lambda: open(P["host_file"], "rb"))
    attempt("connect to vm-b's API (state dir)", connect(P["b_api"]))
    attempt("connect to vm-b's API (run dir)", connect(P["b_run_api"]))
    attempt("read vm-b's memory", lambda: open(f"/proc/{P['b_pid']}/mem", "rb"))
    attempt("signal vm-b", lambda: os.kill(P["b_pid"], 0))
    attempt("write the root", lambda: open("/owned", "w"))
    out["uid"], out["pid"] = os.getuid(), os.getpid()
    out["root"] = sorted(os.listdir("/"))
    report(out)
"""
ATTACKS = PRELUDE + _BODY


def _seccomp_modes(pid: int, timeout: float = 10) -> dict[str, str]:
    """Thread name -> its Seccomp mode, once the VMM's main thread has entered its filter."""
    deadline = time.monotonic() + timeout
    while True:
        modes = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                continue
            mode = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Seccomp:"))
            modes[f"{name}#{tid}" if name in modes else name] = mode
        if "corral-vmm" in modes or time.monotonic() > deadline:
            return modes
        time.sleep(0.05)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.fixture
def hooked(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    hook.chmod(0o777)  # the VMs' uids are the daemon's choice: each may write its report here
    (hook / "attacks.py").write_text(ATTACKS)
    d = Daemon(tmp_path / "state", env={"CORRAL_DEBUG_HOOK": str(hook / "attacks.py")})
    yield d, hook
    d.close()


def test_daemon_vms_are_jailed_apart_and_leave_nothing(hooked, tmp_path):
    daemon, hook = hooked
    secret = tmp_path / "root-only"
    secret.write_text("host secret\n")
    secret.chmod(0o600)
    assert daemon.api.call("GET", "/")["jail"] is True

    b = daemon.create("vm-b")
    run_b = Path(b["jail"]["dir"]) / "run"
    (hook / "params.json").write_text(json.dumps({
        "b_pid": b["pid"], "b_api": str(daemon.state / "vms" / "vm-b" / "api.sock"),
        "b_run_api": str(run_b / "api.sock"), "host_file": str(secret),
    }))  # fmt: skip
    (hook / "params.json").chmod(0o644)
    a = daemon.create("vm-a")

    # each runs jailed: its own uid (not root, not the other's), pid 1 of a PID namespace of its
    # own, its own mount namespace; the jail as `vm show` reports it
    jails = {}
    for v in (a, b):
        assert v["state"] == "running" and v["jail"] is not None, v
        st = _status(v["pid"])
        uid = int(st["Uid"].split()[0])
        assert uid == v["jail"]["uid"] and uid >= 900_000 and set(st["Uid"].split()) == {str(uid)}
        assert st["NSpid"].split() == [str(v["pid"]), "1"]
        assert st["NoNewPrivs"] == "1"
        for kind in ("mnt", "pid", "ipc", "uts"):
            assert _ns(v["pid"], kind) != _ns("self", kind) and _ns(v["pid"], kind) != _ns(
                daemon.proc.pid, kind
            )
        # and under seccomp, every thread (vm-a's debug hook thread, started before the filters
        # for the jail's own attack test, aside)
        filtered = _seccomp_modes(v["pid"])
        if v is b:
            assert set(filtered.values()) == {"2"}, filtered
        assert all(filtered[t] == "2" for t in filtered if t.startswith("corral-")), filtered
        assert {"corral-vmm", "corral-vcpu0", "corral-api"} <= set(filtered), filtered
        assert {"mnt", "pid", "ipc", "uts"} <= set(v["jail"]["namespaces"])
        assert 0 < v["jail"]["setup_ms"] < 10_000
        assert v["jail"]["cgroups"], "the VM joined its cgroups"
        for g in v["jail"]["cgroups"]:
            assert str(v["pid"]) in Path(g, "cgroup.procs").read_text().split()
        jails[v["id"]] = v["jail"]
    assert jails["vm-a"]["uid"] != jails["vm-b"]["uid"]
    shown = corral("vm", "show", "vm-a", env={"CORRAL_DAEMON_SOCK": str(daemon.sock)})
    assert shown.returncode == 0 and f"uid {jails['vm-a']['uid']}" in shown.stdout, (
        shown.stdout + shown.stderr
    )
    assert "mnt, pid, ipc, uts" in shown.stdout

    # the guests' serial output arrives through the fd the template opened
    daemon.wait_rounds("vm-a", 2)
    daemon.wait_rounds("vm-b", 2)

    # code inside vm-a (where a guest escape lands) is refused the host and vm-b
    deadline = time.monotonic() + 30
    while not (hook / "report.json").exists():
        assert time.monotonic() < deadline, daemon.console("vm-a")[-2000:]
        time.sleep(0.05)
    report = json.loads((hook / "report.json").read_text())
    allowed = {k: v for k, v in report.items() if isinstance(v, str) and v.startswith("ALLOWED")}
    assert allowed == {}, f"the jail let these through: {allowed}"
    assert sum(isinstance(v, str) and v.startswith("refused") for v in report.values()) == 7, report
    assert report["uid"] == jails["vm-a"]["uid"] and report["pid"] == 1
    assert "etc" not in report["root"] and "proc" not in report["root"]

    # the verbs, through the jail
    assert daemon.api.call("POST", "/vms/vm-b/pause")["state"] == "paused"
    assert daemon.api.call("POST", "/vms/vm-b/resume")["state"] == "running"
    snap = tmp_path / "snap"
    daemon.api.call("POST", "/vms/vm-b/snapshot", {"path": str(snap)})
    for f in ("vm.snap", "vm.mem"):
        st = (snap / f).lstat()
        assert st.st_uid == 0 and st.st_nlink == 1 and (snap / f).is_file()
    assert not [p for p in run_b.iterdir() if p.name.startswith(".snapshot-")]  # moved, not copied

    # a daemon killed and started again finds its jailed VMs (and can remove them: below)
    daemon.proc.kill()
    daemon.proc.wait(15)
    daemon.start()
    again = daemon.api.call("GET", "/vms/vm-a")
    assert again["state"] == "running" and again["jail"] == jails["vm-a"]
    clone = daemon.api.call("POST", "/vms", {"id": "vm-c", "snapshot": str(snap)})
    assert clone["state"] == "running" and clone["jail"]["uid"] not in (
        jails["vm-a"]["uid"],
        jails["vm-b"]["uid"],
    )
    before = max(progress_rounds(daemon.console("vm-c")), default=0)
    daemon.wait_rounds("vm-c", before + 2)  # the clone carries on in its own jail
    jails["vm-c"] = clone["jail"]
    assert daemon.api.call("POST", "/vms/vm-b/stop")["state"] == "stopped"

    for vm in ("vm-a", "vm-b", "vm-c"):
        daemon.api.call("DELETE", f"/vms/{vm}")
    # nothing left: jail directories, uid locks, cgroups, mounts, processes
    assert list((daemon.state / "jail" / "corral").iterdir()) == []
    for j in jails.values():
        assert not (UID_LOCKS / str(j["uid"])).exists()
        for g in j["cgroups"]:
            assert not Path(g).exists()
    mounts = Path("/proc/mounts").read_text()
    assert str(daemon.state) not in mounts and "corral-jail" not in mounts
    for v in (a, b, clone):
        assert not Path(f"/proc/{v['pid']}").exists() or _status(v["pid"])["State"].startswith("Z")


def test_no_jail_runs_vms_as_before_and_spawn_needs_it(tmp_path):
    r = corral("serve", "--spawn", "--state-dir", str(tmp_path / "s1"), timeout=60)
    assert r.returncode != 0 and "--spawn cannot jail VMs" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    daemon = Daemon(tmp_path / "state", "--no-jail")
    try:
        assert daemon.api.call("GET", "/")["jail"] is False
        v = daemon.create("plain")
        assert v["jail"] is None and _status(v["pid"])["Uid"].split()[0] == "0"
        assert _ns(v["pid"], "mnt") == _ns("self", "mnt")
        daemon.wait_rounds("plain", 1)
    finally:
        daemon.close()
