"""The control socket (corral/api.py): typed requests validated before anything happens, each
verb reaching the machine, typed replies through ControlClient, errors as one line, and a
server that keeps serving after bad requests. The machine is a fake that records the verbs."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from support.hostile import NOBODY, knock_as, open_dir, umask

import corral.api as api
from corral.api import ControlClient, ControlServer, MigrationProgress, NoControlSocket, call
from corral.devices.virtio.balloon import BalloonInfo
from corral.errors import CorralError
from corral.machine import MachineStatus, VmStateError
from corral.migration import MigrationStats
from corral.state.snapshot import SnapshotStats


class FakeMachine:
    """What ControlServer calls on a Machine, recorded."""

    def __init__(self) -> None:
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


def raw(path: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(line)
        return json.loads(s.makefile("rb").readline())


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


def test_a_balloon_size_may_be_written_with_a_unit(served):
    machine, _, path = served
    assert call(path, {"op": "balloon", "target": "1G"})["target_bytes"] == 1 << 30
    assert machine.balloon_target == 1 << 30


def test_migration_progress_streams_before_the_reply(served, monkeypatch):
    machine, client, _ = served
    seen_by_migrate = {}

    def fake_migrate(m, to, *, downtime_limit, progress, **auth):
        seen_by_migrate.update(machine=m, to=to, downtime_limit=downtime_limit, **auth)
        progress(1, 1000, 500)
        progress(2, 1500, 0)
        return MigrationStats(rounds=2, bytes_sent=1500, total_seconds=0.5, downtime_seconds=0.002)

    monkeypatch.setattr(api, "migrate", fake_migrate)
    rounds: list[MigrationProgress] = []
    stats = client.migrate("10.0.0.2:7000", downtime_ms=250, on_progress=rounds.append, token="t" * 16)
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
    ("line", "error"),
    [
        (b"not json\n", "bad request: "),
        (b'{"op": "reboot"}\n', "bad request: "),
        (b'{"op": "pause", "force": true}\n', "bad request: pause.force: Extra inputs are not permitted"),
        (b'{"op": "snapshot", "path": ""}\n', "bad request: snapshot.path"),
        (b'{"op": "migrate", "to": "x:1", "downtime_ms": 0}\n', "bad request: migrate.downtime_ms"),
        (b'{"op": "balloon", "target": [1]}\n', "bad request: balloon.target"),
        (b"[]\n", "bad request: "),
    ],
)
def test_bad_requests_are_refused_before_anything_happens_and_the_server_serves_on(served, line, error):
    machine, client, path = served
    reply = raw(path, line)
    assert reply["ok"] is False and reply["error"].startswith(error), reply
    assert "\n" not in reply["error"]
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


def test_closing_the_server_removes_its_socket(tmp_path):
    server = ControlServer(FakeMachine(), tmp_path / "vm.sock")  # type: ignore[arg-type]
    assert (tmp_path / "vm.sock").is_socket()
    server.close()
    assert not (tmp_path / "vm.sock").exists()
    with pytest.raises(NoControlSocket):
        ControlClient(tmp_path / "vm.sock").status()


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")


@as_root
def test_the_control_socket_is_the_owners_alone_whatever_the_umask():
    with open_dir() as d, umask(0):
        machine = FakeMachine()
        server = ControlServer(machine, d / "vm.sock")  # type: ignore[arg-type]
        try:
            assert stat.S_IMODE(os.stat(d / "vm.sock").st_mode) == 0o600
            assert knock_as(NOBODY, d / "vm.sock", '{"op": "stop"}') == "connect: EACCES"
            assert machine.calls == []
        finally:
            server.close()


@as_root
def test_another_user_is_refused_with_one_line_even_on_a_widened_socket():
    """An operator may chmod the socket or share its directory: the peer's uid is still checked
    (SO_PEERCRED), so another user gets one refusal line and nothing happens."""
    with open_dir() as d:
        machine = FakeMachine()
        server = ControlServer(machine, d / "vm.sock")  # type: ignore[arg-type]
        try:
            os.chmod(d / "vm.sock", 0o666)
            out = knock_as(NOBODY, d / "vm.sock", '{"op": "stop"}')
            assert out.startswith("reply: "), out
            assert json.loads(out.removeprefix("reply: ")) == {
                "ok": False,
                "error": f"uid {NOBODY} may not control this VM: only root may",
            }
            assert machine.calls == []
            assert ControlClient(d / "vm.sock").status().state == "running"  # the owner still is served
        finally:
            server.close()
