"""The reset control register at 0xCF9 (corral.devices.legacy.reset)."""

from support.fakes import FakeVmControl

from corral.devices.legacy.reset import ResetRegister, ResetRegisterState


def test_reset_register():
    ctl = FakeVmControl()
    dev = ResetRegister(ctl)
    dev.pio_write(0, 1, 0x02)  # Linux reboot=pci: 0x02 then 0x06
    assert ctl.calls == []
    assert dev.pio_read(0, 1) == 0x02
    dev.pio_write(0, 1, 0x06)
    assert ctl.calls == [("reset",)]
    assert dev.pio_read(0, 1) == 0x02  # bit 2 does not stick
    dev.pio_write(0, 1, 0x0E)
    assert ctl.calls == [("reset",)] * 2
    assert dev.pio_read(0, 2) == 0xFF0A
    other = ResetRegister(FakeVmControl())
    other.load_state(ResetRegisterState.model_validate_json(dev.save_state().model_dump_json()))
    assert other.pio_read(0, 1) == 0x0A
