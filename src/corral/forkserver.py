"""A warm template process that VMs are forked from, so creating a VM skips Python.

A `corral run` pays ~250 ms of interpreter start-up and imports before the guest's first
instruction, and each VM process holds its own ~20 MiB copy of the interpreter's heap. A fork
server pays both once: the template (`python -m corral.forkserver FD`) imports everything a VM
needs (PRELOAD: the CLI, Firecracker's API, the machine, every device, every pydantic model
built, corral.lazymodel's too), runs `gc.collect(); gc.freeze()` so no collection in a child ever
writes to the template's objects (which would copy their pages), starts no thread, and then
forks one child per request. A child shares every page it leaves alone with the template and its siblings.

Requests come over a SOCK_SEQPACKET socketpair that only the process which started the template
holds: one message per request (JSON, at most MAX_REQUEST bytes, with at most one fd for the
child's output), one reply per request. Anything malformed fails that request with a one-line
error; the server serves on. The template exits when the other end closes.

A child (`launch`) becomes its own session leader, reads /dev/null, writes stdout and stderr to
the log (or the fd given), gets the signal handlers and mask a fresh interpreter has, closes the
server's socket, reseeds `random`, drops inherited logging handlers, and runs corral's CLI with
the args (`["firecracker", "--api-sock", P, "--config-file", C]`), or, for `launch_firecracker`,
serves one microVM through the library without the CLI. The template reaps children as
they exit (SIGCHLD) and remembers the last RETURNCODES_KEPT statuses. Children are not tied to the
template: they run on when it dies (then init reaps them).

Jailed children (a request with `jail`, a corral.jail.JailSpec the daemon made with
`Jail.prepare`): the template (root, one thread) unshares a new PID namespace for its next child
only, forks, and returns to its own; the child, pid 1 of that namespace, detaches as above and
then runs the jailer's own child side (corral.jail.enter_jail: cgroups, mount/IPC/UTS
namespaces, the minimal root, pivot_root, rlimits, its uid, no_new_privs, fds closed), swaps in
the jail's environment, and runs the VM in-process: no exec, so it keeps sharing the template's
pages. Modules imported later are found at the same paths (the jail binds the stdlib, the venv
and corral read-only). The template waits for the child's set-up (a pipe: EOF when done, the
failing step's line otherwise), so a jail that cannot be built fails its request with that line;
the reply says how long it took. No PR_SET_PDEATHSIG: jailed VMs outlive the template as others.

What an idle VM's process costs (USS of every mapping but guest RAM, probe `halt`, 128 MiB,
`corral firecracker --config-file`; bench/density_bench.py; 2026-11-30, a loaded 2-core PVM host):
a fresh interpreter 21.9-26.4 MiB; forked from the template 7.46 MiB; the port table as a dict
instead of a 64 K list (devices/bus.py) -0.56; `gc.freeze()` -0.17 (more as children collect);
filling pymalloc's free blocks before the freeze (`_fill_pools`) -0.27; the CLI's command lines
parsed once in the template (WARM_UP) -0.45: 6.1-6.2 MiB; a VM started through the library
(`launch_firecracker`: no click in the child) -0.6: 5.4-5.6 MiB. Re-measured 2026-11-30 (a
later main, library path, 4 VMs): 9.8 MiB, of which building the machine was 7 MiB: the
devices' state models and CpuModel are pydantic models with `defer_build`, so every child built
their validators on first use (~4 MiB of writes). Building them in the template
(`_build_deferred_models`): 6.0 MiB; one warm-up microVM run in the template before the fork
(`_warm_vm`: the probe's `halt` when its build is cached, its API asked, then stopped and its
threads joined; +0.2 s of template start): 5.5-5.6 MiB (a child serving only the API: 3.0).
Tried and not kept: MALLOC_ARENA_MAX=1 or 2 (no change: the VM threads barely use malloc arenas), smaller
thread stacks (a thread touches 8-12 KiB of its stack), gc.disable() while importing (within
noise). What remains is copy-on-write of template pages the child writes to: refcounts of the
objects the code it runs touches (Python 3.11 has no immortal objects), libpython's static
types (~0.5 MiB), and each thread's state. The floor is the CLI and the API server: a child that
serves the API with no VM costs 4.3 MiB.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import logging
import os
import random
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from corral.errors import CorralError
from corral.jail import JailSpec, JailStepError, enter_jail, linux

MAX_REQUEST = 64 << 10  # bytes in one request message
MAX_ARGS = 256
MAX_ARG = 4096  # characters in one argument
RETURNCODES_KEPT = 4096
# The program a child runs, named as `python -m` would (the CLI, and the daemon under it, import
# this module: it must not import them back)
ENTRY = "corral.cli"
START_TIMEOUT = 60.0  # seconds the template may take to import everything
REPLY_TIMEOUT = 30.0
WARM_VM_TIMEOUT = 10.0  # seconds the template's warm-up VM may run
JAIL_TIMEOUT = 20.0  # seconds a jailed child may take to enter its jail

# What a VM process runs: imported once in the template, shared by every child.
PRELOAD = (
    "corral.cli",
    "corral.api",
    "corral.console",
    "corral.machine",
    "corral.builder",
    "corral.migration",
    "corral.firecracker.main",
    "corral.firecracker.routes",
    "corral.firecracker.server",
    "corral.firecracker.snapshot",
    "corral.firecracker.vmm",
    "corral.state.snapshot",
    "corral.devices.virtio.blk",
    "corral.devices.virtio.net",
    "corral.devices.virtio.vsock",
    "corral.devices.virtio.console",
    "corral.devices.virtio.balloon",
    "corral.devices.virtio.rng",
    "corral.backends.disk",
    "corral.backends.tap",
    "pyroute2",  # what a tap's host side imports (and `corral firecracker` under seccomp, first)
    "pyroute2.netlink.exceptions",
    "corral.backends.console",
    "corral.backends.unix_socket",
    "corral.images.probe",
    "http.server",
    "socketserver",
    "http.client",
    "email.parser",
    "email.feedparser",
    "selectors",
    "ipaddress",
    "hmac",
    "secrets",
)


class ForkServerError(CorralError):
    """The fork server could not start, or refused or failed a request."""


class Launcher(Protocol):
    """Starts one VM process running corral's CLI with `args`; returns its pid."""

    def launch(self, args: list[str], *, log_path: str | os.PathLike[str]) -> int: ...


# --- the wire: one JSON message per request, one per reply ---------------------------------------

Arg = Annotated[str, StringConstraints(min_length=0, max_length=MAX_ARG)]


class LaunchRequest(BaseModel):
    """Fork a child running `corral ARGS...`; its output goes to `log_path`, or to the one fd
    sent with the message when `log_path` is None."""

    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["launch"]
    args: Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGS)]
    log_path: Annotated[str, StringConstraints(min_length=1, max_length=MAX_ARG)] | None = None
    jail: JailSpec | None = None  # run the child in this jail (the template must be root)


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ARG)]


class FirecrackerRequest(BaseModel):
    """Fork a child serving one microVM as `corral firecracker` does, through the library
    (corral.firecracker.main.run) rather than the CLI: a child that never runs click costs
    less (see the figures above). Output as for LaunchRequest; a ConfigError is the child's
    one `corral: error: ...` line and exit status 1, as the CLI's."""

    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["firecracker"]
    api_sock: Text
    instance_id: Text = "anonymous-instance"
    config_file: Text | None = None
    no_api: bool = False
    level: Text | None = None
    metrics_path: Text | None = None
    boot_timer: bool = False
    kvm_path: Text = "/dev/kvm"
    log_path: Text | None = None
    jail: JailSpec | None = None


class ReturncodeRequest(BaseModel):
    """The exit status of a child the server reaped (None while it runs, or if unknown)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    op: Literal["returncode"]
    pid: Annotated[int, Field(gt=0, lt=1 << 22)]


AnyRequest = LaunchRequest | FirecrackerRequest | ReturncodeRequest
REQUEST: TypeAdapter[AnyRequest] = TypeAdapter(Annotated[AnyRequest, Field(discriminator="op")])


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ok: bool
    pid: int | None = None
    returncode: int | None = None
    error: str | None = None
    jail_ms: float | None = None  # a jailed child: request to jail entered, in milliseconds
    jail_fd: bool = False  # the reply carries the read end of the jailed child's set-up pipe


def decode_request(data: bytes, truncated: bool = False) -> AnyRequest:
    """One request message, checked: a ForkServerError names what is wrong with it."""
    if truncated or len(data) > MAX_REQUEST:
        raise ForkServerError(f"request larger than {MAX_REQUEST} bytes")
    try:
        req = REQUEST.validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise ForkServerError(f"bad request: {where}: {first['msg']}") from None
    if isinstance(req, LaunchRequest):
        for i, a in enumerate(req.args):
            if "\0" in a:
                raise ForkServerError(f"bad request: args.{i}: contains a NUL character")
    for name, value in req:
        if isinstance(value, str) and "\0" in value:
            raise ForkServerError(f"bad request: {name}: contains a NUL character")
    return req


def encode(model: BaseModel) -> bytes:
    data = model.model_dump_json(exclude_none=True).encode()
    if len(data) > MAX_REQUEST:
        raise ForkServerError(f"request larger than {MAX_REQUEST} bytes: pass fewer or shorter args")
    return data


# --- the client: what the daemon and the bench hold ------------------------------------------------


def _await_jail(pid: int, fds: list[int], jail_id: str) -> None:
    """Wait, outside the server's lock, for a jailed child to enter its jail: EOF on its set-up
    pipe (the one fd the reply carried) is done; a line is the step that failed (the child
    ends); no word within JAIL_TIMEOUT kills it. A ForkServerError names what went wrong."""
    if len(fds) != 1:
        for f in fds:
            os.close(f)
        raise ForkServerError(f"jail {jail_id}: the fork server sent {len(fds)} fds, not the set-up pipe")
    err_r = fds[0]
    failure = b""
    deadline = time.monotonic() + JAIL_TIMEOUT
    try:
        while len(failure) < 4096:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([err_r], [], [], left)[0]:
                failure = failure or b"the child did not enter its jail in time"
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)  # the template, its parent, reaps it
                break
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            failure += chunk
    finally:
        os.close(err_r)
    if failure:
        raise ForkServerError(f"jail {jail_id}: {failure.decode(errors='replace')}")


class ForkServer:
    """A template process and the socket to it. `start()` it, `launch()` VMs, `close()` it (the
    VMs run on). Thread-safe: requests are serialized. A template that died is restarted by the
    next launch."""

    def __init__(self, *, env: dict[str, str] | None = None, python: str = sys.executable) -> None:
        self._env = env
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.ready_seconds = 0.0  # how long the last start took

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> ForkServer:
        with self._lock:
            self._start()
        return self

    def _start(self) -> None:
        self._stop()
        t0 = time.monotonic()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ if self._env is None else self._env)
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        try:
            self._proc = subprocess.Popen(
                [self._python, "-m", "corral.forkserver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C meant for the caller is not the template's
            )
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot start the fork server ({self._python}): {exc.strerror}") from None
        finally:
            theirs.close()
        self._sock = ours
        ours.settimeout(START_TIMEOUT)
        try:
            hello = ours.recv(MAX_REQUEST)
        except TimeoutError:
            hello = b""
        if not hello:
            self._stop()
            raise ForkServerError(
                f"the fork server did not start within {START_TIMEOUT:.0f} s: see its stderr"
            )
        ours.settimeout(REPLY_TIMEOUT)
        self.ready_seconds = time.monotonic() - t0

    def _call(self, req: BaseModel, fd: int | None = None) -> Reply:
        reply, got = self._call_fds(req, fd)
        for f in got:
            os.close(f)
        return reply

    def _call_fds(self, req: BaseModel, fd: int | None = None) -> tuple[Reply, list[int]]:
        """One request and its reply, with the fds that came with the reply (the caller's)."""
        data = encode(req)
        with self._lock:
            for attempt in (0, 1):
                if self._sock is None or (self._proc is not None and self._proc.poll() is not None):
                    self._start()
                assert self._sock is not None
                try:
                    if fd is None:
                        self._sock.send(data)
                    else:
                        self._sock.sendmsg(
                            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                        )
                    raw, got, _ = _recv(self._sock, cloexec=True)
                except (BrokenPipeError, ConnectionResetError):
                    raw, got = b"", []
                except TimeoutError:
                    raise ForkServerError(
                        f"the fork server did not answer within {REPLY_TIMEOUT:.0f} s"
                    ) from None
                if raw:
                    try:
                        return Reply.model_validate_json(raw), got
                    except ValidationError:
                        for f in got:
                            os.close(f)
                        raise ForkServerError("the fork server sent a bad reply") from None
                for f in got:
                    os.close(f)
                if attempt:
                    break
                self._stop()  # it died: one fresh template, then give up
        raise ForkServerError("the fork server died: see its stderr")

    def launch(
        self,
        args: list[str],
        *,
        log_path: str | os.PathLike[str] | None = None,
        output_fd: int | None = None,
        jail: JailSpec | None = None,
    ) -> int:
        """Fork a VM process running `corral ARGS...` with stdout and stderr appended to
        `log_path` (created 0600), or written to `output_fd` (a pipe, say); returns its pid.
        With `jail`, the process runs in that jail (see the module docstring)."""
        return self.launch_jailed(args, log_path=log_path, output_fd=output_fd, jail=jail)[0]

    def launch_jailed(
        self,
        args: list[str],
        *,
        log_path: str | os.PathLike[str] | None = None,
        output_fd: int | None = None,
        jail: JailSpec | None = None,
    ) -> tuple[int, float]:
        """As `launch`; also how long the child took to enter its jail (ms; 0 without one)."""
        if (log_path is None) == (output_fd is None):
            raise ForkServerError("give launch either log_path or output_fd")
        req = LaunchRequest(
            op="launch",
            args=list(args),
            log_path=None if log_path is None else os.fspath(log_path),
            jail=jail,
        )
        t0 = time.perf_counter()
        reply, fds = self._call_fds(req, output_fd)
        if not reply.ok or reply.pid is None:
            for f in fds:
                os.close(f)
            raise ForkServerError(f"launch {' '.join(args)[:200]}: {reply.error}")
        if reply.jail_fd and jail is not None:
            _await_jail(reply.pid, fds, jail.id)
            return reply.pid, (time.perf_counter() - t0) * 1000
        for f in fds:
            os.close(f)
        return reply.pid, reply.jail_ms or 0.0

    def launch_firecracker(
        self,
        *,
        api_sock: str | os.PathLike[str],
        instance_id: str = "anonymous-instance",
        config_file: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        output_fd: int | None = None,
        no_api: bool = False,
        level: str | None = None,
        metrics_path: str | os.PathLike[str] | None = None,
        boot_timer: bool = False,
        kvm_path: str = "/dev/kvm",
        jail: JailSpec | None = None,
    ) -> int:
        """Fork a process serving one microVM as `corral firecracker --api-sock ... --id ...
        --config-file ...` would, without running the CLI (less memory per VM); returns its pid.
        Output goes to `log_path` or `output_fd`, as for `launch`."""
        if (log_path is None) == (output_fd is None):
            raise ForkServerError("give launch_firecracker either log_path or output_fd")

        def opt(p: str | os.PathLike[str] | None) -> str | None:
            return None if p is None else os.fspath(p)

        req = FirecrackerRequest(
            op="firecracker",
            api_sock=os.fspath(api_sock),
            instance_id=instance_id,
            config_file=opt(config_file),
            no_api=no_api,
            level=level,
            metrics_path=opt(metrics_path),
            boot_timer=boot_timer,
            kvm_path=kvm_path,
            log_path=opt(log_path),
            jail=jail,
        )
        reply, fds = self._call_fds(req, output_fd)
        if not reply.ok or reply.pid is None:
            for f in fds:
                os.close(f)
            raise ForkServerError(f"launch_firecracker {instance_id}: {reply.error}")
        if reply.jail_fd and jail is not None:
            _await_jail(reply.pid, fds, jail.id)
        else:
            for f in fds:
                os.close(f)
        return reply.pid

    def returncode(self, pid: int) -> int | None:
        """A launched child's exit status once the template reaped it (negative: the signal),
        else None (still running, or reaped by a template that has since been replaced)."""
        reply = self._call(ReturncodeRequest(op="returncode", pid=pid))
        if not reply.ok:
            raise ForkServerError(str(reply.error))
        return reply.returncode

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the template exits on EOF
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop the template; the VMs it launched run on."""
        with self._lock:
            self._stop()

    def __enter__(self) -> ForkServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


if TYPE_CHECKING:
    _launcher: Launcher = ForkServer()  # the daemon's Launcher


# --- the template ------------------------------------------------------------------------------------

_returncodes: OrderedDict[int, int] = OrderedDict()
_fresh_handlers: dict[int, Any] = {}  # what the template changed, restored in every child


def _reap(signum: int = 0, frame: FrameType | None = None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _returncodes[pid] = os.waitstatus_to_exitcode(status)
        while len(_returncodes) > RETURNCODES_KEPT:
            _returncodes.popitem(last=False)


def preload() -> None:
    """Import what a VM runs and freeze it: after this, a child's collections never visit (and
    so never write to) the template's objects."""
    for name in PRELOAD:
        importlib.import_module(name)
    # what a machine imports only when it has the part (corral.builder.LAZY_MODULES): in the
    # template, shared, not in each child that has one
    importlib.import_module("corral.machine").preload()
    warm_up()
    gc.collect()
    _BALLAST.extend(_fill_pools())
    gc.freeze()


# Command lines parsed once in the template (not run), so what click builds on first use is
# the template's, shared, and not each child's (measured: 0.45 MiB less per VM)
WARM_UP = {
    "firecracker": [
        "--api-sock",
        "/nonexistent/api.sock",
        "--id",
        "warm-up",
        "--config-file",
        "/nonexistent",
    ],
    "run": ["--kernel", "/nonexistent", "--cmdline", "halt", "--memory", "128M", "--no-reboot"],
}


def warm_up() -> None:
    """Build the deferred pydantic models, run the warm-up microVM, and parse WARM_UP's command
    lines with corral's CLI, invoking nothing."""
    _build_deferred_models()
    _warm_vm()
    cli = importlib.import_module(ENTRY).main
    with cli.make_context("corral", [], resilient_parsing=True):
        pass
    for name, args in WARM_UP.items():
        cmd = cli.commands.get(name)
        if cmd is not None:
            with cmd.make_context(name, list(args), resilient_parsing=True):
                pass


def _build_deferred_models() -> int:
    """Build the validators of corral's pydantic models that defer them to first use
    (`defer_build`: a `corral run` should not pay for state it never saves): every VM uses
    some (the devices' state models, CpuModel), and building them in each child wrote to
    ~4 MiB of the template's pages there. Returns how many were built."""
    from pydantic import BaseModel

    from corral.lazymodel import build_all

    build_all()  # corral's models are pydantic classes from their first use on: now

    seen: set[type] = set()
    todo: list[type[BaseModel]] = list(BaseModel.__subclasses__())
    built = 0
    while todo and len(seen) < 10_000:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        todo.extend(cls.__subclasses__())
        if not cls.__module__.startswith("corral.") or (
            cls.__pydantic_complete__ and not cls.model_config.get("defer_build")
        ):
            continue
        if cls.__pydantic_generic_metadata__["parameters"]:
            continue  # a generic model: its parametrizations are built when made
        with contextlib.suppress(Exception):
            cls.model_rebuild(force=True)
            built += 1
    return built


def _warm_vm() -> bool:
    """Run one microVM (the probe's `halt`, when its build is cached) in the template, through
    what a child runs (a config file, FirecrackerVmm, the machine, its threads, the API server
    asked WARM_API), and end it before the fork: what a VM's first run creates and specializes is then the
    template's, shared (measured: 0.5 MiB less per VM). Its threads are joined: the template
    forks with none. Best effort: without /dev/kvm or a cached probe, nothing runs."""
    from corral.firecracker.main import apply_config, read_config_file
    from corral.firecracker.routes import Router
    from corral.firecracker.server import ApiServer
    from corral.firecracker.vmm import FirecrackerVmm
    from corral.images.probe import OUTPUT_NAME, probe_cache_dir, source_digest

    kernel = probe_cache_dir() / source_digest() / OUTPUT_NAME
    if not kernel.is_file() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "halt"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    }
    ran = False
    with tempfile.TemporaryDirectory() as tmp:
        cfg, sock = Path(tmp, "vm.json"), Path(tmp, "api.sock")
        cfg.write_text(json.dumps(config))
        vmm = FirecrackerVmm("warm-up")
        server = None
        try:
            apply_config(vmm, read_config_file(cfg))
            vmm.instance_start()
            server = ApiServer(sock, Router(vmm).handle)
            ran = all(_warm_get(sock, path) for path in WARM_API)
        except CorralError:
            pass
        finally:
            if server is not None:
                server.close()
            vmm.stop()
            vmm.exited.wait(WARM_VM_TIMEOUT)
    for t in threading.enumerate():
        if t is not threading.main_thread():
            t.join(WARM_VM_TIMEOUT)
    return ran


# What the warm-up VM is asked through its API: what clients and the daemon's scrapes ask
WARM_API = ("/", "/vm/config", "/machine-config", "/corral/stats")


def _warm_get(sock: Path, path: str) -> bool:
    """GET `path` on the API socket; True for a 200."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WARM_VM_TIMEOUT)
        try:
            s.connect(str(sock))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 1 << 20 and (chunk := s.recv(65536)):
                data += chunk
        except OSError:
            return False
    return data.startswith(b"HTTP/1.1 200")


_BALLAST: list[object] = []  # kept for the template's life (and shared by every child)


def _fill_pools() -> list[object]:
    """Objects that fill the free blocks of the template's partly used pymalloc pools, so a
    child's small allocations go to fresh pages rather than each copying a template page that
    holds live objects (measured: 0.27 MiB less per VM). The free blocks per size class come
    from CPython's own allocator statistics; anything unexpected there leaves no ballast."""
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    out: list[object] = []
    for line in text.splitlines()[:64]:
        parts = line.split()
        if len(parts) != 5 or not all(p.isdigit() for p in parts):
            continue
        size, avail = int(parts[1]), min(int(parts[4]), 1 << 16)
        if not 16 <= size <= 512 or size % 16:
            continue
        if size == 16:
            out += [object() for _ in range(avail)]
        elif size == 32:
            out += [float(i) + 0.5 for i in range(avail)]
        else:
            out += [bytes(size - 33) for _ in range(avail)]
    return out


def _open_log(path: str) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ForkServerError(f"cannot open the log {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ForkServerError(f"the log {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _cli(args: list[str]) -> Callable[[], int]:
    def run() -> int:
        sys.argv = ["corral", *args]
        importlib.import_module(ENTRY).main.main(args=args, prog_name="corral", standalone_mode=True)
        return 0

    return run


def _firecracker(req: FirecrackerRequest) -> Callable[[], int]:
    def run() -> int:
        from corral.firecracker.main import run as serve_vm

        sys.argv = ["corral", "firecracker", "--api-sock", req.api_sock, "--id", req.instance_id]
        logging.basicConfig(level=logging.WARNING, format="corral: %(levelname)s: %(message)s")
        try:
            return serve_vm(
                api_sock=Path(req.api_sock),
                instance_id=req.instance_id,
                config_file=None if req.config_file is None else Path(req.config_file),
                no_api=req.no_api,
                level=req.level,
                metrics_path=None if req.metrics_path is None else Path(req.metrics_path),
                boot_timer=req.boot_timer,
                kvm_path=req.kvm_path,
            )
        except CorralError as exc:
            print(f"corral: error: {exc}", file=sys.stderr)
            return 1

    return run


def _enter(spec: JailSpec, err_w: int) -> None:
    """In a jailed child, detached: enter the jail, take its environment, tell the template
    (EOF on `err_w`: done; a line: the step that failed, and the child ends)."""
    try:
        enter_jail(spec, err_w)
    except JailStepError as exc:
        with contextlib.suppress(OSError):
            os.write(err_w, str(exc).encode()[:4000])
        os._exit(127)
    os.environ.clear()
    os.environ.update(spec.env)
    tempfile.tempdir = None  # the template's /tmp is not in the jail: TMPDIR says where
    os.close(err_w)
    from corral.jail.debug import HOOK_ENV, start_debug_hook

    if HOOK_ENV in spec.env:  # the compromised-VMM simulation (a source tree's tests only)
        start_debug_hook(None)


def _child(
    sock: socket.socket, body: Callable[[], int], out: int, jail: tuple[JailSpec, int] | None = None
) -> None:
    """In the forked child: detach from the template, enter the jail if given one, then run
    `body` (corral's CLI, or a microVM through the library) and exit with its status. Never
    returns."""
    code = 1
    try:
        os.setsid()
        for sig, handler in _fresh_handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        sock.close()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        random.seed()
        for h in logging.root.handlers[:]:
            logging.root.removeHandler(h)
        _returncodes.clear()
        if jail is not None:
            _enter(*jail)
        try:
            code = body()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  # whatever happens, the child never returns to serve
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def _launch(sock: socket.socket, req: LaunchRequest | FirecrackerRequest, fds: list[int]) -> Reply:
    if isinstance(req, LaunchRequest):
        commands = importlib.import_module(ENTRY).main.commands  # a click.Group's
        if req.args[0] not in commands:
            raise ForkServerError(f"bad request: args.0: {req.args[0][:64]!r} is not a corral command")
        body = _cli(req.args)
    else:
        body = _firecracker(req)
    if req.log_path is not None:
        if fds:
            raise ForkServerError("bad request: give log_path or an fd, not both")
        out = _open_log(req.log_path)
    elif len(fds) == 1:
        out = os.dup(fds[0])
    else:
        raise ForkServerError("bad request: give log_path or one fd for the output")
    sys.stdout.flush()
    sys.stderr.flush()
    if req.jail is not None:
        try:
            pid, err_r = _fork_jailed(sock, body, out, fds, req.jail)
        finally:
            os.close(out)
        fds.append(err_r)  # sent with the reply, then closed here with the request's
        return Reply(ok=True, pid=pid, jail_fd=True)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(out)
        raise ForkServerError(f"fork failed: {exc.strerror}") from None
    if pid == 0:
        for fd in fds:
            os.close(fd)
        _child(sock, body, out)
    os.close(out)
    return Reply(ok=True, pid=pid)


def _fork_jailed(
    sock: socket.socket, body: Callable[[], int], out: int, fds: list[int], spec: JailSpec
) -> tuple[int, int]:
    """Fork a child into a new PID namespace (it is pid 1 there; the template's own namespace is
    restored at once) to enter `spec`'s jail; returns its pid and the read end of its set-up
    pipe, which goes to the client with the reply: the client waits for the child's word
    (_await_jail), so the template serves the next request meanwhile and jails are entered
    side by side."""
    if os.geteuid() != 0:
        raise ForkServerError("a jailed launch needs a fork server running as root")
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            linux.unshare(linux.CLONE_NEWPID)  # for the next child only
            pid = os.fork()
        except OSError as exc:
            os.close(err_r)
            os.close(err_w)
            raise ForkServerError(f"jail {spec.id}: {exc}") from None
        if pid == 0:  # pragma: no cover - the child never returns
            os.close(err_r)
            for fd in fds:
                os.close(fd)
            _child(sock, body, out, (spec, err_w))
    finally:
        linux.setns(own_pidns, linux.CLONE_NEWPID)  # the template's later children: as before
        os.close(own_pidns)
    os.close(err_w)
    return pid, err_r


def _recv(sock: socket.socket, cloexec: bool = False) -> tuple[bytes, list[int], bool]:
    """One message, the fds that came with it, and whether it was cut (too long)."""
    flags_in = socket.MSG_CMSG_CLOEXEC if cloexec else 0
    data, anc, flags, _ = sock.recvmsg(MAX_REQUEST + 1, socket.CMSG_SPACE(4 * 4), flags_in)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    cut = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
    return data, fds, cut


def serve(sock: socket.socket) -> None:
    """Answer requests on `sock` until its other end closes."""
    _fresh_handlers[signal.SIGCHLD] = signal.getsignal(signal.SIGCHLD)
    signal.signal(signal.SIGCHLD, _reap)
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            data, fds, cut = _recv(sock)
        except ConnectionResetError:
            return
        if not data and not fds and not cut:
            return  # EOF: whoever started us is gone; the children run on
        try:
            if cut and fds:
                raise ForkServerError("bad request: too many fds (give at most one)")
            req = decode_request(data, cut)
            if isinstance(req, ReturncodeRequest):
                _reap()
                reply = Reply(ok=True, pid=req.pid, returncode=_returncodes.get(req.pid))
            else:
                reply = _launch(sock, req, fds)
        except ForkServerError as exc:
            reply = Reply(ok=False, error=str(exc))
        try:  # the request's fds, and a jailed child's set-up pipe, are closed once replied
            data = reply.model_dump_json(exclude_none=True).encode()
            if reply.jail_fd:
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds[-1:]))])
            else:
                sock.send(data)
        except OSError:
            return
        finally:
            for fd in fds:
                os.close(fd)
        _reap()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print(
            "usage: python -m corral.forkserver FD (started by corral.forkserver.ForkServer)", file=sys.stderr
        )
        return 2
    sock = socket.socket(fileno=int(argv[0]))
    if sock.type != socket.SOCK_SEQPACKET:
        print("corral.forkserver: FD is not a SOCK_SEQPACKET socket", file=sys.stderr)
        return 2
    preload()
    assert threading.active_count() == 1, "the template must fork with no thread but its own"
    serve(sock)
    return 0


__all__ = [
    "MAX_ARG",
    "MAX_ARGS",
    "MAX_REQUEST",
    "PRELOAD",
    "FirecrackerRequest",
    "ForkServer",
    "ForkServerError",
    "LaunchRequest",
    "Launcher",
    "Reply",
    "ReturncodeRequest",
    "decode_request",
    "preload",
    "serve",
]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
