"""Two real daemons on this host (two state directories, two sockets) and a probe VM that moves
between them: `corral vm migrate ID --to DAEMON` (Unix socket) and POST /vms/ID/migrate over
TCP with the target's bearer token. The probe's mem-touch guest keeps writing and checking
memory, so a restarted guest (round numbers from 1) or a lost page (a checksum unlike an
undisturbed run's) shows. Failures (no daemon there, a wrong token, the id taken there) leave
the VM running where it was, with one line saying why.

Also the daemon's clone (POST /vms/ID/clone: a snapshot kept with the clone) and its gdb stub
(POST /vms/ID/gdb), attached with real gdb to the clone, a restored VM."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest
from support.daemon import Daemon
from support.gdb_remote import gdb_batch, wait_for
from support.results import parse_results, progress_rounds

from corral.daemon.vmapi import ApiError

CMD = "mem-touch 16M forever"
TOKEN = "b-daemon-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two daemons for the whole module (each takes seconds to start): `a` on its Unix socket,
    `b` also on TCP with a bearer token. Tests use VM ids of their own."""
    root = tmp_path_factory.mktemp("daemons")
    token = root / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    port = _free_port()
    a = Daemon(root / "a")
    try:
        b = Daemon(root / "b", "--tcp", f"127.0.0.1:{port}", "--token-file", str(token))
    except BaseException:
        a.close()
        raise
    b.port = port  # type: ignore[attr-defined]
    yield a, b
    a.close()
    b.close()


def _rounds(d: Daemon, vm: str) -> dict[int, tuple[str, bool]]:
    return progress_rounds(d.console(vm))


def _reference(n: int) -> dict[int, tuple[str, bool]]:
    from support.live_probe import reference_rounds

    return reference_rounds(CMD, n)


def _assert_continued(target: Daemon, vm: str, before: int) -> None:
    """The guest runs on at the target: from where it was (no round 1 again), past `before`,
    every round read back ok with an undisturbed run's checksum."""
    last = target.wait_rounds(vm, before + 2)
    rounds = _rounds(target, vm)
    assert min(rounds) >= before, sorted(rounds)[:5]  # it carried on: no fresh boot
    assert all(ok for _, ok in rounds.values())
    ref = _reference(last)
    assert all(ref[r][0] == rounds[r][0] for r in rounds if r in ref)


def test_a_vm_migrates_to_another_daemon_and_runs_on_there(pair):
    a, b = pair
    a.create("mover", CMD)
    before = a.wait_rounds("mover", 2)
    r = a.cli("vm", "migrate", "mover", "--to", str(b.sock))
    assert r.returncode == 0, r.stderr
    assert re.match(r"mover -> \S+ as mover: running; \d+ rounds, [0-9.]+ MiB, downtime \d+ ms", r.stdout)
    # gone from the source (directory, process), running at the target with its own process
    assert "mover" not in [v["id"] for v in a.api.call("GET", "/vms")]
    assert not (a.state / "vms" / "mover").exists()
    there = b.api.call("GET", "/vms/mover")
    assert there["state"] == "running" and there["source"] == "migration", there
    assert there["mem_mib"] == 128 and there["vcpus"] == 1
    _assert_continued(b, "mover", before)
    b.api.call("DELETE", "/vms/mover")  # its turns would slow the module's other tests


def test_failed_migrations_leave_the_vm_running_where_it_was(pair, tmp_path):
    a, b = pair
    port = b.port
    a.create("stay", CMD)
    b.create("stay", "halt")  # the id is taken there (halt: stays up, costs no CPU)
    a.wait_rounds("stay", 2)

    def refused(body: dict, why: str) -> None:
        with pytest.raises(ApiError) as e:
            a.api.call("POST", "/vms/stay/migrate", body)
        msg = str(e.value)
        assert why in msg and "\n" not in msg, msg
        assert a.api.call("GET", "/vms/stay")["state"] == "running"
        at = max(_rounds(a, "stay"))
        a.wait_rounds("stay", at + 1)  # it runs on

    refused({"to": str(tmp_path / "nobody.sock")}, "cannot reach")
    refused({"to": f"tcp:127.0.0.1:{port}", "token": "x" * 16 + "-wrong"}, "bearer token")
    refused({"to": f"tcp:127.0.0.1:{port}", "token": TOKEN}, "exists")
    assert "stay" in [v["id"] for v in b.api.call("GET", "/vms")]
    assert not (b.state / "vms" / "moved").exists()  # nothing left behind there
    r = a.cli("vm", "migrate", "stay", "--to", str(tmp_path / "nobody.sock"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "runs on here" in r.stderr, r.stderr

    # over TCP with the right token, under a free id: it arrives
    before = max(_rounds(a, "stay"))
    out = a.api.call(
        "POST", "/vms/stay/migrate", {"to": f"tcp:127.0.0.1:{port}", "token": TOKEN, "id": "moved"}
    )
    assert out["target"]["state"] == "running" and out["stats"]["bytes_sent"] >= 16 << 20
    assert "stay" not in [v["id"] for v in a.api.call("GET", "/vms")]
    _assert_continued(b, "moved", before)

    # bad requests: one line each, and the daemon serves on
    for path, body, why in [
        ("/vms/none/migrate", {"to": "/x"}, "no VM with id"),
        ("/vms/none/clone", {}, "no VM with id"),
        ("/vms/moved/gdb", {"address": "tcp:127.0.0.1:0"}, "no VM with id"),  # it left
        ("/incoming", {"id": "bad id"}, "id"),
        ("/incoming", {"timeout_s": -1}, "timeout_s"),
        ("/incoming", {"surprise": 1}, "surprise"),
        ("/vms/stay/migrate", {"to": "/x", "token": "short"}, "token"),
    ]:
        with pytest.raises(ApiError) as e:
            a.api.call("POST", path, body)
        assert why in str(e.value) and "\n" not in str(e.value), (path, str(e.value))
    with pytest.raises(ApiError, match="gdb address"):
        b.api.call("POST", "/vms/moved/gdb", {"address": "tcp:127.0.0.1:notaport"})
    with pytest.raises(ApiError, match="TCP only"):  # a jailed VM's Unix socket would be in its jail
        b.api.call("POST", "/vms/moved/gdb", {"address": "unix:/tmp/gdb.sock"})
    assert b.api.call("GET", "/vms/moved")["state"] == "running"
    for vm in ("moved", "stay"):
        b.api.call("DELETE", f"/vms/{vm}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_a_clone_through_the_daemon_is_debugged_with_gdb(pair, probe64):
    a, _ = pair
    a.create("orig", "gdb")
    wait_for(lambda: a.console("orig"), "gdb target ready", 60)
    r = a.cli("vm", "clone", "orig", "--id", "twin")
    assert r.returncode == 0 and r.stdout.strip() == "twin", r.stderr
    twin = a.api.call("GET", "/vms/twin")
    assert twin["state"] == "running" and twin["source"] == "snapshot"
    assert Path(twin["snapshot"]).parent == a.state / "vms" / "twin"  # kept with the clone
    r = a.cli("vm", "gdb", "twin", "tcp:127.0.0.1:0")
    assert r.returncode == 0, r.stderr
    where = r.stdout.strip()
    assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+", where) and a.api.call("GET", "/vms/twin")["gdb"] == where
    with pytest.raises(ApiError, match="already serves"):
        a.api.call("POST", "/vms/twin/gdb", {"address": "tcp:127.0.0.1:0"})
    out = gdb_batch(
        where[4:],
        probe64,
        "print (long)gdb_counter > 0",
        "set var *(long *)&gdb_value = 99",
        "set var *(long *)&gdb_release = 1",
        "detach",
    )
    assert "$1 = 1" in out, out
    wait_for(lambda: a.console("twin"), "released=1\r\n")
    assert parse_results(a.console("twin")) == {"gdb_value": "99", "released": "1"}
    assert "gdb_value" not in a.console("orig")  # the original turns on, untouched
    assert a.api.call("GET", "/vms/orig")["state"] == "running"
    for vm in ("orig", "twin"):
        a.api.call("DELETE", f"/vms/{vm}")
