"""Boot the probe guest under corral through the library API and collect its RESULT lines.

run = run_probe("smp", cpus=2)
run.result.status, run.results["cpus"], run.output
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from corral.config import MachineConfig
from corral.images.probe import build_probe
from corral.machine import ExitResult, Machine
from support.results import parse_output


@dataclass
class ProbeRun:
    result: ExitResult
    output: str
    results: dict[str, str] = field(default_factory=dict)
    progress: list[dict[str, str]] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        """The guest's exit status, or None when the machine ended otherwise (see `result`)."""
        return self.result.status if self.result.kind == "exit" else None


def run_probe(
    cmdline: str, cpus: int = 1, memory: str = "256M", timeout: float = 60.0, **devices: object
) -> ProbeRun:
    out = bytearray()
    lock = threading.Lock()

    def console(data: bytes) -> None:
        with lock:
            out.extend(data)

    m = Machine(
        MachineConfig.build(
            kernel=build_probe(), cmdline=cmdline, cpus=cpus, memory=memory, no_reboot=True, **devices
        ),
        console=console,
    )
    try:
        m.start()
        res = m.wait(timeout)
        if res is None:
            m.stop("test timeout")
            raise AssertionError(
                f"probe '{cmdline}' did not finish in {timeout}s; output:\n" + out.decode(errors="replace")
            )
    finally:
        m.close()
    text = out.decode(errors="replace").replace("\r", "")
    return ProbeRun(res, text, *parse_output(text))
