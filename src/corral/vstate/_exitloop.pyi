# corral's compiled vCPU loop (_exitloop.c): see Vcpu._loop in vcpu.py.
from collections.abc import Callable

from corral.devices.bus import MmioBus

def run(
    fd: int,
    run_page: memoryview,
    pio_ports: dict[int, tuple[int, Callable[[int, int], int], Callable[[int, int, int], None]]],
    mmio_bus: MmioBus,
    budget: int,
    kvm_run: int,
    exit_io: int,
    exit_mmio: int,
    stamps: object | None,
    /,
) -> tuple[int, int, int]: ...
