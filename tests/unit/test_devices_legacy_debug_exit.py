"""The debug-exit port (corral.devices.legacy.debug_exit): a write ends the VM with its low byte."""

import pytest
from support.fakes import FakeVmControl

from corral.devices.legacy.debug_exit import DebugExit, DebugExitState


@pytest.mark.parametrize(
    "off,size,value,status",
    [(0, 1, 0, 0), (0, 1, 0x2A, 0x2A), (0, 2, 0x1234, 0x34), (1, 1, 7, 7), (0, 4, 0x1FF, 0xFF)],
)
def test_debug_exit_status_is_the_low_byte(off, size, value, status):
    ctl = FakeVmControl()
    DebugExit(ctl).pio_write(off, size, value)
    assert ctl.calls == [("exit", status)]


def test_debug_exit_reads_all_ones():
    dev = DebugExit(FakeVmControl())
    assert dev.pio_read(0, 1) == 0xFF
    assert dev.pio_read(0, 2) == 0xFFFF
    dev.load_state(DebugExitState.model_validate_json(dev.save_state().model_dump_json()))
