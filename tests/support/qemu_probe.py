"""Boot the probe guest under QEMU and collect what it reports (shared by tests and benchmarks).

    run = run_qemu_probe("smp", cpus=2)            # TCG, -M pc, multiboot boot
    run.status, run.results["cpus"], run.output

QEMU with `-device isa-debug-exit,iobase=0x501,iosize=2` exits with (status << 1) | 1 when the
guest writes `status` to port 0x501; `status` below undoes that (None if QEMU exited otherwise).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral.images.probe import build_probe
from support.results import parse_output

QEMU = "qemu-system-x86_64"
MB_MAGIC = (0x1BADB002).to_bytes(4, "little")


@dataclass
class QemuProbeRun:
    cmd: list[str]
    returncode: int
    output: str
    wall_s: float
    results: dict[str, str] = field(default_factory=dict)
    progress: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        """The guest's exit status, or None when QEMU did not exit through isa-debug-exit."""
        if self.returncode > 0 and self.returncode & 1:
            return self.returncode >> 1
        return None


def pvh_only_copy(kernel: Path, dest: Path) -> Path:
    """A copy of the probe without its Multiboot magic, so QEMU boots it through PVH.

    QEMU tries Multiboot before PVH for an ELF given to -kernel (on -M pc and -M microvm
    alike); with the magic zeroed it finds no Multiboot header and uses the PVH note."""
    data = bytearray(kernel.read_bytes())
    off = data.find(MB_MAGIC, 0, 8192)
    if off < 0:
        raise ValueError(f"{kernel}: no Multiboot header in the first 8 KiB")
    data[off : off + 4] = b"\0\0\0\0"
    dest.write_bytes(bytes(data))
    return dest


def qemu_probe_cmd(
    scenario: str,
    cpus: int = 1,
    accel: str = "tcg",
    extra: list[str] | None = None,
    kernel: Path | None = None,
    machine: str = "pc",
    memory: str = "512",
) -> list[str]:
    kernel = kernel or build_probe()
    return [
        QEMU,
        "-M",
        machine,
        "-accel",
        accel,
        "-m",
        str(memory),
        "-smp",
        str(cpus),
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0x501,iosize=2",
        "-kernel",
        str(kernel),
        "-append",
        scenario,
        *(extra or []),
    ]


def run_qemu_probe(
    scenario: str,
    cpus: int = 1,
    accel: str = "tcg",
    extra: list[str] | None = None,
    *,
    kernel: Path | None = None,
    machine: str = "pc",
    memory: str = "512",
    timeout: float = 60.0,
) -> QemuProbeRun:
    cmd = qemu_probe_cmd(scenario, cpus, accel, extra, kernel, machine, memory)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        raise AssertionError(f"QEMU did not finish '{scenario}' in {timeout}s; output:\n{out}") from None
    wall = time.monotonic() - start
    text = proc.stdout.decode(errors="replace").replace("\r", "")
    err = proc.stderr.decode(errors="replace")
    results, progress = parse_output(text)
    return QemuProbeRun(
        cmd, proc.returncode, text + (("\n[stderr]\n" + err) if err.strip() else ""), wall, results, progress
    )
