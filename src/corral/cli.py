"""The corral command line: a thin layer over the library."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from corral.config import DiskConfig, MachineConfig, NetConfig, VsockConfig, parse_size
from corral.errors import CorralError


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"corral: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log VMM activity to stderr.")
def main(verbose: bool) -> None:
    """corral: a hypervisor on Linux KVM."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="corral: %(levelname)s: %(message)s")


@main.command()
@click.option("--kernel", type=click.Path(path_type=Path), help="bzImage, PVH vmlinux or Multiboot ELF.")
@click.option("--image", "image_name", help="A named image (corral image list): probe, ...")
@click.option("--initrd", type=click.Path(path_type=Path), help="Initial ramdisk.")
@click.option("--cmdline", help="Kernel command line (the image's default if omitted).")
@click.option("--cpus", type=int, default=1, show_default=True, help="Number of vCPUs.")
@click.option("--memory", default="512M", show_default=True, help="Guest RAM, e.g. 512M or 2G.")
@click.option("--no-reboot", is_flag=True, help="Stop instead of rebooting when the guest resets.")
@click.option("--cpu-hide", default="", metavar="LIST",
              help="CPU features to hide from the guest, comma-separated (e.g. xsave,pku).")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,ro][,serial=ID][,overlay=FILE]",
              help="A raw disk image as a virtio-blk device (repeatable); with overlay=FILE the "
                   "guest's writes go to FILE (copy-on-write) and the image is shared read-only.")
@click.option("--rng", is_flag=True, help="Give the guest a virtio-rng device.")
@click.option("--net", "nets", multiple=True, metavar="tap[=NAME][,mac=MAC][,host-ip=ADDR/LEN]",
              help="A virtio-net NIC on a tap device, created and brought up if missing (repeatable).")
@click.option("--virtio-console", "virtio_console", default="", metavar="pty|file=PATH",
              help="A virtio-console (hvc0) on a new pseudo-terminal or appended to a file.")
@click.option("--balloon", is_flag=True,
              help="A virtio-balloon device (corral balloon), with free page reporting.")
@click.option("--vsock", metavar="cid=N,uds=PATH",
              help="A virtio-vsock device; host programs connect to PATH ('CONNECT <port>').")
@click.option("--kvm", "kvm_path", default="/dev/kvm", envvar="CORRAL_KVM", show_default=True,
              help="The KVM device to use.")
@click.option("--api", "api_path", type=click.Path(path_type=Path), metavar="SOCKET",
              help="Serve a control socket (pause, resume, snapshot, migrate) at this path.")
def run(kernel: Path | None, image_name: str | None, initrd: Path | None, cmdline: str | None,
        cpus: int, memory: str, no_reboot: bool, cpu_hide: str, disks: tuple[str, ...], rng: bool,
        nets: tuple[str, ...], virtio_console: str, balloon: bool, vsock: str | None, kvm_path: str,
        api_path: Path | None) -> None:
    """Boot a guest with its serial console on this terminal (Ctrl-A X quits).

    Exits with the guest's exit-port status, or 0 on a clean poweroff.
    """
    from corral.host import PVM_EXPLANATION, probe_host
    from corral.images.registry import get_image
    from corral.machine import Machine

    host = None

    def is_pvm_host() -> bool:
        nonlocal host
        if host is None:
            host = probe_host(kvm_path)
        return host.is_pvm

    try:
        if kernel and image_name:
            raise CorralError("give either --kernel or --image, not both")
        if kernel is None and image_name is None:
            if is_pvm_host():
                click.echo(f"corral: {PVM_EXPLANATION}.\ncorral: booting the probe guest instead.",
                           err=True)
                image_name = "probe"
            else:
                image_name = "debian"
        if kernel is None:
            img = get_image(image_name)  # type: ignore[arg-type]
            if img.needs_hardware_virt and is_pvm_host():
                raise CorralError(f"image '{img.name}' needs hardware virtualization: {PVM_EXPLANATION}")
            kernel, img_initrd = img.resolve()
            initrd = initrd or img_initrd
            if cmdline is None:
                cmdline = img.default_cmdline
        config = MachineConfig.build(kernel=kernel, initrd=initrd, cmdline=cmdline or "",
                                     cpus=cpus, memory=parse_size(memory), no_reboot=no_reboot,
                                     cpu_hide=cpu_hide, disks=[DiskConfig.parse(d) for d in disks],
                                     rng=rng, nets=[NetConfig.parse(n, i) for i, n in enumerate(nets)],
                                     vsock=VsockConfig.parse(vsock) if vsock else None, balloon=balloon,
                                     virtio_console=virtio_console)
        machine = Machine(config, kvm_path=kvm_path)
        machine.build()
    except CorralError as exc:
        _fail(str(exc))
        return
    _run_foreground(machine, api_path)


def _run_foreground(machine, api_path: Path | None) -> None:
    """Run a built machine with its console on this terminal (and its control socket, if
    asked) until it stops; exit with its status."""
    from corral.console import TerminalConsole

    server = None
    if api_path is not None:
        from corral.api import ControlServer

        try:
            server = ControlServer(machine, api_path)
        except CorralError as exc:
            machine.close()
            _fail(str(exc))
            return
    try:
        with TerminalConsole(machine.send_input, lambda: machine.stop("quit from the console")):
            try:
                result = machine.run()
            except CorralError as exc:
                _fail(str(exc))
                return
            except KeyboardInterrupt:
                # machine.run() has already torn the VM down on the way out
                click.echo("\ncorral: interrupted; the guest was stopped", err=True)
                sys.exit(130)
    finally:
        if server is not None:
            server.close()
    if result.kind in ("crash", "error", "stopped"):
        click.echo(f"\ncorral: {result.message}", err=True)
    sys.exit(result.status & 0xFF)


# --- VM state: restore, clone, receive; and the control-socket commands ---------------------------

_KVM_OPTION = click.option("--kvm", "kvm_path", default="/dev/kvm", envvar="CORRAL_KVM",
                           show_default=True, help="The KVM device to use.")
_API_OPTION = click.option("--api", "api_path", type=click.Path(path_type=Path), metavar="SOCKET",
                           help="Serve a control socket at this path.")


@main.command()
@click.argument("snapshot", type=click.Path(path_type=Path))
@_KVM_OPTION
@_API_OPTION
def restore(snapshot: Path, kvm_path: str, api_path: Path | None) -> None:
    """Resume the guest saved in SNAPSHOT (a directory from `corral snapshot`)."""
    from corral.machine import Machine

    try:
        machine = Machine.from_snapshot(snapshot, kvm_path=kvm_path)
        machine.build()
    except CorralError as exc:
        _fail(str(exc))
        return
    _run_foreground(machine, api_path)


@main.command()
@click.argument("snapshot", type=click.Path(path_type=Path))
@click.option("-n", "--count", type=click.IntRange(1, 256), default=2, show_default=True,
              help="How many clones to start.")
@_KVM_OPTION
def clone(snapshot: Path, count: int, kvm_path: str) -> None:
    """Start COUNT guests from one snapshot, sharing its unchanged memory; their consoles are
    shown line by line, prefixed with the clone's number. Ctrl-C stops them all."""
    import threading

    from corral.machine import Machine

    out_lock = threading.Lock()

    def console(i: int):
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

    machines = []
    try:
        for i in range(count):
            m = Machine.from_snapshot(snapshot, kvm_path=kvm_path, console=console(i), clone_index=i)
            machines.append(m)
            m.start()
    except CorralError as exc:
        for m in machines:
            m.stop()
            m.close()
        _fail(str(exc))
        return
    click.echo(f"corral: {count} clones of {snapshot} running", err=True)
    worst = 0
    try:
        for i, m in enumerate(machines):
            r = m.wait()
            m.close()
            assert r is not None
            click.echo(f"corral: clone {i}: {r.message}", err=True)
            worst = max(worst, r.status & 0xFF)
    except KeyboardInterrupt:
        for m in machines:
            m.stop()
            m.close()
        sys.exit(130)
    sys.exit(worst)


@main.command()
@click.option("--listen", "address", required=True, metavar="HOST:PORT",
              help="Where to wait for the migration (e.g. 0.0.0.0:7000).")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@_KVM_OPTION
@_API_OPTION
def receive(address: str, timeout: float | None, kvm_path: str, api_path: Path | None) -> None:
    """Wait for one live migration (`corral migrate`) and run the guest that arrives."""
    from corral.migration import listen
    from corral.migration import receive as receive_vm

    try:
        server = listen(address)
        host, port = server.getsockname()[:2]
        click.echo(f"corral: waiting for a migration on {host}:{port}", err=True)
        machine = receive_vm(server, kvm_path=kvm_path, accept_timeout=timeout)
        server.close()
    except CorralError as exc:
        _fail(str(exc), 1)
        return
    click.echo("corral: migration arrived; the guest runs here", err=True)
    _run_foreground(machine, api_path)


def _client(api_path: Path):
    from corral.api import ControlClient

    return ControlClient(api_path)


def _verb(fn, *args, **kwargs):
    """Run one control-socket verb; a refusal ends the command with one line."""
    from corral.api import NoControlSocket

    try:
        return fn(*args, **kwargs)
    except NoControlSocket as exc:
        _fail(f"{exc}: start the VM with --api {exc.path}", 1)
    except CorralError as exc:
        _fail(str(exc), 1)


_API_ARG = click.option("--api", "api_path", type=click.Path(path_type=Path), required=True,
                        metavar="SOCKET", help="The VM's control socket (corral run --api).")


@main.command()
@_API_ARG
def pause(api_path: Path) -> None:
    """Pause a running VM (its vCPUs, devices and clock)."""
    _verb(_client(api_path).pause)


@main.command()
@_API_ARG
def resume(api_path: Path) -> None:
    """Resume a paused VM."""
    _verb(_client(api_path).resume)


@main.command()
@_API_ARG
def stop(api_path: Path) -> None:
    """Stop a VM (as if its power were cut)."""
    _verb(_client(api_path).stop)


@main.command()
@_API_ARG
def status(api_path: Path) -> None:
    """Say whether a VM is running or paused."""
    r = _verb(_client(api_path).status)
    click.echo(f"{r.state} ({r.cpus} vCPUs, {r.memory >> 20} MiB)")


@main.command()
@_API_ARG
@click.argument("directory", type=click.Path(path_type=Path))
def snapshot(api_path: Path, directory: Path) -> None:
    """Save a running VM to DIRECTORY (new); it keeps running (a paused one stays paused)."""
    r = _verb(_client(api_path).snapshot, directory.resolve())
    click.echo(f"corral: snapshot {r.path}: {r.memory_bytes_written / (1 << 20):.1f} MiB of memory, "
               f"{r.disk_bytes / (1 << 20):.1f} MiB on disk, {r.seconds * 1000:.0f} ms", err=True)


@main.command()
@_API_ARG
@click.argument("size", required=False)
def balloon(api_path: Path, size: str | None) -> None:
    """Set the balloon to SIZE (e.g. 256M: memory the guest gives back; 0 returns it all), then
    show the balloon and the guest's memory statistics."""
    target = None
    if size is not None:
        try:
            target = parse_size(size)
        except CorralError as exc:
            _fail(str(exc))
    r = _verb(_client(api_path).balloon, target)
    mib = 1 << 20
    click.echo(f"balloon: target {r.target_bytes / mib:.0f} MiB, guest gave {r.actual_bytes / mib:.0f} MiB; "
               f"host memory behind guest RAM {r.host_resident_bytes / mib:.0f} MiB; "
               f"free pages reported {r.reported_bytes / mib:.0f} MiB")
    for k, v in sorted(r.stats.items()):
        click.echo(f"  {k}: {v / mib:.1f} MiB" if k.endswith("memory") or k == "disk_caches" else f"  {k}: {v}")


@main.command()
@_API_ARG
@click.argument("target", metavar="HOST:PORT")
@click.option("--downtime-ms", type=click.IntRange(1, 60_000), default=300, show_default=True,
              help="The longest the guest may be stopped for the last copy.")
def migrate(api_path: Path, target: str, downtime_ms: int) -> None:
    """Live-migrate a running VM to `corral receive` at HOST:PORT."""
    def progress(p) -> None:
        click.echo(f"corral: round {p.round}: {p.sent / (1 << 20):.1f} MiB sent, "
                   f"{p.dirty / (1 << 20):.1f} MiB dirtied meanwhile", err=True)

    r = _verb(_client(api_path).migrate, target, downtime_ms, progress)
    click.echo(f"corral: migrated to {target} in {r.total_seconds:.2f} s: {r.rounds} rounds, "
               f"{r.bytes_sent / (1 << 20):.1f} MiB sent, downtime {r.downtime_seconds * 1000:.1f} ms", err=True)


@main.command()
@click.option("--kvm", "kvm_path", default="/dev/kvm", envvar="CORRAL_KVM", show_default=True)
def doctor(kvm_path: str) -> None:
    """Report what this host offers corral."""
    from rich.console import Console
    from rich.table import Table

    from corral.host import PVM_EXPLANATION, probe_host
    from corral.vstate.vm import CAPABILITIES

    rep = probe_host(kvm_path)
    out = Console()
    if rep.error:
        _fail(rep.error)
    virt = {"vmx": "hardware (Intel VT-x)", "svm": "hardware (AMD-V)",
            "pvm": "PVM (software, no hardware virtualization)"}.get(rep.virtualization, "unknown")
    out.print(f"[bold]KVM[/bold]: {kvm_path}, API version {rep.api_version}")
    out.print(f"[bold]virtualization[/bold]: {virt}")
    out.print(f"[bold]vCPUs[/bold]: up to {rep.max_vcpus} ({rep.recommended_vcpus} recommended)")
    table = Table("capability", "present", "used for")
    for c in CAPABILITIES:
        value = rep.capabilities.get(c.name, 0)
        mark = "[green]yes[/green]" if value else ("[red]MISSING[/red]" if c.required else "[yellow]no[/yellow]")
        table.add_row(c.name, mark, c.use + (" (required)" if c.required else ""))
    out.print(table)
    if rep.is_pvm:
        out.print(f"[yellow]note[/yellow]: {PVM_EXPLANATION}")
    for name in rep.missing_required:
        out.print(f"[red]will not work[/red]: KVM_CAP_{name} is missing")
    if not rep.usable:
        sys.exit(1)


# --- corral image ----------------------------------------------------------------------------------

def _image_or_fail(name: str):
    from corral.images.registry import get_image

    try:
        return get_image(name)
    except CorralError as exc:
        _fail(str(exc))


@main.group()
def image() -> None:
    """List, fetch, build and locate guest images (corral run --image NAME)."""


@image.command("list")
def image_list() -> None:
    """Show the images, whether they are cached, and their size."""
    from rich.console import Console
    from rich.table import Table

    from corral.images import cache
    from corral.images.registry import CACHED_ENTRY, IMAGES

    table = Table("name", "description", "cached", "size")
    for name, img in sorted(IMAGES.items()):
        entry = CACHED_ENTRY.get(name)
        if entry is None:
            cached, size = "built on use", ""
        elif cache.read_manifest(cache.image_dir(entry)) is None:
            cached, size = "[yellow]no[/yellow]", ""
        else:
            cached = "[green]yes[/green]"
            size = f"{cache.entry_size(cache.image_dir(entry)) / (1 << 20):.1f} MiB"
        table.add_row(name, img.description, cached, size)
    Console().print(table)


def _prepare_and_print(img, debian_step) -> None:
    """Run `debian_step(debian_image)` if `img` is the cached debian image, then print the
    image's kernel path (and initramfs path); a CorralError on the way fails the command."""
    from corral.images.registry import CACHED_ENTRY

    try:
        if CACHED_ENTRY.get(img.name) == "debian":
            from corral.images import debian_image

            debian_step(debian_image)
        kernel, initrd = img.resolve()
    except CorralError as exc:
        _fail(str(exc), 1)
        return
    click.echo(kernel)
    if initrd is not None:
        click.echo(initrd)


@image.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download and rebuild even if the image is cached.")
def image_fetch(name: str, force: bool) -> None:
    """Download an image's packages and build it into the cache."""
    img = _image_or_fail(name)

    def fetch(debian_image) -> None:
        was_cached = debian_image.is_cached()
        debian_image.fetch(force=force)
        if was_cached and not force:
            click.echo(f"corral: image '{img.name}' is already cached (verified); "
                       "--force fetches it again", err=True)

    _prepare_and_print(img, fetch)


@image.command("build")
@click.argument("name")
def image_build(name: str) -> None:
    """Rebuild an image (the debian initramfs) from the cached packages, without the network."""
    _prepare_and_print(_image_or_fail(name), lambda debian_image: debian_image.build())


@image.command("path")
@click.argument("name")
@click.option("--initrd", "which", flag_value="initrd", help="Print the initramfs path only.")
@click.option("--vmlinux", "which", flag_value="vmlinux", help="Print the PVH vmlinux (ELF) path only.")
def image_path(name: str, which: str | None) -> None:
    """Print a cached image's kernel path (and initramfs path); fails if it is not fetched."""
    from corral.images import cache
    from corral.images.registry import CACHED_ENTRY

    img = _image_or_fail(name)
    entry = CACHED_ENTRY.get(img.name)
    try:
        if entry is None:
            if which == "vmlinux":
                raise CorralError(f"image '{img.name}' has no separate vmlinux")
            kernel, initrd = img.resolve()
        else:
            d = cache.image_dir(entry)
            if cache.read_manifest(d) is None:
                raise CorralError(f"image '{img.name}' is not fetched: run `corral image fetch {img.name}`")
            cache.verify(d, img.name)
            kernel, initrd = img.resolve()
            if which == "vmlinux":
                kernel = d / "vmlinux"
    except CorralError as exc:
        _fail(str(exc), 1)
        return
    if which == "initrd":
        if initrd is None:
            _fail(f"image '{img.name}' has no initramfs", 1)
        click.echo(initrd)
        return
    click.echo(kernel)
    if which is None and initrd is not None:
        click.echo(initrd)


if __name__ == "__main__":
    main()
