"""The migration channel without a VM: the token handshake both ways over real sockets, its
deadline against a trickling peer, the listener that logs a bad peer and waits on, and the
credentials' checks. (Whole migrations run on /dev/kvm in tests/kvm/test_migration*.py.)"""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from corral._version import __version__
from corral.errors import ConfigError
from corral.migration import (
    MAX_HANDSHAKES,
    PROTOCOL,
    MigrationError,
    _accept,
    _handshake_out,
    _Link,
    check_pin,
    check_token,
    listen,
    receive,
)

TOKEN = b"0123456789abcdef-shared"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of one TCP connection over loopback: (the accepted one, the client)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        client = socket.create_connection(srv.getsockname())
        accepted, _ = srv.accept()
    return accepted, client


def handshake(dest_token: bytes | None, source_token: bytes | None, timeout: float = 2.0):
    """Both halves over one TCP connection; returns (destination's error, source's error)."""
    a, b = tcp_pair()
    errors: dict[str, Exception | None] = {"dest": None, "source": None}

    def dest() -> None:
        try:
            _accept(a, dest_token, None, timeout).close()
        except MigrationError as exc:
            errors["dest"] = exc

    t = threading.Thread(target=dest)
    t.start()
    link = _Link(b, timeout=5)
    try:
        _handshake_out(link, source_token)
    except MigrationError as exc:
        errors["source"] = exc
    link.close()
    t.join(10)
    return errors["dest"], errors["source"]


def test_the_same_token_passes_both_ways():
    assert handshake(TOKEN, TOKEN) == (None, None)
    assert handshake(None, None) == (None, None)  # insecure on both ends


@pytest.mark.parametrize(
    ("dest", "source", "dest_error", "source_error"),
    [
        (TOKEN, b"another-token-of-16+", "wrong token", "refused the token"),
        (TOKEN, None, "closed the connection", "checks a token"),
        (None, TOKEN, "closed the connection", "checks no token"),
    ],
)
def test_mismatched_credentials_fail_on_both_ends(dest, source, dest_error, source_error):
    d, s = handshake(dest, source)
    assert d is not None and dest_error in str(d)
    assert s is not None and source_error in str(s)


def test_a_trickling_peer_is_cut_at_the_deadline():
    a, b = tcp_pair()
    result: list[Exception] = []
    t0 = time.monotonic()

    def dest() -> None:
        try:
            _accept(a, TOKEN, None, 0.6)
        except MigrationError as exc:
            result.append(exc)

    t = threading.Thread(target=dest)
    t.start()
    try:
        while t.is_alive() and time.monotonic() - t0 < 5:
            b.send(b"C")  # well inside any per-read timeout
            time.sleep(0.1)
    except OSError:
        pass
    t.join(5)
    assert time.monotonic() - t0 < 2
    assert result and "did not finish the handshake in 0.6 s" in str(result[0])
    b.close()


def test_the_listener_logs_bad_peers_and_waits_on(caplog, tmp_path):
    caplog.set_level(logging.WARNING, logger="corral.migration")
    srv = listen("0")
    assert srv.getsockname()[0] == "127.0.0.1"  # PORT alone is loopback
    port = srv.getsockname()[1]
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    secret.chmod(0o600)
    errors: list[Exception] = []

    def run() -> None:
        for _ in range(2):
            try:
                receive(srv, token=TOKEN, accept_timeout=4, handshake_timeout=0.5)
            except MigrationError as exc:
                errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        socket.create_connection(("127.0.0.1", port)).close()  # a port scan
        with socket.create_connection(("127.0.0.1", port)) as s:  # junk
            s.sendall(b"\x16\x03\x01" + bytes(200))
        with socket.create_connection(("127.0.0.1", port)) as s:  # silent
            s.settimeout(3)
            s.recv(64)
            assert s.recv(64) == b""
        # a token holder whose hello names a host disk: refused by field, before any VM
        link = _Link(socket.create_connection(("127.0.0.1", port)))
        _handshake_out(link, TOKEN)
        link.send_json(
            {
                "protocol": PROTOCOL,
                "corral_version": __version__,
                "cpu": {},
                "config": {"kernel": "/boot/vmlinuz", "disks": [{"path": str(secret)}]},
            }
        )
        reply = link.recv()
        link.close()
        assert reply["error"].startswith("disks[0]: the source has 1 disk(s)"), reply
    finally:
        t.join(20)
        srv.close()
    assert not t.is_alive()
    assert "disks[0]" in str(errors[0]) and "no migration arrived in time" in str(errors[1])
    logged = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(logged) == 3, logged
    assert all("still listening" in line for line in logged)


def test_receive_without_a_token_must_be_told_insecure():
    srv = listen("127.0.0.1:0")
    try:
        with pytest.raises(MigrationError, match="no migration token"):
            receive(srv, accept_timeout=0.1)
        with pytest.raises(MigrationError, match="no migration arrived in time"):
            receive(srv, insecure=True, accept_timeout=0.1)
    finally:
        srv.close()


def test_credentials_are_checked():
    assert check_token(" " + TOKEN.decode() + "\n") == TOKEN
    with pytest.raises(ConfigError, match="16 to 4096 bytes"):
        check_token("short")
    pin = "AB:" * 31 + "AB"
    assert check_pin(pin) == "ab" * 32
    with pytest.raises(ConfigError, match="not a SHA-256"):
        check_pin("abcd")


def token_holder_naming_a_disk(port: int) -> dict:
    """A source with the token whose hello names a host disk: refused by field, no VM built."""
    link = _Link(socket.create_connection(("127.0.0.1", port)))
    _handshake_out(link, TOKEN)
    link.send_json(
        {
            "protocol": PROTOCOL,
            "corral_version": __version__,
            "cpu": {},
            "config": {"kernel": "/boot/vmlinuz", "disks": [{"path": "/etc/shadow"}]},
        }
    )
    reply = link.recv()
    link.close()
    return reply


def test_a_silent_peer_does_not_delay_a_real_source():
    """Handshakes run concurrently: a peer that connects first and says nothing holds only
    its own connection; the token holder behind it is answered at once, not after the
    silent one's deadline."""
    srv = listen("127.0.0.1:0")
    port = srv.getsockname()[1]
    errors: list[Exception] = []

    def run() -> None:
        try:
            receive(srv, token=TOKEN, accept_timeout=8, handshake_timeout=4)
        except MigrationError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        time.sleep(0.2)  # the silent peers are accepted and waited on first
        t0 = time.monotonic()
        reply = token_holder_naming_a_disk(port)
        assert time.monotonic() - t0 < 2, "the real source waited behind a silent peer"
        assert reply["error"].startswith("disks[0]")
        t.join(10)
        assert not t.is_alive() and "disks[0]" in str(errors[0])
        for s in silent:  # and the receiver cut the silent ones when it was done
            s.settimeout(2)
            s.recv(64)  # the greeting
            assert s.recv(64) == b""
    finally:
        for s in silent:
            s.close()
        srv.close()


def test_handshakes_in_flight_are_bounded(caplog):
    caplog.set_level(logging.WARNING, logger="corral.migration")
    srv = listen("127.0.0.1:0")
    port = srv.getsockname()[1]
    errors: list[Exception] = []

    def run() -> None:
        try:
            receive(srv, token=TOKEN, accept_timeout=3, handshake_timeout=10)
        except MigrationError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    peers = []
    try:
        first = socket.create_connection(("127.0.0.1", port))
        first.settimeout(3)
        first.recv(64)  # its greeting: its handshake is in flight
        peers = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_HANDSHAKES)]
        t0 = time.monotonic()
        assert first.recv(64) == b""  # the oldest was cut to make room, long before its deadline
        assert time.monotonic() - t0 < 2
        first.close()
        assert any("handshakes in flight" in r.getMessage() for r in caplog.records)
    finally:
        t.join(10)
        for s in peers:
            s.close()
        srv.close()
    assert not t.is_alive() and "no migration arrived in time" in str(errors[0])


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ({"running": True}, None),
        ({"error": "no vCPU\nstarted " * 5000}, "could not start it: no vCPU started no vCPU"),
        ({"running": "yes"}, "could not start it: it sent something else"),
        ([1, 2], "malformed"),
        (None, None),  # the destination hangs up without a word
    ],
)
def test_the_destinations_word_after_the_hand_over(reply, expected, caplog):
    """After `go` the source reads one word from a destination it cannot trust: running, or
    why not as one bounded line; no word (a cut link) is logged, not raised."""
    from corral.migration import _destination_started

    a, b = tcp_pair()
    peer = _Link(a, timeout=5)
    if reply is None:
        peer.close()
    elif isinstance(reply, dict):
        peer.send_json(reply)
    else:
        peer.send_json_bytes(b"[1, 2]")
    with caplog.at_level(logging.WARNING, logger="corral.migration"):
        got = _destination_started(_Link(b, timeout=5), "10.0.0.2", 7000)
    peer.close()
    if expected is None:
        assert got is None
        assert ("no word from the destination" in caplog.text) == (reply is None)
    elif expected == "malformed":
        assert got is None and "malformed" in caplog.text
    else:
        assert got is not None and expected in got and "\n" not in got and len(got) < 1200
