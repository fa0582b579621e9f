"""corral.forkserver: the request format and its bounds, and a real template process answering
hostile messages on its socket (too long, junk, extra fds, unknown commands) one by one while it
keeps serving. Children here run CLI commands that need no KVM (`image list`); the VM side is in
tests/kvm/test_forkserver.py."""

from __future__ import annotations

import array
import json
import os
import socket
import time
from pathlib import Path

import pytest

from corral.forkserver import (
    MAX_ARG,
    MAX_ARGS,
    MAX_REQUEST,
    FirecrackerRequest,
    ForkServer,
    ForkServerError,
    LaunchRequest,
    ReturncodeRequest,
    decode_request,
)


def req(**fields: object) -> bytes:
    return json.dumps(
        {"op": "launch", "args": ["image", "list"], "log_path": "/tmp/x.log", **fields}
    ).encode()


def test_a_good_launch_request_decodes() -> None:
    r = decode_request(req())
    assert isinstance(r, LaunchRequest)
    assert r.args == ["image", "list"] and r.log_path == "/tmp/x.log"
    r2 = decode_request(b'{"op": "returncode", "pid": 42}')
    assert isinstance(r2, ReturncodeRequest) and r2.pid == 42


@pytest.mark.parametrize(
    ("data", "names"),
    [
        (b"not json", "request"),
        (b"[]", "request"),
        (b'{"op": "exec", "args": ["x"]}', "op"),
        (req(args=[]), "args"),
        (req(args="image list"), "args"),
        (req(args=["image", 7]), "args.1"),
        (req(args=["x"] * (MAX_ARGS + 1)), "args"),
        (req(args=["x" * (MAX_ARG + 1)]), "args.0"),
        (req(args=["run", "a\0b"]), "args.1: contains a NUL"),
        (req(log_path=""), "log_path"),
        (req(log_path="/tmp/a\0b"), "log_path: contains a NUL"),
        (req(env={"A": "B"}), "env"),
        (b'{"op": "returncode", "pid": -1}', "pid"),
        (b'{"op": "returncode", "pid": "1"}', "pid"),
    ],
)
def test_bad_requests_name_the_problem(data: bytes, names: str) -> None:
    with pytest.raises(ForkServerError, match="bad request") as exc:
        decode_request(data)
    assert names in str(exc.value)


def test_a_firecracker_request_is_checked_as_strictly() -> None:
    good = decode_request(b'{"op": "firecracker", "api_sock": "/run/vm.sock", "log_path": "/tmp/vm.log"}')
    assert isinstance(good, FirecrackerRequest) and good.instance_id == "anonymous-instance"
    for bad, names in [
        (b'{"op": "firecracker"}', "api_sock"),
        (b'{"op": "firecracker", "api_sock": "/a", "jailer": true}', "jailer"),
        (b'{"op": "firecracker", "api_sock": "/a", "no_api": "yes"}', "no_api"),
        (b'{"op": "firecracker", "api_sock": "/a\\u0000b"}', "api_sock: contains a NUL"),
        (b'{"op": "firecracker", "api_sock": "' + b"x" * (MAX_ARG + 1) + b'"}', "api_sock"),
    ]:
        with pytest.raises(ForkServerError, match="bad request") as exc:
            decode_request(bad)
        assert names in str(exc.value)


def test_a_request_over_the_bound_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ForkServerError, match=f"larger than {MAX_REQUEST}"):
        decode_request(b" " * (MAX_REQUEST + 1))
    with pytest.raises(ForkServerError, match=f"larger than {MAX_REQUEST}"):
        decode_request(req(), truncated=True)


def test_the_client_refuses_to_send_an_oversized_request() -> None:
    fs = ForkServer()  # not started: the request never leaves this process
    with pytest.raises(ForkServerError, match="larger than"):
        fs.launch(["image"] + ["x" * MAX_ARG] * 20, log_path="/tmp/x.log")
    with pytest.raises(ForkServerError, match="either log_path or output_fd"):
        fs.launch(["image", "list"])


@pytest.fixture(scope="module")
def server():
    fs = ForkServer().start()
    yield fs
    fs.close()


def raw_call(fs: ForkServer, data: bytes, fds: list[int] | None = None) -> dict:
    """A message straight onto the template's socket (as a hostile or buggy client would)."""
    sock = fs._sock
    assert sock is not None
    with fs._lock:
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.send(data)
        return json.loads(sock.recv(MAX_REQUEST))


def wait_returncode(fs: ForkServer, pid: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (rc := fs.returncode(pid)) is None:
        assert time.monotonic() < deadline, f"child {pid} did not end"
        time.sleep(0.05)
    return rc


def test_a_child_runs_the_cli_with_its_output_in_the_log(server: ForkServer, tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    pid = server.launch(["image", "list"], log_path=log)
    assert wait_returncode(server, pid) == 0
    assert "probe" in log.read_text()  # rich's table of images
    assert os.stat(log).st_mode & 0o777 == 0o600
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie


def test_a_child_writes_to_the_fd_it_was_given(server: ForkServer) -> None:
    r, w = os.pipe()
    try:
        pid = server.launch(["image", "list"], output_fd=w)
        os.close(w)
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
    finally:
        os.close(r)
    assert b"probe" in out
    assert wait_returncode(server, pid) == 0


def test_hostile_messages_fail_alone_and_the_server_serves_on(server: ForkServer, tmp_path: Path) -> None:
    too_long = raw_call(server, b"x" * (MAX_REQUEST + 100))
    assert not too_long["ok"] and "larger than" in too_long["error"]
    junk = raw_call(server, b"\xff\xfe junk")
    assert not junk["ok"] and "bad request" in junk["error"]
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        two = raw_call(server, req(log_path=None), [w1, w2])
        assert not two["ok"] and "one fd" in two["error"]
        both = raw_call(server, req(), [w1])
        assert not both["ok"] and "not both" in both["error"]
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    with pytest.raises(ForkServerError, match="'rm -rf' is not a corral command"):
        server.launch(["rm -rf", "/"], log_path=tmp_path / "x.log")
    with pytest.raises(ForkServerError, match="is not a regular file"):
        server.launch(["image", "list"], log_path="/dev/null")
    (tmp_path / "real.log").touch()
    (tmp_path / "link.log").symlink_to(tmp_path / "real.log")
    with pytest.raises(ForkServerError, match="cannot open the log"):
        server.launch(["image", "list"], log_path=tmp_path / "link.log")
    # a bad option is the child's to report: it exits 2 with the CLI's one line
    pid = server.launch(["image", "list", "--no-such-option"], log_path=tmp_path / "bad.log")
    assert wait_returncode(server, pid) == 2
    assert "No such option" in (tmp_path / "bad.log").read_text()
    pid = server.launch(["image", "list"], log_path=tmp_path / "ok.log")
    assert wait_returncode(server, pid) == 0


def test_a_dead_template_is_replaced_by_the_next_launch(tmp_path: Path) -> None:
    with ForkServer() as fs:
        first = fs.pid
        assert first is not None
        os.kill(first, 9)
        pid = fs.launch(["image", "list"], log_path=tmp_path / "a.log")
        assert fs.pid not in (None, first)
        assert wait_returncode(fs, pid) == 0


def test_the_template_exits_when_its_client_goes(tmp_path: Path) -> None:
    fs = ForkServer().start()
    proc = fs._proc
    assert proc is not None
    assert fs._sock is not None
    fs._sock.close()  # as a daemon that died would
    assert proc.wait(10) == 0
    fs._sock = None
    fs.close()
