# corral's compiled vCPU loop (_exitloop.c): see Vcpu._loop in vcpu.py.
from collections.abc import Callable

def run(
    fd: int,
    run_page: memoryview,
    pio_read: Callable[[int, int], int],
    pio_write: Callable[[int, int, int], None],
    mmio_read: Callable[[int, int], int],
    mmio_write: Callable[[int, int, int], None],
    budget: int,
    kvm_run: int,
    exit_io: int,
    exit_mmio: int,
    stamps: object | None,
    /,
) -> tuple[int, int, int]: ...
