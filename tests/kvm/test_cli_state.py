"""The VM-state commands as a user runs them: run --api, pause/resume/status, snapshot,
restore, clone, receive/migrate, and one clear line for each kind of bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from support.cli import ROOT, corral, corral_popen, one_clear_line, start_vm
from support.results import result_lines


def test_pause_status_snapshot_restore_from_the_command_line(tmp_path):
    api = tmp_path / "vm.sock"
    proc = start_vm(api, "mem-touch 16M 400")
    try:
        time.sleep(0.5)
        assert corral("pause", "--api", str(api)).returncode == 0
        assert corral("status", "--api", str(api)).stdout.startswith("paused")
        r = corral("snapshot", "--api", str(api), str(tmp_path / "snap"))
        assert r.returncode == 0 and "MiB of memory" in r.stderr, r.stderr
        assert corral("status", "--api", str(api)).stdout.startswith("paused")
        # bad input over the socket changes nothing
        line = one_clear_line(corral("snapshot", "--api", str(api), str(tmp_path / "snap")))
        assert "already exists" in line
        assert corral("resume", "--api", str(api)).returncode == 0
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    finally:
        proc.kill()
    assert not api.exists()  # the socket goes with the VM
    # the snapshot finishes the same run: same final checksum, no fresh boot
    first = out.decode().replace("\r", "")
    r = corral("restore", str(tmp_path / "snap"))
    assert r.returncode == 0, r.stderr
    assert "probe: mem-touch range" not in r.stdout
    final = result_lines(first)
    assert final and final[-1] in r.stdout.replace("\r", "")


def test_clone_runs_each_copy_to_the_end(tmp_path):
    api = tmp_path / "vm.sock"
    proc = start_vm(api, "mem-touch 16M 300")
    try:
        time.sleep(0.3)
        assert corral("snapshot", "--api", str(api), str(tmp_path / "snap")).returncode == 0
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    final = result_lines(out.decode())[-1]
    r = corral("clone", str(tmp_path / "snap"), "-n", "3")
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert f"[clone {i}] {final}" in r.stdout


def test_receive_and_migrate_from_the_command_line(tmp_path):
    api = tmp_path / "vm.sock"
    dest_api = tmp_path / "dest.sock"
    src = start_vm(api)
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    dest = corral_popen(
        "receive", "--listen", "0", "--token-file", str(token), "--timeout", "60", "--api", str(dest_api)
    )
    try:
        first = dest.stderr.readline().decode()
        assert "waiting for a migration on 127.0.0.1:" in first  # PORT alone: loopback
        port = first.rsplit(":", 1)[1].strip()
        # without the token the VM stays here, and the receiver waits on
        line = one_clear_line(corral("migrate", "--api", str(api), f"127.0.0.1:{port}"))
        assert "--token-file" in line and "--insecure" in line
        line = one_clear_line(corral("migrate", "--api", str(api), "--insecure", f"127.0.0.1:{port}"))
        assert "checks a token" in line and "runs on here" in line
        r = corral("migrate", "--api", str(api), "--token-file", str(token), f"127.0.0.1:{port}")
        assert r.returncode == 0, r.stderr
        assert "round 1:" in r.stderr and "downtime" in r.stderr
        _src_out, src_err = src.communicate(timeout=30)
        assert src.returncode == 0 and b"migrated to" in src_err
        while not dest_api.exists():
            time.sleep(0.05)
        time.sleep(0.5)
        assert corral("status", "--api", str(dest_api)).stdout.startswith("running")
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from corral.api import ControlClient; ControlClient(sys.argv[1]).stop()",
                str(dest_api),
            ],
            check=True,
            env={"PYTHONPATH": str(ROOT / "src")},
        )
        dest_out, _ = dest.communicate(timeout=30)
    finally:
        src.kill()
        dest.kill()
    assert b"PROGRESS" in dest_out


def test_restore_bad_input(tmp_path):
    assert "does not exist" in one_clear_line(corral("restore", str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    assert "not a corral snapshot" in one_clear_line(corral("restore", str(tmp_path / "empty")))
    assert "does not exist" in one_clear_line(corral("clone", str(tmp_path / "none")))


def test_receive_and_migrate_over_tls_from_the_command_line(tmp_path):
    """The receiver prints its certificate's SHA-256; the source pins it (a wrong pin keeps the
    VM here) and proves the token inside TLS."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-subj", "/CN=corral", "-days", "2", "-keyout", str(key), "-out", str(cert)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip("openssl cannot make a certificate here")
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef")
    token.chmod(0o600)
    api, dest_api = tmp_path / "vm.sock", tmp_path / "dest.sock"
    src = start_vm(api)
    dest = corral_popen(
        *("receive", "--listen", "0", "--token-file", str(token), "--tls-cert", str(cert)),
        *("--tls-key", str(key), "--timeout", "60", "--api", str(dest_api)),
    )
    try:
        port = dest.stderr.readline().decode().rsplit(":", 1)[1].strip()
        pin = dest.stderr.readline().decode().split("sha256 ")[1].split()[0]
        migrate = ("migrate", "--api", str(api), "--token-file", str(token), f"127.0.0.1:{port}")
        line = one_clear_line(corral(*migrate, "--tls-pin", "ab" * 32))
        assert "not the pinned one" in line and "runs on here" in line
        r = corral(*migrate, "--tls-pin", pin)
        assert r.returncode == 0, r.stderr
        src.communicate(timeout=30)
        assert src.returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = corral("status", "--api", str(dest_api))
            if st.returncode == 0:
                break
            time.sleep(0.1)
        assert st.stdout.startswith("running"), st.stderr
        assert corral("stop", "--api", str(dest_api)).returncode == 0
        dest.communicate(timeout=30)
    finally:
        src.kill()
        dest.kill()


def test_receive_needs_a_token_or_insecure(tmp_path):
    line = one_clear_line(corral("receive", "--listen", "0"))
    assert "--token-file" in line and "--insecure" in line
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef")
    token.chmod(0o644)
    line = one_clear_line(corral("receive", "--listen", "0", "--token-file", str(token)))
    assert "can be read by other users: chmod 600" in line
    token.chmod(0o600)
    line = one_clear_line(corral("receive", "--listen", "0", "--token-file", str(token), "--tls-cert", "c"))
    assert "--tls-key" in line
    proc = corral_popen("receive", "--listen", "0", "--insecure", "--timeout", "0.5")
    _, err = proc.communicate(timeout=60)
    lines = err.decode().splitlines()
    assert "127.0.0.1:" in lines[0] and lines[1].startswith("corral: warning: --insecure: anyone")
    assert proc.returncode == 1 and "no migration arrived in time" in lines[-1]


def test_control_commands_without_a_vm(tmp_path):
    line = one_clear_line(corral("pause", "--api", str(tmp_path / "x.sock")))
    assert "no control socket" in line and "--api" in line


def test_migrate_to_nowhere_keeps_the_vm(tmp_path):
    api = tmp_path / "vm.sock"
    proc = start_vm(api)
    try:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        line = one_clear_line(corral("migrate", "--api", str(api), "--insecure", f"127.0.0.1:{port}"))
        assert "cannot reach" in line and "runs on here" not in line
        assert corral("status", "--api", str(api)).stdout.startswith("running")
        line = one_clear_line(corral("migrate", "--api", str(api), "--insecure", "nowhere:port"))
        assert "HOST:PORT" in line
    finally:
        proc.kill()
        proc.wait()


def test_bad_api_requests(tmp_path):
    api = tmp_path / "vm.sock"
    proc = start_vm(api)
    try:

        def raw(request: bytes) -> tuple[int, dict]:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(str(api))
            s.sendall(request)
            f = s.makefile("rb")
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline().strip()) != b"":
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            reply = json.loads(f.read(length))
            s.close()
            return status, reply

        def put(path: str, body: bytes) -> tuple[int, dict]:
            head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            return raw(head.encode() + body)

        status, r = put("/corral/explode", b"{}")
        assert status == 400 and "Invalid request method and/or path" in r["fault_message"]
        status, r = put("/corral/migrate", b'{"to": "x:1", "downtime_ms": -5}')
        assert status == 400 and "downtime_ms" in r["fault_message"]
        status, r = put("/corral/snapshot", b"not json")
        assert status == 400 and "not JSON" in r["fault_message"]
        status, r = raw(b"NONSENSE\r\n\r\n")
        assert status == 400 and r["fault_message"]
        status, r = raw(b"GET /corral/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and r["state"] == "running"
        # a second VM cannot take a socket that is in use
        line = one_clear_line(corral("run", "--image", "probe", "--cmdline", "hello", "--api", str(api)))
        assert "in use" in line
    finally:
        proc.kill()
        proc.wait()
