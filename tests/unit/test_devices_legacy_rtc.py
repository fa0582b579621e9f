import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.fakes import FakeClock

from corral.arch.x86 import layout
from corral.devices.legacy import rtc as rtc_mod
from corral.devices.legacy.rtc import CmosRtc, RtcState

# 2024-02-29 13:45:07 UTC, a Thursday
T0 = calendar.timegm((2024, 2, 29, 13, 45, 7, 0, 0, 0))


def rd(rtc, idx):
    rtc.pio_write(0, 1, idx)
    return rtc.pio_read(1, 1)


def wr(rtc, idx, v):
    rtc.pio_write(0, 1, idx)
    rtc.pio_write(1, 1, v)


def read_time(rtc):
    return [rd(rtc, i) for i in (0x32, 0x09, 0x08, 0x07, 0x04, 0x02, 0x00, 0x06)]


@pytest.fixture
def clock():
    return FakeClock(T0 + 0.25)


@pytest.fixture
def rtc(clock):
    return CmosRtc(clock=clock)


def test_host_time_in_bcd(rtc):
    assert read_time(rtc) == [0x20, 0x24, 0x02, 0x29, 0x13, 0x45, 0x07, 5]


def test_host_time_in_binary(rtc):
    wr(rtc, 0x0B, 0x06)
    assert read_time(rtc) == [20, 24, 2, 29, 13, 45, 7, 5]


def test_twelve_hour_mode(rtc, clock):
    wr(rtc, 0x0B, 0x00)
    assert rd(rtc, 0x04) == 0x80 | 0x01  # 1 PM, BCD
    clock.t = calendar.timegm((2024, 1, 1, 0, 5, 0, 0, 0, 0))
    assert rd(rtc, 0x04) == 0x12  # midnight is 12 AM


def test_clock_runs(rtc, clock):
    clock.t += 60
    assert rd(rtc, 0x02) == 0x46


def test_status_registers(rtc):
    assert rd(rtc, 0x0A) == 0x26
    assert rd(rtc, 0x0B) == 0x02
    assert rd(rtc, 0x0C) == 0x00
    assert rd(rtc, 0x0D) == 0x80
    wr(rtc, 0x0D, 0x00)
    assert rd(rtc, 0x0D) == 0x80


def test_uip_only_just_before_the_update(rtc, clock):
    clock.t = T0 + 0.5
    assert not rd(rtc, 0x0A) & 0x80
    clock.t = T0 + 0.9999
    assert rd(rtc, 0x0A) & 0x80
    wr(rtc, 0x0B, 0x82)  # SET: no updates, so no UIP
    assert not rd(rtc, 0x0A) & 0x80


def test_nmi_bit_is_masked_from_the_index(rtc):
    rtc.pio_write(0, 1, 0x80 | 0x0D)
    assert rtc.pio_read(1, 1) == 0x80
    assert rtc.pio_read(0, 1) == 0xFF


def test_set_time_with_set_bit_shifts_an_offset(rtc, clock):
    wr(rtc, 0x0B, 0x82)  # SET, 24h, BCD
    for idx, v in (
        (0x32, 0x20),
        (0x09, 0x30),
        (0x08, 0x12),
        (0x07, 0x31),
        (0x04, 0x23),
        (0x02, 0x59),
        (0x00, 0x50),
    ):
        wr(rtc, idx, v)
    clock.t += 5  # frozen while SET is on
    assert rd(rtc, 0x00) == 0x50
    wr(rtc, 0x0B, 0x02)  # the clock starts from the new time
    assert read_time(rtc)[:7] == [0x20, 0x30, 0x12, 0x31, 0x23, 0x59, 0x50]
    clock.t += 15
    assert read_time(rtc)[:7] == [0x20, 0x31, 0x01, 0x01, 0x00, 0x00, 0x05]
    assert rtc.save_state().offset == calendar.timegm((2030, 12, 31, 23, 59, 50)) - (T0 + 5)


def test_set_time_order_does_not_matter_while_frozen(rtc):
    wr(rtc, 0x0B, 0x86)  # SET, binary
    wr(rtc, 0x07, 31)  # day 31 while the month is still February
    wr(rtc, 0x08, 3)
    wr(rtc, 0x0B, 0x06)
    assert (rd(rtc, 0x08), rd(rtc, 0x07)) == (3, 31)


def test_write_without_set_takes_effect_at_once(rtc):
    wr(rtc, 0x04, 0x01)  # 01:45:07
    assert (rd(rtc, 0x04), rd(rtc, 0x02)) == (0x01, 0x45)
    assert rtc.save_state().offset == -12 * 3600


def test_garbage_time_is_clamped(rtc):
    wr(rtc, 0x0B, 0x82)
    for idx in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32):
        wr(rtc, idx, 0xFF)
    wr(rtc, 0x0B, 0x02)
    for v in read_time(rtc):
        assert 0 <= v <= 0xFF


def test_cmos_ram_and_memory_size():
    mem = 6 * layout.GiB
    rtc = CmosRtc(mem_size=mem)
    wr(rtc, 0x40, 0x5A)
    assert rd(rtc, 0x40) == 0x5A
    assert rd(rtc, 0x15) | rd(rtc, 0x16) << 8 == 640
    assert rd(rtc, 0x30) | rd(rtc, 0x31) << 8 == 63 * 1024
    assert rd(rtc, 0x34) | rd(rtc, 0x35) << 8 == (3 * layout.GiB - 16 * layout.MiB) >> 16
    assert rd(rtc, 0x5B) | rd(rtc, 0x5C) << 8 | rd(rtc, 0x5D) << 16 == (3 * layout.GiB) >> 16
    small = CmosRtc(mem_size=32 * layout.MiB)
    assert rd(small, 0x34) | rd(small, 0x35) << 8 == 256
    assert rd(small, 0x5B) == 0


def test_state_round_trip(rtc, clock):
    wr(rtc, 0x04, 0x05)
    wr(rtc, 0x50, 0x99)
    wr(rtc, 0x0B, 0x86)
    wr(rtc, 0x00, 33)
    rtc.pio_write(0, 1, 0x8C)
    st = rtc.save_state()
    assert isinstance(st, RtcState)
    other = CmosRtc(clock=clock)
    other.load_state(RtcState.model_validate_json(st.model_dump_json()))
    assert other.save_state() == st
    assert rd(other, 0x50) == 0x99
    assert rd(other, 0x00) == 33  # still frozen with the written seconds
    wr(other, 0x0B, 0x06)
    assert (rd(other, 0x04), rd(other, 0x00)) == (5, 33)


@given(
    y=st.integers(1, 9999),
    m=st.integers(1, 12),
    rest=st.lists(st.integers(-5, 80), min_size=4, max_size=4),
)
def test_dates_agree_with_the_calendar_module(y, m, rest):
    """The RTC's own date arithmetic (it no longer imports calendar) gives calendar's days in a
    month, seconds since the epoch and weekday, clamping as before."""
    assert rtc_mod._days_in(y, m) == calendar.monthrange(y, m)[1]
    d, h, mi, s = rest
    day = min(max(d, 1), calendar.monthrange(y, m)[1])
    clamp = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    expected = calendar.timegm((y, m, day, clamp(h, 23), clamp(mi, 59), clamp(s, 59), 0, 0, 0))
    assert rtc_mod._epoch_of([y, m, d, h, mi, s]) == expected
