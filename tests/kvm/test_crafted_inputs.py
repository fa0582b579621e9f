"""The traceback census (issue 13, finding 9): a corpus of crafted inputs through the CLI as a
user (or an attacker handing over a file) would give them: hostile snapshot manifests, state and
memory files to `restore` and `clone`, bad token and TLS files and addresses to `receive`, and
FIFOs, devices, symlinks, directories and odd option values to `run`. Each must end within a
time bound with exactly one `corral: error:` line and no traceback, and never hang.

One real snapshot of the probe (taken on /dev/kvm) is the seed; each case gets its own copy
(memory.bin hard-linked, replaced rather than changed where a case spoils it). The cases run
through corral's CLI entry point in one warm interpreter that forks a child per case (what
`python -m corral` does after its imports), so ~70 cases cost seconds, not a minute of imports;
a few also run as a fresh `corral` process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import cli_env, corral, one_clear_line
from support.live_probe import LiveProbe

from corral.images.probe import build_probe
from corral.state.snapshot import MANIFEST, MEMORY, STATE

TIMEOUT = 30  # seconds for any one case: far beyond an error path, short of a hang

# a warm interpreter: imports corral's CLI once, then forks a child per case with stdin closed,
# its stderr to a file; the child runs the CLI as `corral ARGS` would, a traceback printed as
# the interpreter prints it. One JSON line per case back: exit status (None: killed, a hang).
RUNNER = r"""
import json, os, sys, tempfile, time, traceback
from corral import cli
cases, timeout = json.loads(sys.stdin.read()), float(sys.argv[1])
for args in cases:
    err = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0); os.dup2(null, 1); os.dup2(err.fileno(), 2)
        sys.argv = ["corral", *args]
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    err.seek(0)
    print(json.dumps({"rc": status, "stderr": err.read().decode(errors="replace")}), flush=True)
"""


def run_census(cases: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Each case's (exit status, stderr) as CompletedProcess; returncode None: it hung."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(TIMEOUT)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=TIMEOUT * len(cases) + 60,
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == len(cases), proc.stderr
    out = []
    for args, line in zip(cases, lines, strict=True):
        r = json.loads(line)
        out.append(subprocess.CompletedProcess(args, r["rc"], "", r["stderr"]))
    return out


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("seed")
    p = LiveProbe.boot("mem-touch 16M forever", memory="64M")
    try:
        p.wait_rounds(1)
        p.machine.snapshot(base / "snap")
    finally:
        p.close()
    return base / "snap"


def copy_of(seed: Path, where: Path) -> Path:
    snap = where / "snap"
    snap.mkdir()
    for name in (MANIFEST, STATE):
        shutil.copyfile(seed / name, snap / name)
    os.link(seed / MEMORY, snap / MEMORY)
    return snap


def manifest(snap: Path, edit: Callable[[dict], object]) -> None:
    m = json.loads((snap / MANIFEST).read_text())
    edit(m)
    (snap / MANIFEST).write_text(json.dumps(m))


def replace(path: Path, make: Callable[[Path], object]) -> None:
    """Put something else where `path` was (never changing the shared inode)."""
    path.unlink()
    make(path)


def sparse(size: int) -> Callable[[Path], object]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    return make


def config(**fields: object) -> Callable[[dict], object]:
    return lambda m: m["config"].update(fields)


# (id, what to do to the snapshot copy, words the one line must hold)
RESTORE_CASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("manifest-not-json", lambda s: (s / MANIFEST).write_text("{not json"), "unreadable"),
    ("manifest-a-list", lambda s: (s / MANIFEST).write_text("[1, 2]"), "not a corral snapshot"),
    (
        "manifest-deeply-nested",
        lambda s: (s / MANIFEST).write_text("[" * 100_000 + "]" * 100_000),
        "manifest",
    ),
    ("manifest-huge", lambda s: replace(s / MANIFEST, sparse(200 << 20)), "more than"),
    (
        "manifest-symlink",
        lambda s: replace(s / MANIFEST, lambda p: p.symlink_to("/etc/passwd")),
        "symbolic link",
    ),
    ("manifest-fifo", lambda s: replace(s / MANIFEST, os.mkfifo), "not a regular file"),
    ("manifest-a-directory", lambda s: replace(s / MANIFEST, os.mkdir), "regular file"),
    ("manifest-missing", lambda s: (s / MANIFEST).unlink(), "has no manifest.json"),
    ("memory-null", lambda s: manifest(s, config(memory=None)), "memory"),
    ("memory-huge", lambda s: manifest(s, config(memory="9" * 400 + "G")), "memory"),
    ("cpus-a-word", lambda s: manifest(s, config(cpus="many")), "cpus"),
    ("cpus-huge", lambda s: manifest(s, config(cpus=1 << 70)), "cpus"),
    ("kernel-a-number", lambda s: manifest(s, config(kernel=12)), "kernel"),
    ("config-unknown-field", lambda s: manifest(s, config(hypercall_page=1)), "hypercall_page"),
    ("config-null", lambda s: manifest(s, lambda m: m.update(config=None)), "config"),
    ("cpus-zero", lambda s: manifest(s, config(cpus=0)), "cpus"),
    ("format-version-a-word", lambda s: manifest(s, lambda m: m.update(format_version="two")), "format"),
    ("memory-size-negative", lambda s: manifest(s, lambda m: m.update(memory_size=-1)), "memory"),
    ("cpu-a-string", lambda s: manifest(s, lambda m: m.update(cpu="amd")), "cpu"),
    ("state-junk", lambda s: (s / STATE).write_text("junk"), "checksum"),
    ("state-missing", lambda s: (s / STATE).unlink(), "has no state.json"),
    ("memory-truncated", lambda s: replace(s / MEMORY, sparse(4096)), "truncated"),
    ("memory-symlink", lambda s: replace(s / MEMORY, lambda p: p.symlink_to(s / STATE)), "symbolic link"),
    ("memory-a-directory", lambda s: replace(s / MEMORY, os.mkdir), "regular file"),
    ("memory-fifo", lambda s: replace(s / MEMORY, os.mkfifo), "regular file"),
]


def state_with_checksum(snap: Path, text: str) -> None:
    """state.json replaced and the manifest's checksum made to match: the state is parsed."""
    import hashlib

    (snap / STATE).write_text(text)
    manifest(snap, lambda m: m.update(state_sha256=hashlib.sha256(text.encode()).hexdigest()))


RESTORE_CASES += [
    ("state-not-json-checksum-ok", lambda s: state_with_checksum(s, "{nope"), "state.json"),
    ("state-deeply-nested-checksum-ok", lambda s: state_with_checksum(s, "[" * 100_000), "state.json"),
    ("state-empty-object-checksum-ok", lambda s: state_with_checksum(s, "{}"), "state.json"),
]


def token(tmp_path: Path, mode: int = 0o600) -> Path:
    t = tmp_path / "tok"
    t.write_text("0123456789abcdef0123456789abcdef\n")
    t.chmod(mode)
    return t


def busy_port() -> tuple[socket.socket, str]:
    s = socket.create_server(("127.0.0.1", 0))
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def receive_cases(tmp_path: Path) -> list[tuple[str, list[str], str]]:
    good = str(token(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(good)
    loose = tmp_path / "loose"
    loose.write_text("0123456789abcdef0123456789abcdef\n")
    loose.chmod(0o644)
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    junk_pem = tmp_path / "cert.pem"
    junk_pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return [
        ("listen-not-an-address", ["--listen", "nope:xx", "--token-file", good], "address"),
        ("listen-port-too-big", ["--listen", "99999", "--token-file", good], "99999"),
        ("listen-unknown-host", ["--listen", "no.such.host.invalid:7000", "--token-file", good], "listen"),
        ("token-missing", ["--listen", "0", "--token-file", str(tmp_path / "none")], "none"),
        ("token-fifo", ["--listen", "0", "--token-file", str(fifo)], "regular file"),
        ("token-symlink", ["--listen", "0", "--token-file", str(link)], "symbolic link"),
        ("token-readable-by-others", ["--listen", "0", "--token-file", str(loose)], "loose"),
        ("token-too-short", ["--listen", "0", "--token-file", str(short)], "16"),
        ("token-a-directory", ["--listen", "0", "--token-file", str(tmp_path)], str(tmp_path)),
        ("no-token", ["--listen", "0"], "token"),
        (
            "tls-cert-missing",
            ["--listen", "0", "--token-file", good, "--tls-cert", "/nope", "--tls-key", "/nope"],
            "nope",
        ),
        (
            "tls-cert-junk",
            ["--listen", "0", "--token-file", good, "--tls-cert", str(junk_pem), "--tls-key", str(junk_pem)],
            "cert",
        ),
        (
            "tls-cert-fifo",
            ["--listen", "0", "--token-file", good, "--tls-cert", str(fifo), "--tls-key", str(fifo)],
            "fifo",
        ),
    ]


RECEIVE_IDS = [
    "listen-not-an-address",
    "listen-port-too-big",
    "listen-unknown-host",
    "token-missing",
    "token-fifo",
    "token-symlink",
    "token-readable-by-others",
    "token-too-short",
    "token-a-directory",
    "no-token",
    "tls-cert-missing",
    "tls-cert-junk",
    "tls-cert-fifo",
]


def test_receive_on_a_busy_port_is_one_line(tmp_path):
    s, address = busy_port()
    try:
        line = one_clear_line(corral("receive", "--listen", address, "--token-file", str(token(tmp_path))))
    finally:
        s.close()
    assert "cannot listen" in line


def run_cases(tmp_path: Path) -> list[tuple[str, list[str], str]]:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link.cow"
    (tmp_path / "elsewhere").write_bytes(b"someone's file")
    link.symlink_to(tmp_path / "elsewhere")
    kernel = str(build_probe())
    return [
        ("disk-fifo", ["--disk", str(fifo)], "fifo"),
        ("disk-fifo-ro", ["--disk", f"{fifo},ro"], "fifo"),
        ("disk-directory", ["--disk", str(tmp_path)], str(tmp_path)),
        ("disk-char-device", ["--disk", "/dev/null"], "/dev/null"),
        ("disk-overlay-symlink", ["--disk", f"{img},overlay={link}"], "symbolic link"),
        ("disk-serial-over-20", ["--disk", f"{img},serial=" + "s" * 21], "serial"),
        ("disk-unknown-key", ["--disk", f"{img},colour=red"], "colour"),
        ("disk-overlay-fifo", ["--disk", f"{img},overlay={fifo}"], "fifo"),
        ("disk-overlay-directory", ["--disk", f"{img},overlay={tmp_path}"], "overlay"),
        ("disk-overlay-itself", ["--disk", f"{img},overlay={img}"], "overlay"),
        ("disk-missing", ["--disk", str(tmp_path / "none.img")], "none.img"),
        ("kernel-fifo", ["--kernel", str(fifo)], "fifo"),
        ("kernel-directory", ["--kernel", str(tmp_path)], str(tmp_path)),
        ("kernel-dev-zero", ["--kernel", "/dev/zero"], "/dev/zero"),
        ("initrd-fifo", ["--kernel", kernel, "--initrd", str(fifo)], "fifo"),
        ("memory-huge", ["--kernel", kernel, "--memory", "9" * 400 + "G"], "memory"),
        ("memory-negative", ["--kernel", kernel, "--memory", "-1G"], "memory"),
        ("cpus-huge", ["--kernel", kernel, "--cpus", "9" * 40], "cpus"),
        ("cmdline-huge", ["--kernel", kernel, "--cmdline", "x" * 100_000], "command line"),
        ("net-tap-name-too-long", ["--kernel", kernel, "--net", "tap=" + "t" * 40], "tap"),
        ("net-bad-mac", ["--kernel", kernel, "--net", "tap=x0,mac=zz"], "mac"),
        ("net-bad-host-ip", ["--kernel", kernel, "--net", "tap=x0,host-ip=999.1.1.1/99"], "host"),
        ("vsock-reserved-cid", ["--kernel", kernel, "--vsock", f"cid=2,uds={tmp_path / 'v'}"], "cid"),
        ("vsock-cid-huge", ["--kernel", kernel, "--vsock", f"cid={'9' * 30},uds={tmp_path / 'v'}"], "cid"),
        ("vsock-uds-in-missing-dir", ["--kernel", kernel, "--vsock", f"cid=3,uds={tmp_path}/no/v"], "vsock"),
        ("console-file-directory", ["--kernel", kernel, "--virtio-console", f"file={tmp_path}"], "console"),
        ("console-file-fifo", ["--kernel", kernel, "--virtio-console", f"file={fifo}"], "fifo"),
        ("api-in-missing-dir", ["--kernel", kernel, "--api", f"{tmp_path}/no/api.sock"], "api"),
        ("kvm-not-a-device", ["--kernel", kernel, "--kvm", str(img)], "kvm"),
    ]


RUN_IDS = [
    "disk-fifo",
    "disk-fifo-ro",
    "disk-directory",
    "disk-char-device",
    "disk-overlay-symlink",
    "disk-serial-over-20",
    "disk-unknown-key",
    "disk-overlay-fifo",
    "disk-overlay-directory",
    "disk-overlay-itself",
    "disk-missing",
    "kernel-fifo",
    "kernel-directory",
    "kernel-dev-zero",
    "initrd-fifo",
    "memory-huge",
    "memory-negative",
    "cpus-huge",
    "cmdline-huge",
    "net-tap-name-too-long",
    "net-bad-mac",
    "net-bad-host-ip",
    "vsock-reserved-cid",
    "vsock-cid-huge",
    "vsock-uds-in-missing-dir",
    "console-file-directory",
    "console-file-fifo",
    "api-in-missing-dir",
    "kvm-not-a-device",
]


def census_cases(seed: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Every case: its id -> (the CLI arguments, words its one line must hold)."""
    cases: dict[str, tuple[list[str], str]] = {}
    for case, spoil, words in RESTORE_CASES:
        (tmp / case).mkdir()
        snap = copy_of(seed, tmp / case)
        spoil(snap)
        cases[f"restore-{case}"] = (["restore", str(snap)], words)
    (tmp / "clone").mkdir()
    snap = copy_of(seed, tmp / "clone")
    manifest(snap, config(memory=None))
    cases["clone-memory-null"] = (["clone", str(snap), "-n", "2"], "memory")
    (tmp / "receive").mkdir()
    for case, args, words in receive_cases(tmp / "receive"):
        cases[f"receive-{case}"] = (["receive", *args], words)
    (tmp / "run").mkdir()
    for case, args, words in run_cases(tmp / "run"):
        cases[f"run-{case}"] = (["run", *args, *([] if "--kernel" in args else ["--image", "probe"])], words)
    return cases


CASE_IDS = (
    [f"restore-{c[0]}" for c in RESTORE_CASES]
    + ["clone-memory-null"]
    + [f"receive-{c}" for c in RECEIVE_IDS]
    + [f"run-{c}" for c in RUN_IDS]
)


@pytest.fixture(scope="module")
def census(seed, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    cases = census_cases(seed, tmp_path_factory.mktemp("census"))
    assert list(cases) == CASE_IDS  # the id lists mirror the builders
    results = run_census([args for args, _ in cases.values()])
    return {case: (r, words) for (case, (_, words)), r in zip(cases.items(), results, strict=True)}


@pytest.mark.parametrize("case", CASE_IDS)
def test_a_crafted_input_ends_in_one_line(census, case):
    r, words = census[case]
    assert r.returncode is not None, f"{case}: hung (killed after {TIMEOUT} s)"
    line = one_clear_line(r)
    assert words.lower() in line.lower(), line


def test_a_fresh_process_agrees(seed, tmp_path):
    """The same, as a user's fresh `corral` process (no warm interpreter): a hostile manifest
    and a FIFO as a disk."""
    snap = copy_of(seed, tmp_path)
    manifest(snap, config(memory=None))
    assert "memory" in one_clear_line(corral("restore", str(snap), timeout=TIMEOUT))
    os.mkfifo(tmp_path / "fifo")
    line = one_clear_line(
        corral("run", "--image", "probe", "--disk", f"{tmp_path / 'fifo'},ro", timeout=TIMEOUT)
    )
    assert "fifo" in line.lower()
