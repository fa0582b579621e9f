"""The corral command line: a thin layer over the library.

One error path: every command is a `Command`, which turns a CorralError into the one line
`corral: error: ...` and the command's exit status; a FieldError (a bad config field) is shown
with the flag the user typed for that field, since the library speaks only of fields. Options
used by several commands are declared once below; control-socket verbs go through
corral.api.ControlClient, and `corral image` asks each image about itself.
"""

# ruff: noqa: E402  (the start-up setting below must precede pydantic's import)
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

# isort: off
from corral.startup import no_pydantic_plugins

no_pydantic_plugins()  # before pydantic is imported (below, and by corral.config)
# isort: on

from corral.config import (
    DEBUG_EXIT,
    DISK,
    MODULE,
    NET,
    VIRTIO_CONSOLE,
    VSOCK,
    DiskConfig,
    HostResources,
    MachineConfig,
    ModuleConfig,
    NetConfig,
    VsockConfig,
    field_error,
    parse_size,
)
from corral.console import TerminalConsole
from corral.errors import ConfigError, CorralError, FieldError, HostError
from corral.lazymodel import validation_error
from corral.machine import Machine
from corral.machine import preload as preload_machine
from corral.seccomp import enter as enter_seccomp
from corral.vstate.vm import CAPABILITIES

if TYPE_CHECKING:
    from corral.api import ControlClient, MigrationProgress
    from corral.host import HostReport
    from corral.images.registry import Image

# Start-up: `corral run` pays only for what it runs. The control socket (corral.api) and
# migration are imported by the commands that use them.

ERROR_CODE = "corral.error_code"  # ctx.meta key: the exit status of a failure from here on


# --- the one error path ----------------------------------------------------------------------------


class Failure(click.ClickException):
    """Ends the command with one line on stderr, `corral: error: ...`, and `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        click.echo(f"corral: error: {self.format_message()}", err=True)


def _field_problem(ctx: click.Context, path: str, reason: str) -> str:
    """One bad config field in the words of the command line: the flag the user typed (and, for
    a field inside one of its values, that value) instead of the field's path."""
    m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?(?:\.(.+))?", path)
    opt = next((p for p in ctx.command.params if m and p.name == m[1] and isinstance(p, click.Option)), None)
    if m is None or opt is None:
        return f"{path}: {reason}"
    flag = max(opt.opts, key=len)
    if m[3] is None:
        return f"{flag}: {reason}"
    value = ctx.params.get(opt.name or "")
    if m[2] is not None:
        value = value[int(m[2])] if isinstance(value, (tuple, list)) and int(m[2]) < len(value) else None
    return f"{flag} {value}: {m[3]}: {reason}" if isinstance(value, str) else f"{flag}: {m[3]}: {reason}"


def describe(exc: CorralError, ctx: click.Context) -> str:
    """The one-line message for a library error, as this command's user should read it."""
    # never imported here: this runs after a failure, maybe on a thread under its seccomp filter,
    # which cannot map a C extension; if corral.api is not loaded the error cannot be its own
    api = sys.modules.get("corral.api")
    if api is not None and isinstance(exc, api.NoControlSocket):
        return f"{exc}: start the VM with --api {exc.path}"
    if isinstance(exc, FieldError):
        return "; ".join(_field_problem(ctx, f, r) for f, r in exc.problems)
    return str(exc)


class Command(click.Command):
    """A command whose CorralErrors end it with one line and `error_code` (or the code a later
    phase set in ctx.meta[ERROR_CODE])."""

    def __init__(self, *args: Any, error_code: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_code = error_code

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CorralError as exc:
            raise Failure(describe(exc, ctx), ctx.meta.get(ERROR_CODE, self.error_code)) from None


class Group(click.Group):
    command_class = Command
    group_class = type  # subgroups are Groups too


class Parsed(click.ParamType):
    """A command-line value the library parses; its CorralError ends the command (exit 2)."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except CorralError as exc:
            raise Failure(str(exc), 2) from None


SIZE = Parsed("size", parse_size)
# path types made once and shared: each click.Path looks up its translated name (gettext, with
# a stat per locale directory), ~70 µs apiece, and the commands take some thirty paths
PATH = click.Path(path_type=Path)
FILE = click.Path(path_type=Path, dir_okay=False)
DIRECTORY = click.Path(path_type=Path, file_okay=False)


def _image(name: str) -> Image:
    from corral.images.registry import get_image  # only when an image is named: not on a --kernel launch

    return get_image(name)


IMAGE = Parsed("image", _image)


def _client(path: str) -> ControlClient:
    from corral.api import ControlClient

    return ControlClient(path)


VM = Parsed("socket", _client)

# --- options shared by several commands --------------------------------------------------------------

KVM_OPTION = click.option(
    "--kvm",
    "kvm_path",
    default="/dev/kvm",
    envvar="CORRAL_KVM",
    show_default=True,
    help="The KVM device to use.",
)
SERVE_API_OPTION = click.option(
    "--api",
    "api_path",
    type=PATH,
    metavar="SOCKET",
    help="Serve a control socket (pause, resume, snapshot, migrate) at this path.",
)


def _seccomp_option(ctx: click.Context, param: click.Parameter, off: bool) -> None:
    from corral.seccomp import enable, prepare

    if off:
        click.echo(
            "corral: warning: --no-seccomp: the VMM's threads run without syscall filters "
            "(for debugging only)",
            err=True,
        )
        enable(False)
        return
    enable()
    prepare()
    ctx.call_on_close(lambda: enable(False))  # for this command only (CliRunner in one process)


SECCOMP_OPTION = click.option(
    "--no-seccomp",
    is_flag=True,
    expose_value=False,
    callback=_seccomp_option,
    help="Run the VMM's threads without seccomp filters (debugging only).",
)
VM_OPTION = click.option(
    "--api",
    "vm",
    type=VM,
    required=True,
    metavar="SOCKET",
    help="The VM's control socket (corral run --api).",
)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log VMM activity to stderr.")
def main(verbose: bool) -> None:
    """corral: a hypervisor on Linux KVM."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="corral: %(levelname)s: %(message)s"
    )


# --- run, and the foreground loop it shares with restore and receive ----------------------------------
# Option names are MachineConfig's field names, so a FieldError finds the flag the user typed.


def GDB_OPTIONS(f: Callable[..., Any]) -> Callable[..., Any]:
    """--gdb and --gdb-wait (run, restore)."""
    f = click.option(
        "--gdb-wait", is_flag=True, help="Hold the guest at its first instruction until gdb continues it."
    )(f)
    return click.option(
        "--gdb",
        metavar="tcp:[HOST:]PORT|unix:PATH",
        help="Serve the GDB remote protocol here (gdb: target remote HOST:PORT); HOST defaults to 127.0.0.1.",
    )(f)


def _gdb_address(gdb: str | None, gdb_wait: bool) -> Any:
    """The checked --gdb address (None without --gdb)."""
    if gdb_wait and not gdb:
        raise ConfigError("--gdb-wait needs --gdb (where the debugger connects)")
    if not gdb:
        return None
    from corral.debug import GdbAddress

    return GdbAddress.parse(gdb)


def _serve_gdb(machine: Machine, address: Any, wait: bool) -> Any:
    """A GdbStub for a built machine, announced on stderr (None without an address); the
    machine is closed if the stub cannot start."""
    if address is None:
        return None
    from corral.debug import GdbStub

    try:
        stub = GdbStub(machine, address, wait=wait)
    except CorralError:
        machine.close()
        raise
    wait_note = "; the guest waits for the debugger to continue it" if wait else ""
    click.echo(f"corral: gdb stub on {stub.where}{wait_note}", err=True)
    return stub


@main.command()
@click.option("--kernel", type=PATH, help="bzImage, PVH vmlinux or Multiboot ELF.")
@click.option(
    "--firmware",
    metavar="seabios|ovmf[,vars=PATH]|PATH",
    help="Boot through a BIOS (Debian's SeaBIOS, or an image file) or UEFI (Debian's OVMF; its "
    "variables kept in vars=PATH, made from OVMF's template if missing) instead of loading the kernel "
    "directly.",
)
@click.option(
    "--image", "image", type=IMAGE, metavar="NAME", help="A named image (corral image list): probe, ..."
)
@click.option("--initrd", type=PATH, help="Initial ramdisk.")
@click.option("--cmdline", help="Kernel command line (the image's default if omitted).")
@click.option(
    "--module",
    "modules",
    multiple=True,
    metavar=MODULE.syntax,
    help="A Multiboot module after the initrd (repeatable); the guest sees its string as 'PATH ARGS' "
    "(ARGS without commas).",
)
@click.option("--cpus", type=int, default=1, show_default=True, help="Number of vCPUs.")
@click.option("--memory", default="512M", show_default=True, help="Guest RAM, e.g. 512M or 2G.")
@click.option("--no-reboot", is_flag=True, help="Stop instead of rebooting when the guest resets.")
@click.option(
    "--cpu-hide",
    default="",
    metavar="LIST",
    help="CPU features to hide from the guest, comma-separated (e.g. xsave,pku).",
)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar=DISK.syntax,
    help="A raw disk image as a virtio-blk device (repeatable); with overlay=FILE the "
    "guest's writes go to FILE (copy-on-write) and the image is shared read-only.",
)
@click.option("--rng", is_flag=True, help="Give the guest a virtio-rng device.")
@click.option(
    "--net",
    "nets",
    multiple=True,
    metavar=NET.syntax,
    help="A virtio-net NIC on a tap device, created and brought up if missing (repeatable).",
)
@click.option(
    "--virtio-console",
    "virtio_console",
    default="",
    metavar=VIRTIO_CONSOLE.syntax,
    help="A virtio-console (hvc0) on a new pseudo-terminal or appended to a file.",
)
@click.option(
    "--balloon", is_flag=True, help="A virtio-balloon device (corral balloon), with free page reporting."
)
@click.option(
    "--vsock",
    metavar=VSOCK.syntax,
    help="A virtio-vsock device; host programs connect to PATH ('CONNECT <port>').",
)
@GDB_OPTIONS
@click.option(
    "--ksm",
    is_flag=True,
    help="Let the host's KSM merge guest RAM with identical pages of other VMs (MADV_MERGEABLE).",
)
@click.option(
    "--debug-exit",
    "debug_exit",
    metavar=DEBUG_EXIT.syntax,
    help="Where the exit port is (QEMU's isa-debug-exit iobase; default 0x501, test suites use 0xf4).",
)
@click.option(
    "--jail",
    is_flag=True,
    help="Run the VMM in a jail (namespaces, a minimal root, its own uid); `corral jail -- run` sets "
    "its options.",
)
@click.option(
    "--dump-on-crash",
    type=DIRECTORY,
    metavar="DIR",
    help="When the guest crashes (triple fault, KVM internal error), write its ELF core into DIR.",
)
@click.option("--stats", is_flag=True, help="Count exits from the start (corral stats shows them).")
@click.option(
    "--trace",
    type=FILE,
    metavar="FILE",
    help="Record every exit into FILE (new), for `corral trace show FILE`.",
)
@KVM_OPTION
@SECCOMP_OPTION
@SERVE_API_OPTION
def run(
    kernel: Path | None,
    firmware: str | None,
    image: Image | None,
    initrd: Path | None,
    cmdline: str | None,
    modules: tuple[str, ...],
    cpus: int,
    memory: str,
    no_reboot: bool,
    cpu_hide: str,
    disks: tuple[str, ...],
    rng: bool,
    nets: tuple[str, ...],
    virtio_console: str,
    balloon: bool,
    vsock: str | None,
    gdb: str | None,
    gdb_wait: bool,
    ksm: bool,
    debug_exit: str | None,
    jail: bool,
    dump_on_crash: Path | None,
    stats: bool,
    trace: Path | None,
    kvm_path: str,
    api_path: Path | None,
) -> None:
    """Boot a guest with its serial console on this terminal (Ctrl-A X quits).

    Exits with the guest's exit-port status, or 0 on a clean poweroff.
    """
    host: HostReport | None = None

    def is_pvm_host() -> bool:  # asked only when no kernel is given (the probe or an image)
        nonlocal host
        if host is None:
            from corral.host import probe_host

            host = probe_host(kvm_path)
        return host.is_pvm

    if kernel and image:
        raise ConfigError("give either --kernel or --image, not both")
    if kernel is None and image is None and firmware is None:
        if is_pvm_host():
            click.echo(f"corral: {_pvm_explanation()}.\ncorral: booting the probe guest instead.", err=True)
            image = _image("probe")
        else:
            image = _image("debian")
    if image is not None and image.boots_from_disk:
        # a disk image boots through its firmware, shared read-only: the cache copy stays as verified
        if image.needs_hardware_virt and is_pvm_host():
            raise HostError(f"image '{image.name}' needs hardware virtualization: {_pvm_explanation()}")
        disk_path, _ = image.resolve()
        disks = (f"{disk_path},ro", *disks)
        firmware = firmware or image.firmware
        image = None
    if kernel is None and image is not None:
        if image.needs_hardware_virt and is_pvm_host():
            raise HostError(f"image '{image.name}' needs hardware virtualization: {_pvm_explanation()}")
        kernel, img_initrd = image.resolve()
        initrd = initrd or img_initrd
        if cmdline is None:
            cmdline = image.default_cmdline
    config = MachineConfig.build(
        firmware=firmware,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline or "",
        modules=[ModuleConfig.parse(m, i) for i, m in enumerate(modules)],
        cpus=cpus,
        memory=memory,
        no_reboot=no_reboot,
        cpu_hide=cpu_hide,
        disks=[DiskConfig.parse(d, i) for i, d in enumerate(disks)],
        rng=rng,
        nets=[NetConfig.parse(n, i) for i, n in enumerate(nets)],
        vsock=VsockConfig.parse(vsock) if vsock else None,
        balloon=balloon,
        virtio_console=virtio_console,
        ksm=ksm,
        **({"debug_exit": debug_exit} if debug_exit else {}),
    )
    gdb_address = _gdb_address(gdb, gdb_wait)
    jail_options = click.get_current_context().meta.get(JAIL_OPTIONS)
    if jail or jail_options is not None:
        from corral.jail import JailOptions, map_run

        if gdb:
            raise ConfigError("--gdb is not served from inside a jail yet: debug without --jail")
        if trace or dump_on_crash or stats:
            raise ConfigError(
                "--trace, --stats and --dump-on-crash are not available inside a jail yet: "
                "debug without --jail"
            )

        verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
        from corral.seccomp import enabled as seccomp_on

        inner = map_run(config, api_path, kvm_path, verbose, seccomp=seccomp_on())
        _run_jailed(jail_options or JailOptions(), inner)
    if dump_on_crash is not None and not dump_on_crash.is_dir():
        raise ConfigError(f"--dump-on-crash {dump_on_crash}: no such directory; create it first")
    if trace is not None and trace.exists():
        raise ConfigError(f"--trace {trace}: the file exists; give a new path")
    machine = Machine(config, kvm_path=kvm_path)
    machine.build()
    if dump_on_crash is not None:
        machine.on_crash = _crash_dumper(dump_on_crash)
    writer = None
    if trace is not None:
        from corral.debug.trace import TraceWriter

        try:
            writer = TraceWriter.for_machine(machine, trace)
        except CorralError:
            machine.close()
            raise
    elif stats:
        machine.observe_exits()
    try:
        _run_foreground(machine, api_path, _serve_gdb(machine, gdb_address, gdb_wait))
    finally:
        if writer is not None:
            writer.close()
            dropped = f", {writer.dropped} dropped" if writer.dropped else ""
            click.echo(f"corral: trace {trace}: {writer.records} exits{dropped}", err=True)


def _crash_dumper(directory: Path) -> Callable[[Machine, Any], None]:
    """Machine.on_crash for --dump-on-crash: the core goes to DIR/crash-TIME-PID.core."""
    # Imported now, not at the crash: by then the thread is under its seccomp filter, which
    # lets no new code be mapped (an extension module's dlopen).
    from corral.debug.dump import dump_core

    def dump(machine: Machine, result: Any) -> None:
        path = directory / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.core"
        try:
            r = dump_core(machine, path)
        except CorralError as exc:
            click.echo(f"corral: the guest crashed; no core written: {exc}", err=True)
            return
        click.echo(f"corral: the guest crashed; its core is {r.path}", err=True)

    return dump


def _run_foreground(machine: Machine, api_path: Path | None, gdb: Any = None) -> NoReturn:
    """Run a built machine with its console on this terminal (and its control socket, if
    asked) until it stops; exit with its status. `gdb` (its GdbStub) is closed on the way out."""
    click.get_current_context().meta[ERROR_CODE] = 2  # a failure from here on is the run's
    server = None
    if api_path is not None:
        try:
            from corral.api import ControlServer

            server = ControlServer(machine, api_path)
        except CorralError:
            machine.close()
            raise
    from corral.jail.debug import start_debug_hook

    # this thread runs the machine from here on (and rebuilds it when the guest reboots)
    enter_seccomp("vmm", "corral-vmm")
    # Only with CORRAL_DEBUG_HOOK set, in a build that allows it; after the filter, so the hook
    # runs as a taken-over VMM thread would: under the VMM's allow-list.
    start_debug_hook(machine)
    try:
        with TerminalConsole(machine.send_input, lambda: machine.stop("quit from the console")):
            try:
                result = machine.run()
            except KeyboardInterrupt:
                # machine.run() has already torn the VM down on the way out
                click.echo("\ncorral: interrupted; the guest was stopped", err=True)
                sys.exit(130)
    finally:
        if server is not None:
            server.close()
        if gdb is not None:
            gdb.close()
    if result.kind in ("crash", "error", "stopped"):
        click.echo(f"\ncorral: {result.message}", err=True)
    sys.exit(result.status & 0xFF)


# --- VM state: restore, clone, receive ------------------------------------------------------------
# A snapshot's manifest and a migration peer are untrusted with the host: the operator names
# the host side of the guest's devices here (config.HostResources), with the syntax of `run`.


def host_resource_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--kernel, --initrd, --disk, --net, --vsock, --virtio-console as grants (see HostResources)."""
    for option in reversed(
        [
            click.option(
                "--firmware",
                metavar="seabios|PATH",
                help="The BIOS image of a guest that booted through firmware (its ROM and reboots).",
            ),
            click.option(
                "--kernel",
                type=PATH,
                help="The kernel a guest reboot boots (without it the guest stops on a reset).",
            ),
            click.option("--initrd", type=PATH, help="The initrd a guest reboot loads."),
            click.option(
                "--disk",
                "disks",
                multiple=True,
                metavar=DISK.syntax,
                help="The image for the guest's next disk, in its order (repeatable): the paths "
                "the snapshot or the source names are never opened.",
            ),
            click.option(
                "--net",
                "nets",
                multiple=True,
                metavar=NET.syntax,
                help="The tap for the guest's next NIC, in its order (repeatable).",
            ),
            click.option("--vsock", metavar=VSOCK.syntax, help="The socket for the guest's vsock device."),
            click.option(
                "--virtio-console",
                "virtio_console",
                default="",
                metavar=VIRTIO_CONSOLE.syntax,
                help="Where the guest's virtio-console goes (a pty needs no grant).",
            ),
        ]
    ):
        f = option(f)
    return f


def _grant(
    firmware: str | None,
    kernel: Path | None,
    initrd: Path | None,
    disks: tuple[str, ...],
    nets: tuple[str, ...],
    vsock: str | None,
    virtio_console: str,
) -> HostResources:
    try:
        return HostResources(
            firmware=firmware,
            kernel=kernel,
            initrd=initrd,
            disks=tuple(DiskConfig.parse(d, i) for i, d in enumerate(disks)),
            nets=tuple(NetConfig.parse(n, i) for i, n in enumerate(nets)),
            vsock=VsockConfig.parse(vsock) if vsock else None,
            virtio_console=virtio_console,
        )
    except validation_error() as exc:
        raise field_error(exc) from None


@main.command()
@click.argument("snapshot", type=PATH)
@host_resource_options
@GDB_OPTIONS
@KVM_OPTION
@SECCOMP_OPTION
@SERVE_API_OPTION
def restore(
    snapshot: Path, gdb: str | None, gdb_wait: bool, kvm_path: str, api_path: Path | None, **grant: Any
) -> None:
    """Resume the guest saved in SNAPSHOT (a directory from `corral snapshot`).

    Give the host side of its devices as `run` takes them (--disk, --net, --vsock, ...): the
    snapshot's own paths and taps are not trusted. With --gdb a debugger can attach (with
    --gdb-wait the guest waits at the snapshot's instruction until it continues)."""
    gdb_address = _gdb_address(gdb, gdb_wait)
    machine = Machine.from_snapshot(snapshot, kvm_path=kvm_path, host=_grant(**grant))
    machine.build()
    _run_foreground(machine, api_path, _serve_gdb(machine, gdb_address, gdb_wait))


@main.command()
@click.argument("snapshot", type=PATH)
@click.option(
    "-n",
    "--count",
    type=click.IntRange(1, 256),
    default=2,
    show_default=True,
    help="How many clones to start.",
)
@host_resource_options
@KVM_OPTION
@SECCOMP_OPTION
def clone(snapshot: Path, count: int, kvm_path: str, **grant: Any) -> None:
    """Start COUNT guests from one snapshot, sharing its unchanged memory; their consoles are
    shown line by line, prefixed with the clone's number. Ctrl-C stops them all. Host
    resources are granted as for restore; each clone's tap and vsock socket get a suffix."""
    out_lock = threading.Lock()
    host = _grant(**grant)

    def console(i: int) -> Callable[[bytes], None]:
        pending = bytearray()

        def write(data: bytes) -> None:
            pending.extend(data)
            *lines, rest = bytes(pending).split(b"\n")
            pending[:] = rest
            with out_lock:
                for line in lines:
                    sys.stdout.buffer.write(f"[clone {i}] ".encode() + line.rstrip(b"\r") + b"\n")
                sys.stdout.buffer.flush()

        return write

    machines: list[Machine] = []

    def stop_all() -> None:
        for m in machines:
            m.stop()
            m.close()

    try:
        for i in range(count):
            m = Machine.from_snapshot(
                snapshot, kvm_path=kvm_path, console=console(i), clone_index=i, host=host
            )
            machines.append(m)
            m.start()
    except CorralError:
        stop_all()
        raise
    click.echo(f"corral: {count} clones of {snapshot} running", err=True)
    enter_seccomp("vmm", "corral-vmm")
    worst = 0
    try:
        for i, m in enumerate(machines):
            r = m.wait()
            m.close()
            assert r is not None
            click.echo(f"corral: clone {i}: {r.message}", err=True)
            worst = max(worst, r.status & 0xFF)
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
    sys.exit(worst)


@main.command(error_code=1)
@click.option(
    "--listen",
    "address",
    required=True,
    metavar="[HOST:]PORT",
    help="Where to wait for the migration; PORT alone is loopback (give 0.0.0.0:PORT for every address).",
)
@click.option(
    "--token-file",
    type=PATH,
    help="A file (mode 600) holding the shared token the source must prove (openssl rand -hex 32).",
)
@click.option("--insecure", is_flag=True, help="Accept a migration from anyone who can connect (no token).")
@click.option("--tls-cert", type=PATH, help="TLS certificate (PEM); the source pins its SHA-256.")
@click.option("--tls-key", type=PATH, help="The TLS certificate's private key (PEM).")
@host_resource_options
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@KVM_OPTION
@SECCOMP_OPTION
@SERVE_API_OPTION
def receive(
    address: str,
    token_file: Path | None,
    insecure: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    timeout: float | None,
    kvm_path: str,
    api_path: Path | None,
    **grant: Any,
) -> None:
    """Wait for one live migration (`corral migrate`) and run the guest that arrives.

    Connections that do not prove the token are logged and the receiver waits on; so does a
    migration that fails. The guest's disks, NICs, vsock and console are the ones given here."""
    from corral.migration import (
        MigrationError,
        certificate_pin,
        listen,
        load_token,
        parse_address,
        server_tls,
    )
    from corral.migration import receive as receive_vm

    parse_address(address, any_port=True)  # a bad address is the first thing to hear about
    if token_file is None and not insecure:
        raise ConfigError(
            "give --token-file FILE (a shared secret the source gives too; make one with "
            "`openssl rand -hex 32 > FILE; chmod 600 FILE`), or --insecure to accept anyone"
        )
    token = load_token(token_file) if token_file is not None else None
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    tls = server_tls(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    host = _grant(**grant)
    server = listen(address)
    bound_host, bound_port = server.getsockname()[:2]
    where = f"{bound_host}:{bound_port}"
    click.echo(f"corral: waiting for a migration on {where}", err=True)
    if tls_cert is not None:
        click.echo(
            f"corral: TLS certificate sha256 {certificate_pin(tls_cert)} (corral migrate --tls-pin)", err=True
        )
    if token is None:
        click.echo(
            f"corral: warning: --insecure: anyone who can connect to {where} can send a guest here", err=True
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    if api_path is not None:
        import corral.api  # noqa: F401  (its C extensions cannot be mapped under the filter)
    preload_machine()  # the machine is built under the filter: whatever devices it was sent
    # from here this thread waits, builds the machine it is sent and runs it: the VMM's filter
    # (each handshake's thread stacks a narrower one: corral.migration)
    enter_seccomp("vmm", "corral-vmm")
    try:
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                machine = receive_vm(
                    server,
                    token=token,
                    insecure=insecure,
                    tls=tls,
                    host=host,
                    kvm_path=kvm_path,
                    accept_timeout=left,
                )
                break
            except MigrationError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                click.echo(f"corral: {exc}; waiting for the next migration", err=True)
    finally:
        server.close()
    click.echo("corral: migration arrived; the guest runs here", err=True)
    _run_foreground(machine, api_path)


# --- the control-socket verbs ------------------------------------------------------------------------


@main.command(error_code=1)
@VM_OPTION
def pause(vm: ControlClient) -> None:
    """Pause a running VM (its vCPUs, devices and clock)."""
    vm.pause()


@main.command(error_code=1)
@VM_OPTION
def resume(vm: ControlClient) -> None:
    """Resume a paused VM."""
    vm.resume()


@main.command(error_code=1)
@VM_OPTION
def wake(vm: ControlClient) -> None:
    """Wake a guest suspended to RAM (ACPI S3, `echo mem > /sys/power/state` in Linux)."""
    vm.wake()


@main.command(error_code=1)
@VM_OPTION
def stop(vm: ControlClient) -> None:
    """Stop a VM (as if its power were cut)."""
    vm.stop()


@main.command(error_code=1)
@VM_OPTION
def status(vm: ControlClient) -> None:
    """Say whether a VM is running or paused."""
    r = vm.status()
    click.echo(f"{r.state} ({r.cpus} vCPUs, {r.memory >> 20} MiB)")


@main.command(error_code=1)
@VM_OPTION
@click.argument("directory", type=PATH)
def snapshot(vm: ControlClient, directory: Path) -> None:
    """Save a running VM to DIRECTORY (new); it keeps running (a paused one stays paused)."""
    r = vm.snapshot(directory.resolve())
    click.echo(
        f"corral: snapshot {r.path}: {r.memory_bytes_written / (1 << 20):.1f} MiB of memory, "
        f"{r.disk_bytes / (1 << 20):.1f} MiB on disk, {r.seconds * 1000:.0f} ms",
        err=True,
    )


@main.command(error_code=1)
@VM_OPTION
@click.argument("size", type=SIZE, required=False)
def balloon(vm: ControlClient, size: int | None) -> None:
    """Set the balloon to SIZE (e.g. 256M: memory the guest gives back; 0 returns it all), then
    show the balloon and the guest's memory statistics."""
    r = vm.balloon(size)
    mib = 1 << 20
    click.echo(
        f"balloon: target {r.target_bytes / mib:.0f} MiB, guest gave {r.actual_bytes / mib:.0f} MiB; "
        f"host memory behind guest RAM {r.host_resident_bytes / mib:.0f} MiB; "
        f"free pages reported {r.reported_bytes / mib:.0f} MiB"
    )
    for k, v in sorted(r.stats.items()):
        click.echo(
            f"  {k}: {v / mib:.1f} MiB" if k.endswith("memory") or k == "disk_caches" else f"  {k}: {v}"
        )


@main.command(error_code=1)
@VM_OPTION
@click.argument("target", metavar="HOST:PORT")
@click.option(
    "--downtime-ms",
    type=click.IntRange(1, 60_000),
    default=300,
    show_default=True,
    help="The longest the guest may be stopped for the last copy.",
)
@click.option(
    "--token-file",
    type=PATH,
    help="A file (mode 600) holding the token the receiver was started with.",
)
@click.option("--insecure", is_flag=True, help="Send the guest to a receiver that checks no token.")
@click.option(
    "--tls-pin", metavar="SHA256", help="Use TLS; the receiver's certificate must have this SHA-256."
)
def migrate(
    vm: ControlClient,
    target: str,
    downtime_ms: int,
    token_file: Path | None,
    insecure: bool,
    tls_pin: str | None,
) -> None:
    """Live-migrate a running VM to `corral receive` at HOST:PORT, proving the token both
    hold (--token-file) and, with --tls-pin, over TLS to the certificate pinned."""
    from corral.migration import load_token

    if token_file is None and not insecure:
        raise ConfigError(
            "give --token-file FILE (the token `corral receive` was given), or --insecure for a "
            "receiver that checks none"
        )
    token = load_token(token_file).decode() if token_file is not None else None

    def progress(p: MigrationProgress) -> None:
        click.echo(
            f"corral: round {p.round}: {p.sent / (1 << 20):.1f} MiB sent, "
            f"{p.dirty / (1 << 20):.1f} MiB dirtied meanwhile",
            err=True,
        )

    r = vm.migrate(target, downtime_ms, progress, token=token, tls_pin=tls_pin, insecure=insecure)
    click.echo(
        f"corral: migrated to {target} in {r.total_seconds:.2f} s: {r.rounds} rounds, "
        f"{r.bytes_sent / (1 << 20):.1f} MiB sent, downtime {r.downtime_seconds * 1000:.1f} ms",
        err=True,
    )


# --- the host ------------------------------------------------------------------------------------------


def _pvm_explanation() -> str:
    from corral.host import PVM_EXPLANATION

    return PVM_EXPLANATION


@main.command()
@KVM_OPTION
def doctor(kvm_path: str) -> None:
    """Report what this host offers corral."""
    from corral.host import PVM_EXPLANATION, probe_host

    rep = probe_host(kvm_path)
    from rich.console import Console  # rich only where a table is shown: it costs start-up
    from rich.table import Table

    out = Console()
    if rep.error:
        raise HostError(rep.error)
    virt = {
        "vmx": "hardware (Intel VT-x)",
        "svm": "hardware (AMD-V)",
        "pvm": "PVM (software, no hardware virtualization)",
    }.get(rep.virtualization, "unknown")
    out.print(f"[bold]KVM[/bold]: {kvm_path}, API version {rep.api_version}")
    out.print(f"[bold]virtualization[/bold]: {virt}")
    out.print(f"[bold]vCPUs[/bold]: up to {rep.max_vcpus} ({rep.recommended_vcpus} recommended)")
    from corral.devices.virtio import fastpath

    out.print(f"[bold]virtqueue data path[/bold]: {fastpath.describe()}")
    from corral.vstate.vcpu import describe_exit_loop

    out.print(f"[bold]vCPU exit loop[/bold]: {describe_exit_loop()}")
    kernel = ", ".join(f"{name} {'present' if there else 'absent'}" for name, there in rep.vhost.items())
    out.print(f"[bold]kernel vhost[/bold]: {kernel} (not used: corral serves virtio-net and vsock itself)")
    from corral.boot import firmware  # where --firmware seabios / ovmf take their files from

    for name in ("seabios", "ovmf"):
        out.print(f"[bold]firmware {name}[/bold]: {firmware.source(name)}")
    table = Table("capability", "present", "used for")
    for c in CAPABILITIES:
        value = rep.capabilities.get(c.name, 0)
        mark = (
            "[green]yes[/green]" if value else ("[red]MISSING[/red]" if c.required else "[yellow]no[/yellow]")
        )
        table.add_row(c.name, mark, c.use + (" (required)" if c.required else ""))
    out.print(table)
    if rep.is_pvm:
        out.print(f"[yellow]note[/yellow]: {PVM_EXPLANATION}")
    for name in rep.missing_required:
        out.print(f"[red]will not work[/red]: KVM_CAP_{name} is missing")
    if not rep.usable:
        sys.exit(1)


# --- corral image: every image answers for itself ----------------------------------------------------


@main.group()
def image() -> None:
    """List, fetch, build and locate guest images (corral run --image NAME)."""


def _print_paths(img: Image) -> None:
    kernel, initrd = img.resolve()  # (for a disk image: its disk)
    click.echo(kernel)
    if initrd is not None:
        click.echo(initrd)


@image.command("list")
def image_list() -> None:
    """Show the images, whether they are cached, and their size."""
    from rich.console import Console
    from rich.table import Table

    from corral.images.registry import IMAGES

    table = Table("name", "description", "cached", "size")
    for name, img in sorted(IMAGES.items()):
        st = img.status()
        if st.cached is None:
            cached, size = "built on use", ""
        elif not st.cached:
            cached, size = "[yellow]no[/yellow]", ""
        else:
            cached, size = "[green]yes[/green]", f"{st.size / (1 << 20):.1f} MiB"
        table.add_row(name, img.description, cached, size)
    Console().print(table)


@image.command("fetch", error_code=1)
@click.argument("img", metavar="NAME", type=IMAGE)
@click.option("--force", is_flag=True, help="Download and rebuild even if the image is cached.")
def image_fetch(img: Image, force: bool) -> None:
    """Download an image's packages and build it into the cache."""
    if img.fetch(force=force):
        click.echo(
            f"corral: image '{img.name}' is already cached (verified); --force fetches it again", err=True
        )
    _print_paths(img)


@image.command("build", error_code=1)
@click.argument("img", metavar="NAME", type=IMAGE)
def image_build(img: Image) -> None:
    """Rebuild an image (the debian initramfs) from the cached packages, without the network."""
    img.build()
    _print_paths(img)


@image.command("path", error_code=1)
@click.argument("img", metavar="NAME", type=IMAGE)
@click.option("--initrd", "which", flag_value="initrd", help="Print the initramfs path only.")
@click.option("--vmlinux", "which", flag_value="vmlinux", help="Print the PVH vmlinux (ELF) path only.")
def image_path(img: Image, which: str | None) -> None:
    """Print a cached image's kernel path (and initramfs path); fails if it is not fetched."""
    paths = img.paths()
    if which == "vmlinux":
        if paths.vmlinux is None:
            raise ConfigError(f"image '{img.name}' has no separate vmlinux")
        click.echo(paths.vmlinux)
    elif which == "initrd":
        if paths.initrd is None:
            raise ConfigError(f"image '{img.name}' has no initramfs")
        click.echo(paths.initrd)
    else:
        click.echo(paths.kernel)
        if paths.initrd is not None:
            click.echo(paths.initrd)


@main.command("seccomp-report")
def seccomp_report() -> None:
    """Show the size of each VMM thread's seccomp allow-list, beside Firecracker's."""
    from rich.console import Console
    from rich.table import Table

    from corral.seccomp import counts

    table = Table(title="seccomp allow-lists per thread")
    for col in ("thread", "system calls", "ioctl numbers", "Firecracker", "what it runs"):
        table.add_column(
            col, justify="right" if col in ("system calls", "ioctl numbers", "Firecracker") else "left"
        )
    for c in counts():
        fc = str(c.firecracker) if c.firecracker is not None else "-"
        table.add_row(c.kind, str(c.syscalls), str(c.ioctls), fc, c.role)
    Console().print(table)


# --- corral firecracker: Firecracker's API, drop-in ------------------------------------------------


@main.command("firecracker", error_code=1)
@click.option(
    "--api-sock",
    type=PATH,
    default="/run/firecracker.socket",
    show_default=True,
    help="Serve Firecracker's API (HTTP on a Unix socket) here.",
)
@click.option(
    "--id", "instance_id", default="anonymous-instance", show_default=True, help="The microVM's id."
)
@click.option(
    "--config-file",
    type=PATH,
    help="Firecracker's JSON config (boot-source, drives, machine-config, ...): boot it at once.",
)
@click.option("--no-api", is_flag=True, help="Serve no API (needs --config-file).")
@click.option("--log-path", type=PATH, help="Append the log to this file.")
@click.option("--level", help="Log level: Error, Warning, Info, Debug, Trace or Off.")
@click.option("--metrics-path", type=PATH, help="Write metrics (FlushMetrics) here.")
@click.option("--boot-timer", is_flag=True, help="Log the time from start to the guest's first serial byte.")
@KVM_OPTION
@SECCOMP_OPTION
def firecracker(
    api_sock: Path,
    instance_id: str,
    config_file: Path | None,
    no_api: bool,
    log_path: Path | None,
    level: str | None,
    metrics_path: Path | None,
    boot_timer: bool,
    kvm_path: str,
) -> None:
    """Serve Firecracker's REST API for one microVM, so Firecracker's clients drive corral.

    The serial console goes to stdout; exits when the guest stops (with its status).
    """
    from corral.firecracker.main import run as run_firecracker

    sys.exit(
        run_firecracker(
            api_sock=api_sock,
            instance_id=instance_id,
            config_file=config_file,
            no_api=no_api,
            log_path=log_path,
            level=level,
            metrics_path=metrics_path,
            boot_timer=boot_timer,
            kvm_path=kvm_path,
        )
    )


@main.command(error_code=1)
@VM_OPTION
@click.argument("file", type=FILE)
def dump(vm: ControlClient, file: Path) -> None:
    """Write an ELF core of a running or paused guest to FILE (new; on the VM's host): gdb opens
    it with the guest's symbols, `crash` with a Linux guest's vmlinux. The guest runs on."""
    r = vm.dump(file.resolve())
    click.echo(
        f"corral: core {r.path}: {r.vcpus} vCPUs, {r.ram_bytes >> 20} MiB of RAM, "
        f"{r.bytes_written / (1 << 20):.1f} MiB written (the rest are holes), {r.seconds * 1000:.0f} ms",
        err=True,
    )


@main.command(error_code=1)
@VM_OPTION
@click.option("--on", "switch", flag_value="on", help="Start counting exits.")
@click.option("--off", "switch", flag_value="off", help="Stop counting exits (the counts stay).")
def stats(vm: ControlClient, switch: str | None) -> None:
    """Show a VM's exit statistics per vCPU: by reason, by port and MMIO address, by device,
    with the time the VMM spent on them."""
    from rich.console import Console
    from rich.table import Table

    r = vm.stats(None if switch is None else switch == "on")
    console = Console()
    if not r.enabled and not any(v.by_reason for v in r.vcpus):
        click.echo(
            "corral: exit statistics are off: `corral stats --api SOCK --on`, or run with --stats",
            err=True,
        )
    if r.kvm_stats != "read":
        click.echo(f"corral: halts and injected interrupts: {r.kvm_stats}", err=True)
    for v in r.vcpus:
        ms = lambda ns: f"{ns / 1e6:.1f}"  # noqa: E731
        irqs = "" if v.interrupts is None else f"{v.interrupts} interrupts injected, "
        console.print(
            f"[bold]vcpu{v.vcpu}[/]: {v.exits} exits, {v.halts} halts, {irqs}"
            f"{ms(v.run_ns)} ms in KVM_RUN while counted"
        )
        for title, column, rows in (
            ("by reason", "reason", v.by_reason),
            ("by device", "device", v.by_device),
            ("of port I/O by port", "port", v.pio_by_port),
            ("of MMIO by address", "address", v.mmio_by_address),
        ):
            if not rows:
                continue
            table = Table(title=f"vcpu{v.vcpu} exits {title}", title_justify="left")
            table.add_column(column)
            table.add_column("exits", justify="right")
            table.add_column("VMM ms", justify="right")
            table.add_column("ns/exit", justify="right")
            for c in rows:
                table.add_row(c.key, f"{c.count:,}", ms(c.ns), f"{c.ns // max(c.count, 1):,}")
            console.print(table)


@main.group("trace")
def trace_group() -> None:
    """Exit traces (corral run --trace FILE)."""


@trace_group.command("show", error_code=1)
@click.argument("file", type=FILE)
@click.option(
    "--plot",
    type=FILE,
    help="Also draw exits over time to this PNG (needs matplotlib).",
)
@click.option(
    "--top", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Addresses listed."
)
def trace_show(file: Path, plot: Path | None, top: int) -> None:
    """Summarize a trace: exits by reason, by device and by address, and exits over time (a
    text sparkline; with --plot, a PNG drawn by matplotlib)."""
    from rich.console import Console
    from rich.table import Table

    from corral.debug.trace import plot_png, sparkline, summarize

    s = summarize(file)
    console = Console()
    dropped = f", {s.dropped:,} dropped" if s.dropped else ""
    console.print(
        f"{file}: {s.records:,} exits on {len(s.vcpus)} vCPU(s) over {s.span_ns / 1e9:.3f} s{dropped}"
    )
    for title, table_rows in (
        ("reason", s.by_reason),
        ("device", s.by_device),
        ("address", s.by_address),
    ):
        rows = sorted(table_rows.items(), key=lambda kv: (-kv[1][0], kv[0]))
        table = Table(title=f"exits by {title}", title_justify="left")
        table.add_column(title)
        table.add_column("exits", justify="right")
        table.add_column("VMM ms", justify="right")
        table.add_column("ns/exit", justify="right")
        for key, (count, ns) in rows[:top] if title == "address" else rows:
            table.add_row(key, f"{count:,}", f"{ns / 1e6:.1f}", f"{ns // max(count, 1):,}")
        console.print(table)
    peak = max(s.timeline, default=0)
    console.print(f"exits over time ({s.bucket_ns / 1e6:.1f} ms per column, peak {peak:,}):")
    console.print(f"|{sparkline(s.timeline)}|")
    if plot is not None:
        plot_png(s, plot)
        console.print(f"plot: {plot}")


@main.command()
def openapi() -> None:
    """Print the OpenAPI 3 document of the API that `corral run --api` and `corral firecracker`
    serve (Firecracker's endpoints and corral's own); docs/openapi.json is this output."""
    import json

    from corral.firecracker.routes import openapi as document

    click.echo(json.dumps(document(), indent=2, sort_keys=True))


# --- corral jail: a VMM in its own namespaces, root, uid and cgroups ------------------------------------

JAIL_OPTIONS = "corral.jail_options"  # ctx.meta key: the JailOptions `corral jail` hands to `run`


def _run_jailed(options: Any, inner: Any) -> NoReturn:
    from corral.jail import Jail

    jail = Jail(options, inner)
    report = jail.start()
    click.echo(f"corral: {report.line()}", err=True)
    sys.exit(jail.wait())


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--id", "jail_id", default="", help="The jail's name (letters, digits, dashes); default: random."
)
@click.option("--uid", type=int, help="The VMM's uid (default: a free one from 900000 up, per VM).")
@click.option("--gid", type=int, help="The VMM's gid (default: the uid's number).")
@click.option("--netns", type=PATH, help="Join this network namespace (/run/netns/X).")
@click.option(
    "--cgroup",
    "cgroups",
    multiple=True,
    metavar="FILE=VALUE",
    help="A cgroup limit (repeatable): pids.max=64",
)
@click.option(
    "--rlimit", "rlimits", multiple=True, metavar="NAME=N", help="A resource limit (repeatable): nofile=1024"
)
@click.option(
    "--chroot-base",
    type=PATH,
    default="/srv/jailer",
    show_default=True,
    help="Jails live in BASE/corral/ID (root, run/ with the VM's sockets).",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def jail(
    ctx: click.Context,
    jail_id: str,
    uid: int | None,
    gid: int | None,
    netns: Path | None,
    cgroups: tuple[str, ...],
    rlimits: tuple[str, ...],
    chroot_base: Path,
    command: tuple[str, ...],
) -> None:
    """Run `corral run ...` or `corral firecracker ...` in a jail: new mount, PID, IPC and UTS
    namespaces, a minimal read-only root (pivot_root) with only the interpreter, corral and the
    VM's own files and devices, its own unprivileged uid, rlimits, no_new_privs, cgroup limits.
    Needs root.

    corral jail --cgroup pids.max=64 -- run --image probe --api /tmp/vm.sock"""
    from corral.jail import JailOptions

    ctx.meta[JAIL_OPTIONS] = JailOptions.parse(
        id=jail_id, uid=uid, gid=gid, netns=netns, cgroups=cgroups, rlimits=rlimits, chroot_base=chroot_base
    )
    name, *rest = command
    if name == "firecracker":
        from corral.jail import map_firecracker

        with firecracker.make_context("firecracker", rest, parent=ctx) as sub:
            from corral.seccomp import enabled as seccomp_on

            _run_jailed(ctx.meta[JAIL_OPTIONS], map_firecracker(**sub.params, seccomp=seccomp_on()))
    if name != "run":
        raise ConfigError(
            f"corral jail runs `corral run` or `corral firecracker`, not {name!r}: "
            "corral jail [OPTIONS] -- run ARGS"
        )
    with run.make_context("run", rest, parent=ctx) as sub:
        run.invoke(sub)


# --- corral serve: the host daemon, and the commands that talk to it -------------------------------


def DAEMON_SOCK_OPTION(f: Callable[..., Any]) -> Callable[..., Any]:
    """--daemon-sock and --token-file: where the daemon is, and the token TCP needs."""
    f = click.option(
        "--token-file",
        type=PATH,
        envvar="CORRAL_DAEMON_TOKEN_FILE",
        help="The daemon's bearer token (for a tcp:HOST:PORT daemon).",
    )(f)
    return click.option(
        "--daemon-sock",
        default="/run/corral/corral.sock",
        envvar="CORRAL_DAEMON_SOCK",
        show_default=True,
        help="The daemon's socket (corral serve), or tcp:HOST:PORT.",
    )(f)


@main.command(error_code=1)
@click.option(
    "--state-dir",
    type=PATH,
    default="/run/corral",
    show_default=True,
    help="Where VMs live (STATE/vms/ID/): found again when the daemon restarts.",
)
@click.option("--api-sock", type=PATH, help="The REST socket [STATE/corral.sock].")
@click.option("--tcp", metavar="HOST:PORT", help="Serve the API on TCP too (needs --token-file).")
@click.option("--token-file", type=PATH, help="The bearer token TCP clients must send.")
@click.option(
    "--cgroup-parent",
    default="corral",
    show_default=True,
    help="VMs' cgroups go in <the daemon's cgroup>/NAME/ID.",
)
@click.option(
    "--no-cgroups", is_flag=True, help="Put VMs in no cgroup (limits are then reported not applied)."
)
@click.option(
    "--spawn",
    is_flag=True,
    help="Start each VM as a fresh interpreter instead of forking it from a warm template.",
)
@click.option(
    "--no-jail",
    is_flag=True,
    help="Run VMs unjailed (by default, as root, each VM gets its own jail: see `corral jail`).",
)
def serve(
    state_dir: Path,
    api_sock: Path | None,
    tcp: str | None,
    token_file: Path | None,
    cgroup_parent: str,
    no_cgroups: bool,
    spawn: bool,
    no_jail: bool,
) -> None:
    """The host daemon: create, list, pause, snapshot, stop and remove VMs over REST.

    Each VM runs as its own process and keeps running when the daemon stops.
    """
    from corral.daemon.server import serve as run_daemon

    sys.exit(
        run_daemon(
            state_dir,
            api_sock,
            tcp=tcp,
            token_file=token_file,
            cgroup_parent=None if no_cgroups else cgroup_parent,
            spawn=spawn,
            jail=not no_jail,
        )
    )


def _daemon(sock: str, token_file: Path | None) -> Any:
    from corral.daemon.server import read_token
    from corral.daemon.vmapi import HttpClient

    return HttpClient(sock, timeout=600, token=read_token(token_file) if token_file else None)


def _ago(t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _show_vms(vms: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "state", "pid", "vcpus", "memory", "up", "source")
    for v in vms:
        table.add_row(
            v["id"],
            v["state"],
            str(v.get("pid") or "-"),
            str(v.get("vcpus") or "-"),
            f"{v['mem_mib']} MiB" if v.get("mem_mib") else "-",
            _ago(v.get("created")),
            v.get("snapshot") or v.get("source") or "-",
        )
    Console().print(table)


def _show_vm(v: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("field", "value", show_header=False)
    for key in ("id", "state", "pid", "vcpus", "mem_mib", "source", "snapshot", "exit", "gdb", "dir"):
        if v.get(key) is not None:
            table.add_row(key, str(v[key]))
    limits = {k: val for k, val in (v.get("limits") or {}).items() if val not in (None, [])}
    table.add_row("limits", ", ".join(f"{k}={val}" for k, val in limits.items()) or "none")
    cg = v.get("cgroups") or {}
    for a in cg.get("applied", []):
        table.add_row("applied", f"{a['limit']} = {a['value']} ({a['cgroup']}: {a['file']})")
    for n in cg.get("not_applied", []):
        table.add_row("not applied", n)
    j = v.get("jail")
    if j:
        table.add_row(
            "jail", f"uid {j['uid']} gid {j['gid']}, root {j['root']}, setup {j.get('setup_ms')} ms"
        )
        table.add_row("namespaces", ", ".join(j["namespaces"]))
        for g in j.get("cgroups", []):
            table.add_row("jail cgroup", g)
    else:
        table.add_row("jail", "none (unjailed)")
    Console().print(table)


@main.group(cls=Group)
def vm() -> None:
    """VMs of the host daemon (corral serve)."""


@vm.command("create", error_code=1)
@DAEMON_SOCK_OPTION
@click.option("--id", "vm_id", help="The VM's id (1-64 of A-Z a-z 0-9 -) [a new one].")
@click.option(
    "--config", "config_file", type=click.File("rb"), help="A Firecracker config (--config-file's JSON)."
)
@click.option("--snapshot", type=PATH, help="Clone the snapshot in this directory.")
@click.option("--paused", is_flag=True, help="A clone waits paused (corral vm resume).")
@click.option("--cpu-limit", type=float, help="CPU time the VM may use, in CPUs (0.5 = half a core).")
@click.option("--memory-limit", type=SIZE, help="Memory the VM process may use (e.g. 512M).")
@click.option("--pids-limit", type=int, help="Tasks the VM process may have.")
@click.option("--gdb", metavar="tcp:[HOST:]PORT|unix:PATH", help="Serve the GDB remote protocol for it here.")
@click.option("--ksm", is_flag=True, help="Let KSM merge its guest RAM with other VMs' (a --config VM).")
@click.option("--exit-stats", is_flag=True, help="Count exits by reason from boot, for the metrics.")
def vm_create(
    daemon_sock: str,
    token_file: Path | None,
    vm_id: str | None,
    config_file: Any,
    snapshot: Path | None,
    paused: bool,
    cpu_limit: float | None,
    memory_limit: int | None,
    pids_limit: int | None,
    gdb: str | None,
    ksm: bool,
    exit_stats: bool,
) -> None:
    """Create a VM from a Firecracker config or from a snapshot; print its id."""
    import json

    if (config_file is None) == (snapshot is None):
        raise ConfigError("give --config FILE or --snapshot DIR")
    limits: dict[str, Any] = {}
    if cpu_limit is not None:
        limits["cpus"] = cpu_limit
    if memory_limit is not None:
        limits["memory_mib"] = max(1, memory_limit >> 20)
    if pids_limit is not None:
        limits["pids"] = pids_limit
    body: dict[str, Any] = {"limits": limits, "resume": not paused}
    if ksm:
        body["ksm"] = True
    if exit_stats:
        body["exit_stats"] = True
    if vm_id is not None:
        body["id"] = vm_id
    if gdb is not None:
        body["gdb"] = gdb
    if config_file is not None:
        try:
            body["config"] = json.loads(config_file.read(1 << 20))
        except ValueError as exc:
            raise ConfigError(f"--config: not JSON: {exc}") from None
    else:
        body["snapshot"] = str(Path(snapshot or ".").resolve())
    v = _daemon(daemon_sock, token_file).call("POST", "/vms", body)
    click.echo(v["id"])
    for n in v.get("cgroups", {}).get("not_applied", []):
        click.echo(f"corral: not applied: {n}", err=True)


@vm.command("ls", error_code=1)
@DAEMON_SOCK_OPTION
def vm_ls(daemon_sock: str, token_file: Path | None) -> None:
    """List the daemon's VMs."""
    _show_vms(_daemon(daemon_sock, token_file).call("GET", "/vms"))


@vm.command("show", error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_id", metavar="ID")
def vm_show(daemon_sock: str, token_file: Path | None, vm_id: str) -> None:
    """Show one VM: state, process, limits applied."""
    _show_vm(_daemon(daemon_sock, token_file).call("GET", f"/vms/{_vm_path(vm_id)}"))


def _vm_path(vm_id: str) -> str:
    from corral.daemon.statedir import check_vm_id

    return check_vm_id(vm_id)


def _vm_verb(verb: str, help_text: str) -> None:
    @vm.command(verb, error_code=1, help=help_text)
    @DAEMON_SOCK_OPTION
    @click.argument("vm_id", metavar="ID")
    def command(daemon_sock: str, token_file: Path | None, vm_id: str) -> None:
        v = _daemon(daemon_sock, token_file).call("POST", f"/vms/{_vm_path(vm_id)}/{verb}")
        click.echo(f"{v['id']}: {v['state']}")


_vm_verb("pause", "Pause a VM.")
_vm_verb("resume", "Resume a paused VM.")
_vm_verb("stop", "Stop a VM's process (it stays listed as stopped until `corral vm rm`).")


@vm.command("snapshot", error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_id", metavar="ID")
@click.argument("directory", type=PATH)
def vm_snapshot(daemon_sock: str, token_file: Path | None, vm_id: str, directory: Path) -> None:
    """Snapshot a VM into DIRECTORY (new); `corral vm create --snapshot DIRECTORY` clones it."""
    r = _daemon(daemon_sock, token_file).call(
        "POST", f"/vms/{_vm_path(vm_id)}/snapshot", {"path": str(directory.resolve())}
    )
    click.echo(r["path"])


@vm.command("rm", error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_ids", metavar="ID...", nargs=-1, required=True)
def vm_rm(daemon_sock: str, token_file: Path | None, vm_ids: tuple[str, ...]) -> None:
    """Stop VMs and remove them: state directory, cgroups, taps."""
    client = _daemon(daemon_sock, token_file)
    for vm_id in vm_ids:
        client.call("DELETE", f"/vms/{_vm_path(vm_id)}")


@vm.command("migrate", error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_id", metavar="ID")
@click.option("--to", "to", required=True, metavar="SOCKET|tcp:HOST:PORT", help="The target host's daemon.")
@click.option(
    "--to-token-file",
    type=PATH,
    help="The target daemon's bearer token (for a tcp:HOST:PORT daemon).",
)
@click.option("--id", "new_id", help="The VM's id on the target [the same].")
@click.option("--downtime-ms", type=click.IntRange(1, 60_000), default=300, show_default=True)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar=DISK.syntax,
    help="The target host's image for the guest's next disk, in its order (repeatable).",
)
@click.option(
    "--net", "nets", multiple=True, metavar=NET.syntax, help="The target host's tap for the guest's next NIC."
)
def vm_migrate(
    daemon_sock: str,
    token_file: Path | None,
    vm_id: str,
    to: str,
    to_token_file: Path | None,
    new_id: str | None,
    downtime_ms: int,
    disks: tuple[str, ...],
    nets: tuple[str, ...],
) -> None:
    """Live-migrate a VM to another host's daemon; it runs there and is removed here. On a
    failure it runs on here."""
    import json

    from corral.daemon.server import read_token

    host = _grant(None, None, None, disks, nets, None, "")
    body: dict[str, Any] = {"to": to, "downtime_ms": downtime_ms, "host": json.loads(host.model_dump_json())}
    if to_token_file is not None:
        body["token"] = read_token(to_token_file)
    if new_id is not None:
        body["id"] = _vm_path(new_id)
    r = _daemon(daemon_sock, token_file).call("POST", f"/vms/{_vm_path(vm_id)}/migrate", body)
    st = r["stats"]
    click.echo(
        f"{vm_id} -> {r['to']} as {r['id']}: {r['target']['state']}; {st['rounds']} rounds, "
        f"{st['bytes_sent'] / (1 << 20):.1f} MiB, downtime {st['downtime_seconds'] * 1000:.0f} ms"
    )


@vm.command("clone", error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_id", metavar="ID")
@click.option("--id", "new_id", help="The clone's id [a new one].")
@click.option("--paused", is_flag=True, help="The clone waits paused (corral vm resume).")
def vm_clone(daemon_sock: str, token_file: Path | None, vm_id: str, new_id: str | None, paused: bool) -> None:
    """Clone a running VM into a new one (a snapshot, kept with the clone); print its id."""
    body: dict[str, Any] = {"resume": not paused}
    if new_id is not None:
        body["id"] = _vm_path(new_id)
    click.echo(_daemon(daemon_sock, token_file).call("POST", f"/vms/{_vm_path(vm_id)}/clone", body)["id"])


@vm.command("gdb", error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_id", metavar="ID")
@click.argument("address", metavar="tcp:[HOST:]PORT|unix:PATH")
def vm_gdb(daemon_sock: str, token_file: Path | None, vm_id: str, address: str) -> None:
    """Start a VM's gdb stub (gdb: target remote HOST:PORT); print where it listens."""
    click.echo(
        _daemon(daemon_sock, token_file).call("POST", f"/vms/{_vm_path(vm_id)}/gdb", {"address": address})[
            "gdb"
        ]
    )


@main.command(error_code=1)
@DAEMON_SOCK_OPTION
@click.argument("vm_id", metavar="ID")
@click.option("--no-follow", is_flag=True, help="Print what the console holds and end.")
def console(daemon_sock: str, token_file: Path | None, vm_id: str, no_follow: bool) -> None:
    """Show a daemon VM's serial console as it writes (Ctrl-C ends)."""
    out = sys.stdout.buffer
    path = f"/vms/{_vm_path(vm_id)}/console" + ("?follow=0" if no_follow else "")
    try:
        for chunk in _daemon(daemon_sock, token_file).stream(path):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
