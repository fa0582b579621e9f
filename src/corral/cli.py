"""The corral command line: a thin layer over the library."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from corral.config import MachineConfig, parse_size
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
def run(kernel: Path | None, image_name: str | None, initrd: Path | None, cmdline: str | None,
        cpus: int, memory: str, no_reboot: bool) -> None:
    """Boot a guest with its serial console on this terminal (Ctrl-A X quits).

    Exits with the guest's exit-port status, or 0 on a clean poweroff.
    """
    from corral.console import TerminalConsole
    from corral.host import PVM_EXPLANATION, probe_host
    from corral.images.registry import get_image
    from corral.machine import Machine

    try:
        if kernel and image_name:
            raise CorralError("give either --kernel or --image, not both")
        if kernel is None and image_name is None:
            if probe_host().is_pvm:
                click.echo(f"corral: {PVM_EXPLANATION}.\ncorral: booting the probe guest instead.",
                           err=True)
                image_name = "probe"
            else:
                image_name = "debian"
        if kernel is None:
            img = get_image(image_name)  # type: ignore[arg-type]
            if img.needs_hardware_virt and probe_host().is_pvm:
                raise CorralError(f"image '{img.name}' needs hardware virtualization: {PVM_EXPLANATION}")
            kernel, img_initrd = img.resolve()
            initrd = initrd or img_initrd
            if cmdline is None:
                cmdline = img.default_cmdline
        config = MachineConfig.build(kernel=kernel, initrd=initrd, cmdline=cmdline or "",
                                     cpus=cpus, memory=parse_size(memory), no_reboot=no_reboot)
        machine = Machine(config)
        machine.build()
    except CorralError as exc:
        _fail(str(exc))
        return
    with TerminalConsole(machine.send_input, lambda: machine.stop("quit from the console")):
        try:
            result = machine.run()
        except CorralError as exc:
            _fail(str(exc))
            return
    if result.kind in ("crash", "error"):
        click.echo(f"\ncorral: {result.message}", err=True)
    elif result.kind == "stopped":
        click.echo(f"\ncorral: {result.message}", err=True)
    sys.exit(result.status & 0xFF)


@main.command()
@click.option("--kvm", "kvm_path", default="/dev/kvm", show_default=True)
def doctor(kvm_path: str) -> None:
    """Report what this host offers corral."""
    from rich.console import Console
    from rich.table import Table

    from corral.host import CAPABILITIES, PVM_EXPLANATION, probe_host

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
    for _, name, use, required in CAPABILITIES:
        value = rep.capabilities.get(name, 0)
        mark = "[green]yes[/green]" if value else ("[red]MISSING[/red]" if required else "[yellow]no[/yellow]")
        table.add_row(name, mark, use + (" (required)" if required else ""))
    out.print(table)
    if rep.is_pvm:
        out.print(f"[yellow]note[/yellow]: {PVM_EXPLANATION}")
    for name in rep.missing_required:
        out.print(f"[red]will not work[/red]: KVM_CAP_{name} is missing")
    if not rep.usable:
        sys.exit(1)


if __name__ == "__main__":
    main()
