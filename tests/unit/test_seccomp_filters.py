"""corral.seccomp without a VM: each thread kind's filter, loaded for real in a child process,
lets through what the kind needs and traps the rest with the named exit (148 and one line)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from support.cli import cli_env

from corral import seccomp
from corral.kvm import constants as K
from corral.seccomp import lists

PRELUDE = """
import ctypes, fcntl, json, logging, mmap, os, socket, threading
from corral import seccomp
seccomp.enable()
seccomp.prepare()
out = {}
entered, go = threading.Event(), threading.Event()
devnull = os.open("/dev/null", os.O_RDONLY)
def body():
    seccomp.enter(KIND, "corral-test")
    out["tid"] = threading.get_native_id()
    entered.set()
    go.wait()
    ACTION
    print("SURVIVED", flush=True)
t = threading.Thread(target=body)
t.start()
entered.wait()
out["status"] = open(f"/proc/self/task/{out['tid']}/status").read()
go.set()
t.join()
"""


def in_thread(kind: str, action: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `action` (Python) on a thread that entered the `kind` filter, in a child process."""
    body = textwrap.indent(textwrap.dedent(action).strip(), "    ")
    code = PRELUDE.replace("KIND", repr(kind)).replace("    ACTION", body)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=cli_env(env)
    )


def assert_trapped(r: subprocess.CompletedProcess, name: str) -> None:
    assert r.returncode == seccomp.EXIT_CODE, (r.returncode, r.stdout, r.stderr)
    assert "SURVIVED" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and f"forbidden system call: {name} (#" in lines[-1], r.stderr


KVM_RUN_ON_DEVNULL = f"""
try:
    fcntl.ioctl(devnull, {K.KVM_RUN:#x}, 0)
except OSError:
    pass  # ENOTTY: the filter let it through to the kernel
"""


def test_a_vcpu_may_run_kvm_run():
    r = in_thread("vcpu", KVM_RUN_ON_DEVNULL)
    assert r.returncode == 0 and "SURVIVED" in r.stdout, r.stderr


def test_a_vcpus_filter_tests_kvm_run_before_anything_else():
    """KVM_RUN, once per exit, is the filter's first test after the architecture: ioctl first,
    then the request compared whole (before this, libseccomp's value order put it tenth of the
    ioctls, behind nineteen other calls). Its own tests, all the same, still trap the rest."""
    import os

    f = seccomp._build("vcpu", seccomp.TRAP)
    fd = os.memfd_create("pfc")
    with open(fd, "w+b") as out:
        f.export_pfc(out)
        out.seek(0)
        tests = [ln.strip() for ln in out.read().decode().splitlines() if ln.strip().startswith("if (")]
    assert tests[1:4] == ["if ($syscall == 16)", "if ($a1.hi32 == 0)", f"if ($a1.lo32 == {K.KVM_RUN})"]
    high = in_thread(
        "vcpu", f"ctypes.CDLL(None).ioctl(devnull, ctypes.c_ulong((1 << 32) | {K.KVM_RUN:#x}), 0)"
    )
    assert_trapped(high, "ioctl")  # KVM_RUN with bits above 32: no other rule lets it by either


def test_a_vcpu_may_not_create_a_vm():
    """The ioctl filter looks at the request number: KVM_CREATE_VM is the VMM thread's alone."""
    r = in_thread(
        "vcpu",
        f"""
        fcntl.ioctl(devnull, {K.KVM_CREATE_VM:#x}, 0)
        """,
    )
    assert_trapped(r, "ioctl")


def test_no_thread_opens_files_but_the_vmm_and_the_api():
    r = in_thread("vcpu", 'open("/etc/hostname").close()')
    assert_trapped(r, "openat")
    r = in_thread("loop", 'open("/etc/hostname").close()')
    assert_trapped(r, "openat")


def test_the_loop_may_make_unix_sockets_only():
    r = in_thread("loop", "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()")
    assert r.returncode == 0, r.stderr
    r = in_thread("loop", "socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()")
    assert_trapped(r, "socket")


@pytest.mark.parametrize("kind", seccomp.KINDS)
def test_no_thread_maps_executable_memory(kind):
    r = in_thread(kind, "mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)")
    assert_trapped(r, "mmap")


def test_the_api_starts_threads_but_never_a_process():
    """clone3's flags are out of a filter's sight: it fails ENOSYS and glibc falls back to
    clone, whose flags must say CLONE_THREAD; a fork is a clone without it."""
    r = in_thread(
        "api",
        """
        seen = []
        u = threading.Thread(target=lambda: seen.append(1)); u.start(); u.join()
        assert seen == [1]
        print("THREAD OK", flush=True)
        os.fork()
        """,
    )
    assert "THREAD OK" in r.stdout, r.stderr
    assert_trapped(r, "clone")


def test_every_filtered_thread_reports_seccomp_mode_2():
    r = in_thread("vcpu", 'print([ln for ln in out["status"].splitlines() if ln.startswith("Seccomp:")])')
    assert "['Seccomp:\\t2']" in r.stdout, r.stdout + r.stderr


def test_log_mode_logs_instead_of_trapping():
    """CORRAL_SECCOMP=log (finding what a new code path needs) lets the call through."""
    r = in_thread("vcpu", 'open("/etc/hostname").close()', env={"CORRAL_SECCOMP": "log"})
    assert r.returncode == 0 and "SURVIVED" in r.stdout, r.stderr


def test_a_bad_mode_is_one_clear_error():
    r = in_thread("vcpu", "pass", env={"CORRAL_SECCOMP": "off"})
    assert r.returncode != 0 and "CORRAL_SECCOMP='off': use 'trap'" in r.stderr


def test_creating_taps_and_vms_is_the_vmm_threads_alone():
    numbers = {kind: p.ioctl_numbers() for kind, p in lists.POLICIES.items()}
    for kind in ("api", "loop", "vcpu"):
        assert lists.OTHER_IOCTLS["TUNSETIFF"] not in numbers[kind], kind
        assert K.KVM_CREATE_VM not in numbers[kind], kind
        assert K.KVM_CREATE_VCPU not in numbers[kind], kind
    assert K.KVM_RUN in numbers["vcpu"]
    assert K.KVM_RUN not in numbers["api"] and K.KVM_RUN not in numbers["loop"]


def test_the_counts_are_the_lists():
    by_kind = {c.kind: c for c in seccomp.counts()}
    assert set(by_kind) == set(seccomp.KINDS)
    for kind, c in by_kind.items():
        assert c.syscalls == len(lists.POLICIES[kind].all_syscalls())
    # a vCPU needs least; the VMM thread, which rebuilds the machine, most
    assert by_kind["vcpu"].syscalls < by_kind["loop"].syscalls < by_kind["vmm"].syscalls
    assert by_kind["vcpu"].firecracker == 27


TRACEBACKS = """
logging.basicConfig(format="%(message)s")
try:
    json.loads("{")  # a traceback through a module whose source is not cached
except ValueError:
    logging.getLogger("t").exception("LOGGED")
try:
    seccomp.build("nope")  # ... and through corral's own (cached by prepare)
except seccomp.SeccompError:
    logging.getLogger("t").exception("LOGGED")
"""


@pytest.mark.parametrize("kind", seccomp.KINDS)
def test_a_traceback_on_a_filtered_thread_is_printed_not_trapped(kind):
    """linecache would stat and open source files for the traceback (newfstatat, openat):
    under the filter it serves what it holds, so the real error is what the operator sees."""
    r = in_thread(kind, TRACEBACKS)
    assert r.returncode == 0 and "SURVIVED" in r.stdout, r.stderr
    assert r.stderr.count("LOGGED") == 2 and "JSONDecodeError" in r.stderr, r.stderr
    # corral's lines were cached before the filter: they are in the traceback
    assert 'raise SeccompError(f"no seccomp policy' in r.stderr, r.stderr


def test_an_uncaught_exception_on_a_filtered_thread_is_printed_not_trapped():
    r = in_thread("vcpu", 'raise RuntimeError("THE REAL ERROR")')
    assert r.returncode == 0, r.stderr
    assert "RuntimeError: THE REAL ERROR" in r.stderr and "forbidden" not in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["gdb", "incoming"])
def test_stacked_kinds_make_no_sockets_and_sit_inside_the_vmms_list(kind):
    """The gdb stub and a migration's handshakes serve sockets made before their filter, and
    may start under the VMM's (`corral firecracker`'s PUT /corral/gdb, `corral receive`) and
    stack their own on it: the VMM's must hold all of theirs."""
    r = in_thread(kind, "socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()")
    assert_trapped(r, "socket")
    policy, vmm = lists.POLICIES[kind], lists.POLICIES["vmm"]
    assert policy.all_syscalls() <= vmm.all_syscalls()
    assert policy.ioctl_numbers() <= vmm.ioctl_numbers()
    assert K.KVM_RUN not in policy.ioctl_numbers() and K.KVM_CREATE_VM not in policy.ioctl_numbers()


def test_a_handshake_opens_no_files_and_touches_no_vm():
    r = in_thread("incoming", 'open("/etc/hostname").close()')
    assert_trapped(r, "openat")
    assert not any(n.startswith("KVM_") for n in lists.POLICIES["incoming"].ioctls)


REBOOT = """
import sys, threading
import corral.machine  # what the CLI's VMM thread has imported when it takes its filter
from corral import seccomp
print(sorted(m for m in ("_bz2", "_lzma") if m in sys.modules))  # the loaders' own are lazy
seccomp.enable()
seccomp.prepare()
out = []
def body():
    seccomp.enter("vmm")
    from corral.boot import bzimage, multiboot  # noqa: F401
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            out.append(bzimage.payload_elf_class(f.read()))
t = threading.Thread(target=body)
t.start()
t.join()
print(out)
"""


def test_the_vmm_thread_loads_any_kernel_format_under_its_filter(tmp_path):
    """A restored or received guest that reboots loads its kernel on the VMM's thread, under
    the filter: the loader modules a launch left out, and the decompressors a bzImage's
    payload is peeked with (C extensions, which no filter lets map), are importable there."""
    import bz2
    import lzma
    import zlib

    from test_boot_loader import ELF64_HEAD, _with_payload, make_bzimage

    base = make_bzimage(payload=bytes(0x3000))
    paths = []
    for name, packed in (
        ("gzip", zlib.compress(ELF64_HEAD, wbits=31)),
        ("xz", lzma.compress(ELF64_HEAD, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
        ("bzip2", bz2.compress(ELF64_HEAD)),
        ("lzma", lzma.compress(ELF64_HEAD, format=lzma.FORMAT_ALONE)),
    ):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(_with_payload(base, packed))
    r = subprocess.run(
        [sys.executable, "-c", REBOOT, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "[64, 64, 64, 64]"], r.stdout
