# corral's compiled vCPU loop (_exitloop.c): see Vcpu._loop in vcpu.py.

from corral.devices.bus import MmioBus, PortEntry

def run(
    fd: int,
    run_page: memoryview,
    pio_ports: dict[int, PortEntry],
    mmio_bus: MmioBus,
    budget: int,
    kvm_run: int,
    exit_io: int,
    exit_mmio: int,
    stamps: object | None,
    /,
) -> tuple[int, int, int]: ...
