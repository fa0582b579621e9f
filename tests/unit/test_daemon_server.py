"""corral/daemon/server.py on real sockets, without KVM: bad requests get a 400 (or 404) naming
the problem and the daemon serves on; a 100 MB body is refused unread; the Unix socket serves
only its owner's uid and root (SO_PEERCRED), TCP only requests with the bearer token; VMs left
in the state directory are listed as they are (dead ones too); the metrics text is well formed."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from corral.daemon.fleet import FILE_KEEP, FILE_MAX, Fleet
from corral.daemon.launcher import SpawnLauncher
from corral.daemon.metrics import render
from corral.daemon.models import VmInfo, VmRecord
from corral.daemon.server import DaemonApi, DaemonServer, read_token
from corral.daemon.statedir import StateDir
from corral.daemon.vmapi import ApiError, HttpClient
from corral.errors import ConfigError

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def served(tmp_path):
    state = StateDir(tmp_path / "state")
    fleet = Fleet(state, SpawnLauncher(), None)
    server = DaemonServer(DaemonApi(fleet), state.root / "corral.sock", tcp=("127.0.0.1", 0), token=TOKEN)
    yield server, state
    server.close()


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    s.settimeout(10)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


def _fault(api: HttpClient, method: str, path: str, body: object = None) -> tuple[int, str]:
    try:
        api.call(method, path, body)
    except ApiError as exc:
        return exc.status, str(exc)
    raise AssertionError(f"{method} {path} succeeded")


def test_bad_requests_are_refused_and_the_daemon_serves_on(served):
    server, state = served
    api = HttpClient(str(server.path), timeout=10)
    assert api.call("GET", "/") == {
        "app": "corral",
        "version": api.call("GET", "/")["version"],
        "state_dir": str(state.root),
        "vms": 0,
        "jail": False,  # this fleet (SpawnLauncher) runs VMs unjailed
    }
    assert _fault(api, "GET", "/nope") == (404, "no such path: GET /nope")
    assert _fault(api, "PUT", "/vms")[0] == 404
    assert _fault(api, "GET", "/vms/x") == (404, "no VM with id 'x': `corral vm ls` lists them")
    assert _fault(api, "GET", "/vms/x/console")[0] == 404
    assert _fault(api, "POST", "/vms/x/pause")[0] == 404
    assert _fault(api, "DELETE", "/vms/x")[0] == 404
    status, msg = _fault(api, "GET", "/vms/a%2F..%2Fb")
    assert status == 400 and "is not valid" in msg
    status, msg = _fault(api, "POST", "/vms")
    assert status == 400 and "needs a JSON body" in msg
    status, msg = _fault(api, "POST", "/vms", {"config": {}, "snapshot": "/x"})
    assert status == 400 and "either `config`" in msg
    status, msg = _fault(api, "POST", "/vms", {"config": {}, "cpus": 2})
    assert status == 400 and "unknown field `cpus`" in msg
    status, msg = _fault(api, "POST", "/vms", {"config": {"drives": "many"}})
    assert status == 400 and "drives" in msg
    status, msg = _fault(api, "POST", "/vms", {"id": "x", "config": {}})
    assert status == 400 and "boot-source is required" in msg
    status, msg = _fault(api, "POST", "/vms", {"config": {}, "limits": {"memory_mib": 1}})
    assert status == 400 and "memory_mib" in msg
    status, msg = _fault(api, "POST", "/vms", {"snapshot": str(state.root)})
    assert status == 400 and "holds no vm.snap" in msg
    assert state.ids() == []  # a refused create leaves no directory behind
    raw = api.raw("POST", "/vms", None)
    assert raw[0] == 400

    # not JSON at all
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(server.path))
    s.sendall(b"POST /vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\n{{{{{")
    assert _answer(s).startswith(b"HTTP/1.1 400")
    assert api.call("GET", "/")["vms"] == 0


def test_a_100mb_body_is_refused_without_being_read(served):
    server, _ = served
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(server.path))
    s.settimeout(10)
    t0 = time.monotonic()
    s.sendall(b"POST /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
    reply = _answer(s)
    assert time.monotonic() - t0 < 5
    assert reply.startswith(b"HTTP/1.1 400") and b"larger than the limit of 1048576" in reply
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(server.path))
    s.sendall(b"POST /vms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert b"Transfer-Encoding is not supported" in _answer(s)
    assert HttpClient(str(server.path)).call("GET", "/")["vms"] == 0


def test_tcp_needs_the_bearer_token(served):
    server, _ = served
    host, port = server.tcp_address
    where = f"tcp:{host}:{port}"
    assert _fault(HttpClient(where), "GET", "/vms")[0] == 401
    assert _fault(HttpClient(where, token="wrong-token-0123456789"), "GET", "/vms")[0] == 401
    # refused before the body is read: a large body is not waited for
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"POST /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 401")
    s.close()
    assert HttpClient(where, token=TOKEN).call("GET", "/vms") == []


def test_tcp_is_never_served_without_a_token(tmp_path):
    fleet = Fleet(StateDir(tmp_path / "s"), SpawnLauncher(), None)
    with pytest.raises(ConfigError, match="--tcp needs --token-file"):
        DaemonServer(DaemonApi(fleet), tmp_path / "s" / "sock", tcp=("127.0.0.1", 0), token=None)
    assert not (tmp_path / "s" / "sock").exists()


def test_token_files_are_checked(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others: chmod 600"):
        read_token(f)
    f.chmod(0o600)
    assert read_token(f) == TOKEN
    f.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(f)
    with pytest.raises(ConfigError, match="cannot read the token file"):
        read_token(tmp_path / "none")


def test_the_socket_serves_only_its_owner_and_root():
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root")
    top = Path(tempfile.mkdtemp(prefix="corral-peer-"))  # under /tmp: another uid can reach it
    try:
        state = StateDir(top / "s")
        server = DaemonServer(DaemonApi(Fleet(state, SpawnLauncher(), None)), top / "s" / "corral.sock")
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        os.chmod(top, 0o755)
        os.chmod(state.root, 0o755)
        os.chmod(server.path, 0o666)  # an operator widened it: the peer check still holds
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
            "try:\n"
            "    s.sendall(b'GET /vms HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
            "    print(repr(s.recv(100)))\n"
            "except OSError as e:\n"
            "    print('error', e.errno)\n"
        )
        r = subprocess.run(
            ["python3", "-c", code, str(server.path)], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr  # it could connect: only the peer check stands
        assert r.stdout.strip() in ("b''", "error 104", "error 32"), r.stdout
        assert HttpClient(str(server.path)).call("GET", "/")["vms"] == 0  # root is served
        server.close()
    finally:
        shutil.rmtree(top)


def test_vms_found_in_the_state_directory_are_listed_as_they_are(tmp_path):
    state = StateDir(tmp_path / "s")
    fleet = Fleet(state, SpawnLauncher(), None)
    gone = subprocess.Popen(["true"])
    gone.wait()
    d = state.new("gone")
    d.write(d.record, VmRecord(id="gone", created=time.time() - 100, source="config").model_dump_json())
    d.write(d.pid_file, f"{gone.pid} 1\n")
    state.new("norecord")
    stopped = state.new("stopped-one")
    stopped.write(stopped.record, VmRecord(id="stopped-one", created=1.0, source="config").model_dump_json())
    stopped.write(stopped.pid_file, f"{gone.pid} 1\n")
    stopped.write(stopped.stopped, b"")
    stopped.write(stopped.exit_file, json.dumps({"how": "exited with status 0"}))
    listed = {v.id: v for v in fleet.list()}
    assert listed["gone"].state == "dead" and "exit status unknown" in (listed["gone"].exit or "")
    assert listed["norecord"].state == "dead" and "record (vm.json)" in (listed["norecord"].exit or "")
    assert listed["stopped-one"].state == "stopped" and listed["stopped-one"].exit == "exited with status 0"
    fleet.remove("gone")
    assert state.ids() == ["norecord", "stopped-one"]


def test_metrics_text_is_prometheus_exposition(tmp_path):
    state = StateDir(tmp_path / "s")
    me = VmInfo(id="me", state="running", pid=os.getpid(), vcpus=2, mem_mib=128)
    dead = VmInfo(id="dead", state="dead")
    text = render([(me, state.vm("me")), (dead, state.vm("dead"))], None)
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? -?[0-9.e+]+$')
    seen = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            assert name not in seen
            seen.add(name)
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
    assert 'corral_vm_up{vm="me"} 1' in text and 'corral_vm_up{vm="dead"} 0' in text
    assert 'corral_vms{state="running"} 1' in text and 'corral_vms{state="dead"} 1' in text
    assert f'corral_vm_guest_memory_bytes{{vm="me"}} {128 << 20}' in text
    pss = re.search(r'corral_vm_memory_bytes\{vm="me",kind="pss"\} (\d+)', text)
    assert pss and int(pss.group(1)) > 1 << 20  # this very process's memory
    assert re.search(r'corral_vm_cpu_seconds_total\{vm="me",mode="user"\} [0-9.]+', text)
    assert 'vm="dead",mode' not in text


def test_a_console_that_grows_without_end_is_cut_to_its_tail(tmp_path):
    state = StateDir(tmp_path / "s")
    fleet = Fleet(state, SpawnLauncher(), None)
    d = state.new("chatty")
    with open(d.console, "wb") as f:
        f.truncate(FILE_MAX + 4096)  # sparse: costs no disk
        f.seek(0, os.SEEK_END)
        f.write(b"the last line\n")
    fleet.cap_files()
    data = d.console.read_bytes()
    assert len(data) <= FILE_KEEP + 64
    assert data.startswith(b"[corral: earlier output dropped]") and data.endswith(b"the last line\n")
    with open(d.console, "ab") as f:  # the VM appends on after the cut
        f.write(b"more\n")
    assert d.console.read_bytes().endswith(b"the last line\nmore\n")
    assert b"".join(fleet.console("chatty", follow=False)).endswith(b"more\n")
