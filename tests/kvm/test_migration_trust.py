"""The migration listener against hostile peers, on real TCP over 127.0.0.1 and the real
/dev/kvm (issue 13, finding 1): whoever connects must prove the token before anything is
built; a port scan, a bare connect, a wrong token, a crafted hello, a silent or trickling peer
each fail alone, in one logged line, and a real migration then arrives on the same listener;
the guest's host resources come from the destination's operator, never from the peer."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time

import pytest
from support.live_probe import LiveProbe, assert_continues, reference_rounds

from corral._version import __version__
from corral.config import DiskConfig, HostResources
from corral.images.probe import build_probe
from corral.machine import Machine
from corral.migration import (
    PROTOCOL,
    MigrationError,
    _handshake_out,
    _Link,
    certificate_pin,
    listen,
    migrate,
    receive,
    server_tls,
)

CMD = "mem-touch 16M forever"
TOKEN = "the-right-token-0123456789abcdef"


class Listener:
    """One listening socket; receive() on a thread, as often as the test asks."""

    def __init__(self, **kw: object) -> None:
        self.server = listen("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.kw = {"token": TOKEN, **kw}
        self.machine: Machine | None = None
        self.out = bytearray()  # the arriving guest's console
        self.error: Exception | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.machine, self.error = None, None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.machine = receive(self.server, console=self.out.extend, accept_timeout=60, **self.kw)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def join(self, timeout: float = 30) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "receive() is still waiting"

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self.server.close()
        if self._thread is not None:
            self._thread.join(5)
        if self.machine is not None:
            self.machine.stop("test done")
            self.machine.close()


@pytest.fixture
def source():
    p = LiveProbe.boot(CMD)
    p.wait_rounds(1)
    yield p
    p.close()


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def drained(s: socket.socket, timeout: float = 15) -> float:
    """Seconds until the receiver hangs up on `s` (reading whatever it sends meanwhile)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def authenticated(address: str, token: str = TOKEN) -> _Link:
    """A client that holds the token: what a compromised or buggy source could send."""
    link = _Link(connect(address))
    _handshake_out(link, token.encode())
    return link


def wait_logged(caplog, n: int, timeout: float = 15) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_bad_peers_each_fail_alone_then_a_real_migration_arrives(source, caplog):
    caplog.set_level(logging.WARNING, logger="corral.migration")
    dest = Listener(handshake_timeout=2.0)
    dest.start()
    try:
        # a port scan: connect and close at once, and a connect that resets
        connect(dest.address).close()
        s = connect(dest.address)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
        # a crafted hello: junk where the proof goes
        with connect(dest.address) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(100))
            drained(s)
        # a wrong token: the client is told, and learns nothing else
        link = _Link(connect(dest.address))
        with pytest.raises(MigrationError, match="refused the token"):
            _handshake_out(link, b"not-the-right-token-at-all")
        link.close()
        # a source with no token meets a receiver that wants one
        with pytest.raises(MigrationError, match="checks a token"):
            migrate(source.machine, dest.address, insecure=True)
        # a silent peer and a trickling one are cut at the handshake deadline (2 s here)
        with connect(dest.address) as s:
            assert drained(s) < 5
        with connect(dest.address) as s:
            s.recv(64)  # the greeting
            t0 = time.monotonic()
            with pytest.raises(OSError):
                for _ in range(20):
                    s.sendall(b"C")
                    time.sleep(0.4)
                    if time.monotonic() - t0 > 6:
                        raise AssertionError("the receiver let a trickling peer hold it")
        logged = wait_logged(caplog, 7, timeout=5)
        assert len(logged) >= 6, logged
        assert all("still listening" in line and "\n" not in line for line in logged)
        assert any("wrong token" in line for line in logged)
        assert any("handshake in 2 s" in line for line in logged)
        assert dest.running() and dest.machine is None
        # and the real source still gets through, to the same listener
        stats = migrate(source.machine, dest.address, token=TOKEN)
        dest.join()
        assert dest.error is None and dest.machine is not None and stats.bytes_sent > 0
        arrived = LiveProbe(dest.machine)
        arrived._out = dest.out  # the UART writes where receive() was told
        dest.machine = None
        try:
            left_at = source.last_round()
            arrived.machine.start()
            arrived.wait_rounds(left_at + 2)
            assert_continues(reference_rounds(CMD, arrived.last_round()), arrived)
        finally:
            arrived.close()
    finally:
        dest.close()


def test_a_crafted_hello_from_a_token_holder_fails_alone(source):
    """Past the handshake the peer holds the token, but its hello is still checked: each bad
    one ends that receive() with one line, and the listener takes the next migration."""
    dest = Listener()
    try:
        bad = [
            {"protocol": PROTOCOL, "corral_version": __version__},
            {"protocol": PROTOCOL, "corral_version": __version__, "config": {"kernel": "x", "cpus": 10**9}},
            {"protocol": PROTOCOL, "corral_version": __version__, "config": [[[[]]]] * 3, "cpu": None},
            {"protocol": 99, "corral_version": "0"},
        ]
        for hello in bad:
            dest.start()
            link = authenticated(dest.address)
            link.send_json(hello)
            reply = link.recv()
            link.close()
            dest.join()
            assert "error" in reply and isinstance(dest.error, MigrationError), reply
            assert "\n" not in str(dest.error)
        # a message larger than the hello limit is refused before it is read
        dest.start()
        link = authenticated(dest.address)
        link.sock.sendall(b"J" + (64 << 20).to_bytes(4, "little"))
        dest.join()
        assert "too large" in str(dest.error)
        link.close()
        dest.start()
        migrate(source.machine, dest.address, token=TOKEN)
        dest.join()
        assert dest.machine is not None
    finally:
        dest.close()


def test_a_peer_cannot_name_a_host_disk(tmp_path):
    """A root-only file named as the guest's disk by the peer is never opened: refused by field
    name; the operator's own image is what the guest gets."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n".ljust(512) * 16)
    secret.chmod(0o600)
    before = secret.read_bytes()
    img = tmp_path / "granted.img"
    img.write_bytes(bytes(1 << 20))
    # a hand-made peer: the kernel, and a disk it wants this host to open read-write
    dest = Listener()
    dest.start()
    try:
        link = authenticated(dest.address)
        link.send_json(
            {
                "protocol": PROTOCOL,
                "corral_version": __version__,
                "cpu": {},
                "config": {"kernel": str(build_probe()), "disks": [{"path": str(secret)}]},
            }
        )
        reply = link.recv()
        link.close()
        dest.join()
        assert "disks[0]: the source has 1 disk(s)" in reply["error"], reply
        assert secret.read_bytes() == before
    finally:
        dest.close()
    # a real source with a disk: refused while the operator gives none, then given one
    src = LiveProbe.boot(CMD, disks=[DiskConfig(path=secret)])
    try:
        src.wait_rounds(1)
        dest = Listener()
        dest.start()
        try:
            with pytest.raises(MigrationError, match=r"destination refused: disks\[0\]"):
                migrate(src.machine, dest.address, token=TOKEN)
            dest.join()
            assert isinstance(dest.error, MigrationError)
        finally:
            dest.close()
        src.wait_rounds(src.last_round() + 1)  # the source runs on
        dest = Listener(host=HostResources(disks=(DiskConfig(path=img),)))
        dest.start()
        try:
            migrate(src.machine, dest.address, token=TOKEN)
            dest.join()
            assert dest.machine is not None
            assert [d.path for d in dest.machine.config.disks] == [img]
        finally:
            dest.close()
    finally:
        src.close()


def test_receive_needs_a_token_or_insecure_and_listens_on_loopback():
    srv = listen("0")
    try:
        assert srv.getsockname()[0] == "127.0.0.1"
        with pytest.raises(MigrationError, match="no migration token"):
            receive(srv, accept_timeout=0.1)
    finally:
        srv.close()


def test_an_insecure_receiver_is_refused_by_a_source_with_a_token(source):
    dest = Listener(token=None, insecure=True)
    dest.start()
    try:
        with pytest.raises(MigrationError, match="checks no token"):
            migrate(source.machine, dest.address, token=TOKEN)
        assert dest.running()
        migrate(source.machine, dest.address, insecure=True)
        dest.join()
        assert dest.machine is not None
    finally:
        dest.close()


@pytest.fixture
def certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-subj", "/CN=corral-test", "-days", "2", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {r.stderr[-200:]!r}")
    return cert, key


def test_tls_with_a_pinned_certificate(source, certificate, caplog):
    cert, key = certificate
    caplog.set_level(logging.WARNING, logger="corral.migration")
    dest = Listener(tls=server_tls(cert, key), handshake_timeout=3.0)
    dest.start()
    try:
        with pytest.raises(MigrationError, match="not the pinned one"):
            migrate(source.machine, dest.address, token=TOKEN, tls_pin="00" * 32)
        # a plain-TCP source gets nothing from a TLS receiver
        with pytest.raises(MigrationError, match="runs on here"):
            migrate(source.machine, dest.address, token=TOKEN)
        assert dest.running()
        migrate(source.machine, dest.address, token=TOKEN, tls_pin=certificate_pin(cert))
        dest.join()
        assert dest.machine is not None
        assert len(wait_logged(caplog, 2)) >= 2
    finally:
        dest.close()


def test_token_files_must_be_private(tmp_path):
    from corral.errors import ConfigError
    from corral.migration import load_token

    f = tmp_path / "token"
    f.write_text(TOKEN)
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="can be read by other users: chmod 600"):
        load_token(f)
    f.chmod(0o600)
    assert load_token(f) == TOKEN.encode()
    f.write_text("short")
    with pytest.raises(ConfigError, match="16 to 4096 bytes"):
        load_token(f)
    os.symlink(f, tmp_path / "link")
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(tmp_path / "link")
