"""The control socket (corral/api.py): Firecracker's API over a running machine, with corral's
endpoints beside it. Each ControlClient verb reaches the machine over HTTP and comes back typed;
a migration's progress streams while it runs; refusals are one line; bad requests get 400 and
change nothing; other users are refused; the socket goes when the server does. The machine is a
fake that records the verbs (tests/kvm/test_cli_state.py drives a real one)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from support.hostile import NOBODY, knock_as, open_dir, umask

import corral.firecracker.routes as routes
from corral.api import ControlClient, ControlServer, MigrationProgress, NoControlSocket
from corral.config import MachineConfig
from corral.devices.virtio.balloon import BalloonInfo
from corral.errors import CorralError
from corral.firecracker.server import refusal
from corral.firecracker.vmm import FIRECRACKER_API_VERSION, PRE_BOOT_ONLY
from corral.machine import MachineStatus, VmStateError
from corral.migration import MigrationStats
from corral.state.snapshot import SnapshotStats


class FakeMachine:
    """What the control socket calls on a Machine, recorded."""

    def __init__(self) -> None:
        self.config = MachineConfig.build(kernel="/k", cmdline="idle", cpus=2, memory=256 << 20, balloon=True)
        self.calls: list[tuple[object, ...]] = []
        self.paused = False
        self.balloon_target = 0
        self.fail_with: CorralError | None = None

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def pause(self) -> None:
        self._check()
        self.calls.append(("pause",))
        self.paused = True

    def resume(self) -> None:
        self.calls.append(("resume",))
        self.paused = False

    def stop(self, message: str) -> None:
        self.calls.append(("stop", message))

    def status(self) -> MachineStatus:
        return MachineStatus(state="paused" if self.paused else "running", cpus=2, memory=256 << 20)

    def snapshot(self, path: str) -> SnapshotStats:
        self._check()
        self.calls.append(("snapshot", path))
        return SnapshotStats(path=Path(path), seconds=0.012, memory_bytes_written=4096, disk_bytes=8192)

    def set_balloon(self, target: int) -> None:
        self._check()
        self.calls.append(("set_balloon", target))
        self.balloon_target = target

    def balloon_info(self) -> BalloonInfo:
        self._check()
        return BalloonInfo(
            target_bytes=self.balloon_target,
            actual_bytes=self.balloon_target // 2,
            host_resident_bytes=64 << 20,
            inflated=3,
            deflated=1,
            reported_bytes=0,
            bad_pfns=0,
            stats={"free_memory": 100 << 20},
        )


@pytest.fixture
def served(tmp_path):
    machine = FakeMachine()
    server = ControlServer(machine, tmp_path / "vm.sock")  # type: ignore[arg-type]
    yield machine, ControlClient(tmp_path / "vm.sock"), tmp_path / "vm.sock"
    server.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def http_call(path: Path, method: str, target: str, body: bytes | None = None) -> tuple[int, object]:
    conn = UnixHTTPConnection(path)
    conn.request(method, target, body=body)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw) if raw else None


def test_each_verb_reaches_the_machine_and_replies_typed(served):
    machine, client, _ = served
    assert client.status() == MachineStatus(state="running", cpus=2, memory=256 << 20)
    client.pause()
    assert machine.paused and client.status().state == "paused"
    client.resume()
    client.stop()
    snap = client.snapshot("/srv/snaps/a")
    assert snap == SnapshotStats(
        path=Path("/srv/snaps/a"), seconds=0.012, memory_bytes_written=4096, disk_bytes=8192
    )
    info = client.balloon(256 << 20)
    assert isinstance(info, BalloonInfo) and info.target_bytes == 256 << 20 and info.actual_bytes == 128 << 20
    assert info.stats == {"free_memory": 100 << 20}
    assert client.balloon().target_bytes == 256 << 20  # no target: only read
    assert machine.calls == [
        ("pause",),
        ("resume",),
        ("stop", "stopped through the control socket"),
        ("snapshot", "/srv/snaps/a"),
        ("set_balloon", 256 << 20),
    ]


def test_the_socket_speaks_firecrackers_api_for_the_running_machine(served):
    machine, _, path = served
    status, info = http_call(path, "GET", "/")
    assert status == 200 and info == {
        "app_name": "corral",
        "id": "corral",
        "state": "Running",
        "vmm_version": FIRECRACKER_API_VERSION,
    }
    status, config = http_call(path, "GET", "/vm/config")
    assert status == 200 and isinstance(config, dict)
    assert config["machine-config"]["vcpu_count"] == 2 and config["machine-config"]["mem_size_mib"] == 256
    assert config["boot-source"] == {"kernel_image_path": "/k", "boot_args": "idle"}
    assert http_call(path, "PATCH", "/vm", b'{"state": "Paused"}') == (204, None)
    assert machine.paused and http_call(path, "GET", "/")[1]["state"] == "Paused"  # type: ignore[index]
    # Firecracker's balloon verbs reach the same balloon, in MiB
    assert http_call(path, "PATCH", "/balloon", b'{"amount_mib": 64}') == (204, None)
    assert machine.balloon_target == 64 << 20
    status, stats = http_call(path, "GET", "/balloon/statistics")
    assert status == 200 and stats["target_mib"] == 64 and stats["free_memory"] == 100 << 20  # type: ignore[index]
    # a running machine is post-boot: pre-boot requests get Firecracker's refusal
    status, reply = http_call(path, "PUT", "/boot-source", b'{"kernel_image_path": "/k"}')
    assert status == 400 and reply == {"fault_message": PRE_BOOT_ONLY}


def test_a_balloon_size_may_be_written_with_a_unit(served):
    machine, client, _ = served
    assert client.balloon("1G").target_bytes == 1 << 30
    assert machine.balloon_target == 1 << 30


def test_migration_progress_streams_while_it_runs(served, monkeypatch):
    machine, client, _ = served
    seen_by_migrate = {}
    heard = threading.Event()

    def fake_migrate(m, to, *, downtime_limit, progress, **auth):
        seen_by_migrate.update(machine=m, to=to, downtime_limit=downtime_limit, **auth)
        progress(1, 1000, 500)
        # the client hears round 1 while the migration still runs (not buffered to the end)
        if not heard.wait(5):
            raise CorralError("round 1 never reached the client")
        progress(2, 1500, 0)
        return MigrationStats(rounds=2, bytes_sent=1500, total_seconds=0.5, downtime_seconds=0.002)

    monkeypatch.setattr(routes, "migrate", fake_migrate)
    rounds: list[MigrationProgress] = []

    def on_progress(p: MigrationProgress) -> None:
        rounds.append(p)
        heard.set()

    stats = client.migrate("10.0.0.2:7000", downtime_ms=250, on_progress=on_progress, token="t" * 16)
    assert seen_by_migrate == {
        "machine": machine,
        "to": "10.0.0.2:7000",
        "downtime_limit": 0.25,
        "token": "t" * 16,
        "tls_pin": None,
        "insecure": False,
    }
    assert rounds == [
        MigrationProgress(round=1, sent=1000, dirty=500),
        MigrationProgress(round=2, sent=1500, dirty=0),
    ]
    assert stats.rounds == 2 and stats.downtime_seconds == 0.002


def test_a_failed_migration_is_one_line_and_the_vm_serves_on(served, monkeypatch):
    _, client, _ = served

    def fail(m, to, *, downtime_limit, progress, **auth):
        progress(1, 10, 10)
        raise CorralError("cannot reach 10.0.0.9:7000: Connection refused; the guest runs on here")

    monkeypatch.setattr(routes, "migrate", fail)
    with pytest.raises(CorralError, match=r"^cannot reach 10\.0\.0\.9:7000: Connection refused; the guest"):
        client.migrate("10.0.0.9:7000", insecure=True)
    with pytest.raises(CorralError, match=r"^bad request: downtime_ms: Input should be greater than"):
        client.migrate("10.0.0.9:7000", downtime_ms=0, insecure=True)
    assert client.status().state == "running"


def test_a_refusal_from_the_machine_is_one_line_and_changes_nothing(served):
    machine, client, _ = served
    machine.fail_with = VmStateError("this VM has no balloon: give it one (balloon=True in its config)")
    with pytest.raises(
        CorralError, match=r"^this VM has no balloon: give it one \(balloon=True in its config\)$"
    ):
        client.balloon(1 << 20)
    with pytest.raises(CorralError, match="no balloon"):
        client.pause()
    assert machine.calls == [] and not machine.paused


@pytest.mark.parametrize(
    ("method", "target", "body", "error"),
    [
        ("PUT", "/corral/snapshot", b"not json", "the body is not JSON"),
        ("PUT", "/corral/reboot", b"{}", "Invalid request method and/or path: PUT /corral/reboot."),
        ("PATCH", "/vm", b'{"state": "Paused", "force": true}', "unknown field `force`"),
        ("PUT", "/corral/snapshot", b'{"path": ""}', "invalid value for `path`"),
        ("PUT", "/corral/migrate", b'{"to": "x:1", "downtime_ms": 0}', "invalid value for `downtime_ms`"),
        ("PATCH", "/corral/balloon", b'{"target": [1]}', "`target`"),
        ("PATCH", "/corral/balloon", b'{"target": "lots"}', "lots"),
        ("PUT", "/corral/snapshot", b"[]", "the body must be a JSON object"),
        ("PUT", "/corral/snapshot", None, "Empty PUT request."),
    ],
)
def test_bad_requests_are_refused_before_anything_happens_and_the_server_serves_on(
    served, method, target, body, error
):
    machine, client, path = served
    status, reply = http_call(path, method, target, body)
    assert status == 400 and isinstance(reply, dict), reply
    assert error in reply["fault_message"] and "\n" not in reply["fault_message"], reply
    assert machine.calls == []
    assert client.status().state == "running"  # still serving


def test_many_clients_at_once(served):
    _, client, _ = served
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(20):
                assert client.status().cpus == 2
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []


def test_the_openapi_document_is_served(served):
    _, client, _ = served
    doc = client.openapi()
    assert doc == routes.openapi()
    assert "/corral/migrate" in doc["paths"] and "/snapshot/create" in doc["paths"]


def test_no_socket_is_named_by_its_path(tmp_path):
    with pytest.raises(NoControlSocket) as exc:
        ControlClient(tmp_path / "none.sock").status()
    assert exc.value.path == str(tmp_path / "none.sock")
    assert str(exc.value) == f"no control socket at {tmp_path / 'none.sock'}"


def test_a_vm_that_hangs_up_without_answering_is_one_line(tmp_path):
    path = tmp_path / "mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def hang_up() -> None:
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    with pytest.raises(CorralError, match="closed the connection without answering"):
        ControlClient(path).status()
    t.join(5)
    srv.close()


def test_a_peer_that_speaks_no_http_is_one_line(tmp_path):
    path = tmp_path / "old.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def json_lines() -> None:  # what the old JSON-lines socket answered
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.sendall(b'{"ok": false, "error": "bad request"}\n')
        conn.close()

    t = threading.Thread(target=json_lines)
    t.start()
    with pytest.raises(CorralError, match="closed the connection without answering"):
        ControlClient(path).status()
    t.join(5)
    srv.close()


def test_closing_the_server_removes_its_socket(tmp_path):
    server = ControlServer(FakeMachine(), tmp_path / "vm.sock")  # type: ignore[arg-type]
    assert (tmp_path / "vm.sock").is_socket()
    server.close()
    assert not (tmp_path / "vm.sock").exists()
    with pytest.raises(NoControlSocket):
        ControlClient(tmp_path / "vm.sock").status()


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
STOP = "PUT /corral/stop HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


@as_root
def test_the_control_socket_is_the_owners_alone_whatever_the_umask():
    with open_dir() as d, umask(0):
        machine = FakeMachine()
        server = ControlServer(machine, d / "vm.sock")  # type: ignore[arg-type]
        try:
            assert stat.S_IMODE(os.stat(d / "vm.sock").st_mode) == 0o600
            assert knock_as(NOBODY, d / "vm.sock", STOP) == "connect: EACCES"
            assert machine.calls == []
        finally:
            server.close()


@as_root
def test_another_user_is_refused_even_on_a_widened_socket():
    """An operator may chmod the socket or share its directory: the peer's uid is still checked
    (SO_PEERCRED), so another user gets a 403 and nothing happens."""
    with open_dir() as d:
        machine = FakeMachine()
        server = ControlServer(machine, d / "vm.sock")  # type: ignore[arg-type]
        try:
            os.chmod(d / "vm.sock", 0o666)
            assert knock_as(NOBODY, d / "vm.sock", STOP) == "reply: HTTP/1.1 403 Forbidden"
            assert refusal(NOBODY) == f"uid {NOBODY} may not control this VM: only root may"
            assert machine.calls == []
            assert ControlClient(d / "vm.sock").status().state == "running"  # the owner still is served
        finally:
            server.close()
