import pytest
from support.fakes import FakeIrqLine, FakeVmControl

from corral.devices.legacy.i8042 import I8042, I8042State

DATA, CMD = 0, 4


@pytest.fixture
def kbc():
    ctl, line = FakeVmControl(), FakeIrqLine(level_only=True)
    dev = I8042(ctl, line)
    dev.ctl, dev.line = ctl, line
    return dev


def cmd(dev, c, *params):
    dev.pio_write(CMD, 1, c)
    for p in params:
        dev.pio_write(DATA, 1, p)


def status(dev):
    return dev.pio_read(CMD, 1)


def drain(dev):
    out = []
    while status(dev) & 0x01:
        out.append(dev.pio_read(DATA, 1))
        assert len(out) < 64
    return out


def test_idle_status(kbc):
    s = status(kbc)
    assert s & 0x01 == 0  # no data
    assert s & 0x02 == 0  # input buffer never full (Linux's kb_wait)
    assert s & 0x10  # not inhibited
    assert s & 0x20 == 0  # no AUX data


def test_pulse_reset_line_requests_reset(kbc):
    cmd(kbc, 0xFE)
    assert kbc.ctl.calls == [("reset",)]


def test_other_pulse_commands(kbc):
    cmd(kbc, 0xFF)  # pulses nothing
    assert kbc.ctl.calls == []
    cmd(kbc, 0xF0)  # pulses all lines, reset included
    assert kbc.ctl.calls == [("reset",)]


def test_output_port_write_with_reset_low(kbc):
    cmd(kbc, 0xD1, 0xDF)  # A20 on, reset line high: no reset
    assert kbc.ctl.calls == []
    cmd(kbc, 0xD0)
    assert drain(kbc) == [0xDF]
    cmd(kbc, 0xD1, 0xDE)
    assert kbc.ctl.calls == [("reset",)]


def test_self_test_and_interface_test(kbc):
    cmd(kbc, 0xAA)
    assert status(kbc) & 0x08  # last write was a command
    assert drain(kbc) == [0x55]
    cmd(kbc, 0xAB)
    assert drain(kbc) == [0x00]
    assert status(kbc) & 0x04  # system flag


def test_command_byte_read_write(kbc):
    cmd(kbc, 0x20)
    assert drain(kbc) == [0x65]
    cmd(kbc, 0x60, 0x30)
    assert status(kbc) & 0x08 == 0
    cmd(kbc, 0x20)
    assert drain(kbc) == [0x30]
    cmd(kbc, 0xA8)
    cmd(kbc, 0xAE)
    cmd(kbc, 0x20)
    assert drain(kbc) == [0x00]
    cmd(kbc, 0xA7)
    cmd(kbc, 0xAD)
    cmd(kbc, 0x20)
    assert drain(kbc) == [0x30]


def test_no_aux_port_as_linux_probes_it(kbc):
    # i8042_check_aux: AUX loop must not answer with AUXDATA ...
    cmd(kbc, 0xD3, 0x5A)
    s = status(kbc)
    assert s & 0x01 and not s & 0x20
    # ... and the AUX test reports a stuck clock line, replacing the unread echo
    cmd(kbc, 0xA9)
    assert drain(kbc) == [0x01]
    cmd(kbc, 0xD4, 0xF4)  # bytes to the absent mouse vanish
    assert drain(kbc) == []


def test_keyboard_identify_and_reset(kbc):
    kbc.pio_write(DATA, 1, 0xF2)
    assert drain(kbc) == [0xFA, 0xAB, 0x41]  # translated (command byte bit 6)
    cmd(kbc, 0x60, 0x01)
    kbc.pio_write(DATA, 1, 0xF2)
    assert drain(kbc) == [0xFA, 0xAB, 0x83]
    kbc.pio_write(DATA, 1, 0xFF)
    assert drain(kbc) == [0xFA, 0xAA]
    kbc.pio_write(DATA, 1, 0xED)  # set LEDs takes a parameter
    kbc.pio_write(DATA, 1, 0x07)
    assert drain(kbc) == [0xFA, 0xFA]
    kbc.pio_write(DATA, 1, 0xF0)
    kbc.pio_write(DATA, 1, 0x00)
    assert drain(kbc) == [0xFA, 0xFA, 0x02]
    kbc.pio_write(DATA, 1, 0xEE)
    assert drain(kbc) == [0xEE]


def test_irq1_follows_output_buffer_and_kbdint(kbc):
    kbc.pio_write(DATA, 1, 0xF4)
    assert kbc.line.high
    assert kbc.pio_read(DATA, 1) == 0xFA
    assert not kbc.line.high
    cmd(kbc, 0x60, 0x64)  # keyboard interrupt off
    kbc.pio_write(DATA, 1, 0xF4)
    assert not kbc.line.high
    assert status(kbc) & 0x01


def test_no_irq_line_is_fine():
    dev = I8042(FakeVmControl())
    dev.pio_write(DATA, 1, 0xFF)
    assert dev.pio_read(DATA, 1) == 0xFA


def test_empty_data_read_repeats_last_byte(kbc):
    cmd(kbc, 0xAA)
    assert kbc.pio_read(DATA, 1) == 0x55
    assert kbc.pio_read(DATA, 1) == 0x55


def test_other_offsets_are_ignored(kbc):
    for off in (1, 2, 3, 5):
        assert kbc.pio_read(off, 1) == 0xFF
        kbc.pio_write(off, 1, 0xFE)
    assert kbc.ctl.calls == []


def test_state_round_trip(kbc):
    cmd(kbc, 0x60, 0x47)
    kbc.pio_write(DATA, 1, 0xF2)
    kbc.pio_write(CMD, 1, 0xD1)  # a command waiting for its data byte
    st = kbc.save_state()
    assert isinstance(st, I8042State)
    other = I8042(FakeVmControl(), FakeIrqLine(level_only=True))
    other.load_state(I8042State.model_validate_json(st.model_dump_json()))
    assert other.save_state() == st
    assert drain(other) == [0xFA, 0xAB, 0x41]
    other.pio_write(DATA, 1, 0x00)  # completes the 0xD1: reset line low
    assert other._ctl.calls == [("reset",)]
