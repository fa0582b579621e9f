"""Live migration between corral processes and threads, on the real /dev/kvm, proven by the
probe's mem-touch guest: it keeps writing and checking memory, so a page lost in transit shows
as a round that reads back wrong, and a guest that restarted shows as round numbers that do."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from support.live_probe import LiveProbe, assert_continues, reference_rounds
from support.results import progress_rounds

from corral.api import ControlClient
from corral.errors import CorralError
from corral.machine import Machine, VmStateError
from corral.migration import MigrationError, listen, migrate, receive

CMD = "mem-touch 32M forever"
TOKEN = "a-test-token-shared-by-both-ends"


def token_file(tmp_path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return str(path)


class Destination:
    """`receive` on a thread of this process; the arriving machine is wrapped in a LiveProbe."""

    def __init__(self, address: str = "127.0.0.1:0", **kw) -> None:
        self.server = listen(address)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.probe: LiveProbe | None = None
        self.error: Exception | None = None
        self._out = bytearray()
        self._thread = threading.Thread(target=self._run, kwargs=kw, daemon=True)
        self._thread.start()

    def _run(self, **kw) -> None:
        try:
            kw.setdefault("token", TOKEN)
            m = receive(self.server, console=self._out.extend, accept_timeout=30, **kw)
            self.probe = LiveProbe(m)
            self.probe._out = self._out
            m.start()
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc
        finally:
            self.server.close()

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive()

    def close(self) -> None:
        self.join()
        if self.probe is not None:
            self.probe.close()


@pytest.fixture
def source():
    p = LiveProbe.boot(CMD)
    p.wait_rounds(2)
    yield p
    p.close()


def assert_still_running(p: LiveProbe) -> None:
    assert not p.machine.paused and not p.machine._stopped.is_set()
    p.wait_rounds(p.last_round() + 2)


def test_migration_moves_the_running_guest(source):
    dest = Destination()
    try:
        stats = migrate(source.machine, dest.address, token=TOKEN)
        # the downtime runs to the destination's word that the guest runs there
        assert set(stats.downtime_ms) == {"pause", "final pages", "state", "destination", "go", "start"}
        assert stats.downtime_seconds * 1000 >= sum(stats.downtime_ms.values()) * 0.99
        dest.join()
        assert dest.error is None and dest.probe is not None
        result = source.machine.wait(5)
        assert result is not None and result.kind == "stopped" and "migrated" in result.message
        left_at = source.last_round()
        dest.probe.wait_rounds(left_at + 3)
        assert min(dest.probe.rounds()) >= left_at  # continued, did not restart
        assert_continues(reference_rounds(CMD, dest.probe.last_round()), dest.probe)
        assert stats.bytes_sent >= 32 << 20 and stats.downtime_seconds > 0
    finally:
        dest.close()


def test_a_tight_downtime_limit_takes_more_rounds_and_still_arrives(source):
    dest = Destination()
    rounds = []
    try:
        stats = migrate(
            source.machine,
            dest.address,
            token=TOKEN,
            downtime_limit=1e-6,
            max_rounds=4,
            progress=lambda r, sent, dirty: rounds.append((r, dirty)),
        )
        dest.join()
        # the guest rewrites 32 MiB per round, so the 36 MiB first copy leaves pages dirty
        assert stats.rounds >= 1 and [r for r, _ in rounds] == list(range(1, stats.rounds + 1))
        assert len(stats.round_bytes) == stats.rounds + 1 and stats.round_bytes[1] > 0
        assert dest.probe is not None
        dest.probe.wait_rounds(source.last_round() + 2)
        assert_continues(reference_rounds(CMD, dest.probe.last_round()), dest.probe)
    finally:
        dest.close()


def test_throttle_slows_but_never_stops_the_guest(source):
    from corral.migration import _Throttle

    t = _Throttle(source.machine)
    for _ in range(5):
        t.increase()
    assert t.fraction == pytest.approx(0.9)
    try:
        source.wait_rounds(source.last_round() + 2)  # still makes progress at 10%
    finally:
        t.stop()
    assert not any(v.pause_requested for v in source.machine.vcpus)
    assert_still_running(source)


def test_target_not_listening(source):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(MigrationError, match="cannot reach .*is `corral receive` listening"):
        migrate(source.machine, f"127.0.0.1:{port}", token=TOKEN)
    assert_still_running(source)


def test_destination_that_refuses(source):
    dest = Destination(kvm_path="/nonexistent/kvm")
    try:
        with pytest.raises(MigrationError, match="destination refused: /nonexistent/kvm does not exist"):
            migrate(source.machine, dest.address, token=TOKEN)
        dest.join()
        assert isinstance(dest.error, MigrationError) and dest.probe is None
        assert_still_running(source)
    finally:
        dest.close()


@pytest.mark.parametrize("phase", ["hello", "memory", "state", "go"])
def test_cut_connection_leaves_the_source_running(source, phase):
    dest = Destination()
    try:
        with pytest.raises(MigrationError, match="the guest runs on here"):
            migrate(source.machine, dest.address, token=TOKEN, cut_at=phase)
        dest.join()
        assert dest.probe is None and isinstance(dest.error, MigrationError)
        assert_still_running(source)
        assert all(ok for _, ok in source.rounds().values())
        # and the source can still be migrated afterwards
        again = Destination()
        try:
            migrate(source.machine, again.address, token=TOKEN)
            again.join()
            assert again.probe is not None
            again.probe.wait_rounds(source.last_round() + 1)
        finally:
            again.close()
    finally:
        dest.close()


def test_a_guest_the_destination_cannot_start_is_reported_not_resumed(source, monkeypatch):
    """The destination took the guest (`go`) but its start failed: the source hears why and
    does not resume its copy (the destination's start may already have written its disks)."""
    started = Machine.start

    def fails_on_the_destination(self):
        if self is not source.machine:
            raise VmStateError("no vCPU could start (a test's failure)")
        started(self)

    monkeypatch.setattr(Machine, "start", fails_on_the_destination)
    dest = Destination()
    try:
        with pytest.raises(
            MigrationError, match=r"could not start it: .*a test's failure.*stopped on both hosts"
        ):
            migrate(source.machine, dest.address, token=TOKEN)
        dest.join()
        assert dest.probe is None and "did not start" in str(dest.error)
        result = source.machine.wait(5)
        assert result is not None and result.kind == "stopped"
    finally:
        dest.close()


def test_a_failure_after_the_hand_over_never_resumes_the_source(source, monkeypatch):
    """Once `go` is sent the destination owns the guest: a failure after it (here an error
    while the source reads the destination's word) stops the source's copy, never resumes it."""
    import corral.migration as migration_mod

    def broken(*args):
        raise OSError(104, "Connection reset by peer")

    monkeypatch.setattr(migration_mod, "_destination_started", broken)
    dest = Destination()
    try:
        with pytest.raises(MigrationError, match="after the hand-over was sent .*runs at the destination"):
            migrate(source.machine, dest.address, token=TOKEN)
        result = source.machine.wait(5)
        assert result is not None and result.kind == "stopped" and "migrated" in result.message
        dest.join()
        assert dest.error is None and dest.probe is not None
        dest.probe.wait_rounds(source.last_round() + 2)  # the guest runs on at the destination
    finally:
        dest.close()


def _receiver(address: str, token: str, *extra: str, netns: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "corral", "receive", "--listen", address, "--token-file", token]
    cmd += ["--timeout", "60", *extra]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_listening(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline().decode()
    assert "waiting for a migration" in line, line


def test_destination_killed_midway(tmp_path):
    src = LiveProbe.boot("mem-touch 128M forever")
    proc = _receiver("127.0.0.1:0", token_file(tmp_path))
    try:
        src.wait_rounds(1)
        line = proc.stdout.readline().decode()
        port = int(re.search(r":(\d+)\s*$", line).group(1))

        def kill_on_first_round(r, sent, dirty):
            if r == 1:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)

        with pytest.raises(MigrationError, match="the guest runs on here"):
            migrate(
                src.machine,
                f"127.0.0.1:{port}",
                token=TOKEN,
                downtime_limit=1e-4,
                max_rounds=30,
                progress=kill_on_first_round,
            )
        assert_still_running(src)
    finally:
        proc.kill()
        proc.wait()
        src.close()


@pytest.fixture
def second_host():
    """A second 'host': a network namespace joined to this one by a veth pair."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 for a network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, veth, peer = f"corral-b-{tag}", f"crl{tag}a", f"crl{tag}b"
    octet = int(tag[:2], 16) % 250 + 1
    here, there = f"10.{octet}.77.1", f"10.{octet}.77.2"
    cmds = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", veth, "type", "veth", "peer", "name", peer],
        ["ip", "link", "set", peer, "netns", ns],
        ["ip", "addr", "add", f"{here}/24", "dev", veth],
        ["ip", "link", "set", veth, "up"],
        ["ip", "-n", ns, "addr", "add", f"{there}/24", "dev", peer],
        ["ip", "-n", ns, "link", "set", peer, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        yield ns, there
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_migration_to_another_host(source, second_host, tmp_path):
    ns, address = second_host
    api = tmp_path / "b.sock"
    proc = _receiver(f"{address}:7400", token_file(tmp_path), "--api", str(api), netns=ns)
    try:
        _wait_listening(proc)
        stats = migrate(source.machine, f"{address}:7400", token=TOKEN)
        assert stats.bytes_sent >= 32 << 20
        left_at = source.last_round()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the socket file appears at bind(), before listen()
            try:
                assert ControlClient(api).status().state == "running"
                break
            except CorralError:
                time.sleep(0.05)
        assert ControlClient(api).status().state == "running"
        time.sleep(1.0)
        ControlClient(api).stop()
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    text = out.decode(errors="replace").replace("\r", "")
    assert "migration arrived" in text
    rounds = progress_rounds(text)
    assert rounds and min(rounds) >= left_at and max(rounds) > left_at + 1, text[-1500:]
    ref = reference_rounds(CMD, max(rounds))
    assert all(ok and ref[r][0] == c for r, (c, ok) in rounds.items())
