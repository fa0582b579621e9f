"""The ACPI PM block (corral.devices.legacy.acpi_pm): SCI, sleep states, power button, PM timer."""

import pytest
from support.fakes import FakeClock, FakeIrqLine, FakeVmControl

from corral.arch.x86 import layout
from corral.devices.legacy.acpi_pm import PM_TIMER_HZ, AcpiPm, AcpiPmState

T0_NS = 123_456_789
PM1_STS, PM1_EN, PM1_CNT, PM_TMR = 0, 2, 4, 8


@pytest.fixture
def pm():
    ctl, sci, clock = FakeVmControl(), FakeIrqLine(level_only=True), FakeClock(T0_NS)
    dev = AcpiPm(ctl, sci, clock)
    dev.ctl, dev.sci, dev.clock = ctl, sci, clock
    return dev


def test_sci_en_always_reads_one(pm):
    assert pm.pio_read(PM1_CNT, 2) & 1
    pm.pio_write(PM1_CNT, 2, 0)
    assert pm.pio_read(PM1_CNT, 2) & 1
    assert pm.pio_read(PM1_CNT, 1) & 1


def test_s5_powers_off(pm):
    pm.pio_write(PM1_CNT, 2, layout.S5_SLP_TYP << 10)  # SLP_TYP first, as ACPICA does
    assert pm.ctl.calls == []
    pm.pio_write(PM1_CNT, 2, (layout.S5_SLP_TYP << 10) | 0x2000)
    assert pm.ctl.calls == [("poweroff",)]


def test_s5_by_byte_write_to_the_high_byte(pm):
    pm.pio_write(PM1_CNT + 1, 1, (layout.S5_SLP_TYP << 2) | 0x20)
    assert pm.ctl.calls == [("poweroff",)]


def test_s5_by_dword_write_at_pm1_en(pm):
    pm.pio_write(PM1_EN, 4, ((layout.S5_SLP_TYP << 10) | 0x2000) << 16)
    assert pm.ctl.calls == [("poweroff",)]


def test_s3_suspends_and_wake_sets_wak_sts(pm):
    pm.pio_write(PM1_STS, 2, 0x8000)
    pm.pio_write(PM1_CNT, 2, layout.S3_SLP_TYP << 10)
    assert pm.ctl.calls == []
    pm.pio_write(PM1_CNT + 1, 1, (layout.S3_SLP_TYP << 2) | 0x20)  # SLP_EN by a byte write
    assert pm.ctl.calls == [("suspend",)]
    assert not pm.pio_read(PM1_STS, 2) & 0x8000  # asleep: WAK_STS stays clear until the wake
    assert (pm.pio_read(PM1_CNT, 2) >> 10) & 7 == layout.S3_SLP_TYP
    pm.wake()
    assert pm.pio_read(PM1_STS, 2) & 0x8000
    assert not pm.sci.high  # WAK_STS is no SCI event
    assert pm.save_state().sts & 0x8000  # a snapshot taken after the wake keeps it


@pytest.mark.parametrize("typ", [t for t in range(8) if t not in (layout.S5_SLP_TYP, layout.S3_SLP_TYP)])
def test_other_sleep_types_wake_at_once(pm, typ):
    pm.pio_write(PM1_CNT, 2, (typ << 10) | 0x2000)
    assert pm.ctl.calls == []
    assert pm.pio_read(PM1_STS, 2) & 0x8000  # WAK_STS
    assert not pm.pio_read(PM1_CNT, 2) & 0x2000  # SLP_EN reads 0
    pm.pio_write(PM1_STS, 2, 0x8000)
    assert not pm.pio_read(PM1_STS, 2) & 0x8000


def test_power_button_raises_sci_and_status_is_write_one_to_clear(pm):
    pm.press_power_button()
    assert pm.pio_read(PM1_STS, 2) & 0x0100
    assert not pm.sci.high  # not enabled
    pm.pio_write(PM1_EN, 2, 0x0100)
    assert pm.pio_read(PM1_EN, 2) == 0x0100
    assert pm.sci.high
    pm.pio_write(PM1_STS, 2, 0x0000)  # writing 0 clears nothing
    assert pm.sci.high
    pm.pio_write(PM1_STS + 1, 1, 0x01)  # byte write clears PWRBTN_STS
    assert not pm.pio_read(PM1_STS, 2) & 0x0100
    assert not pm.sci.high


def test_pm_timer_rate_and_wrap(pm):
    t0 = pm.pio_read(PM_TMR, 4)
    assert t0 < 1 << 24
    pm.clock.t += 1_000_000_000
    t1 = pm.pio_read(PM_TMR, 4)
    assert (t1 - t0) % (1 << 24) == PM_TIMER_HZ
    last = t1
    for _ in range(100):
        pm.clock.t += 1_000_000  # 1 ms
        now = pm.pio_read(PM_TMR, 4)
        assert (now - last) % (1 << 24) in (3579, 3580)
        last = now
    pm.clock.t += 10 * 1_000_000_000  # 24 bits wrap after ~4.7 s
    assert pm.pio_read(PM_TMR, 4) < 1 << 24
    assert pm.pio_read(PM_TMR + 3, 1) == 0


def test_pm_timer_byte_reads_are_consistent(pm):
    pm.clock.t = 0
    pm.load_state(AcpiPmState(timer=0x123456))
    assert pm.pio_read(PM_TMR, 2) == 0x3456
    assert pm.pio_read(PM_TMR + 2, 1) == 0x12
    pm.pio_write(PM_TMR, 4, 0)  # read-only
    assert pm.pio_read(PM_TMR, 4) == 0x123456


def test_unused_ports_read_all_ones(pm):
    assert pm.pio_read(6, 2) == 0xFFFF


def test_acpi_pm_state_round_trip(pm):
    pm.pio_write(PM1_EN, 2, 0x0100)
    pm.press_power_button()
    pm.pio_write(PM1_CNT, 2, 0x0003)
    pm.clock.t += 777_000_000
    st = pm.save_state()
    clock = FakeClock(5)
    sci = FakeIrqLine(level_only=True)
    other = AcpiPm(FakeVmControl(), sci, clock)
    other.load_state(AcpiPmState.model_validate_json(st.model_dump_json()))
    assert other.save_state() == st
    assert sci.high
    clock.t += 1_000_000_000
    assert (other.pio_read(PM_TMR, 4) - st.timer) % (1 << 24) == PM_TIMER_HZ
